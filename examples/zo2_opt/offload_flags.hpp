// zo2-opt: --offload, --codec and --gpu-memory-budget for the commands that read a model without
// training it (eval, generate). The weights then rest in pinned host memory in the codec's format
// and every streamed block passes through the GPU's slots once per forward, unperturbed and not
// written back: a model larger than the GPU is evaluated and sampled as `train --offload` trains
// it. (train declares the same flags in its own table, with its resume rules.)
#pragma once

#include <string>
#include <vector>

#include "cli.hpp"
#include "engine.hpp"

namespace zo2_opt {

/// The three flags' rows of a command's option table (its --help).
inline std::vector<OptionSpec> offload_option_specs() {
  return {
      {"--offload", "", "keep the weights in host memory and stream blocks through the GPU (needs --device cuda)", ""},
      {"--codec", "NAME",
       "with --offload: how blocks rest in host memory and cross PCIe (fp32: exact; bf16, bf16p, fp16, int8: "
       "the forward reads the weights rounded to it)",
       "fp32"},
      {"--gpu-memory-budget", "GIB",
       "with --offload: GPU memory the engine may hold (above the minimum: a third slot, then resident blocks)", ""},
  };
}

/// Sets options.offload, codec and gpu_memory_budget_gib from the flags; --codec or
/// --gpu-memory-budget without --offload is an error naming the command.
inline void apply_offload_flags(const Args& args, EngineOptions& options) {
  options.offload = args.flag("--offload");
  options.codec = args.str("--codec", "");
  if (args.has("--gpu-memory-budget")) options.gpu_memory_budget_gib = args.number("--gpu-memory-budget", 0);
  if (!options.offload && (args.has("--codec") || args.has("--gpu-memory-budget")))
    throw UsageError(args.command() + ": --codec and --gpu-memory-budget apply only with --offload");
}

}  // namespace zo2_opt
