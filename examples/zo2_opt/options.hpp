// zo2-opt: options shared by several commands (device, data settings).
#pragma once

#include <string>

#include "cli.hpp"
#include "data.hpp"
#include "model_config.hpp"
#include "tokenizer.hpp"

namespace zo2_opt {

/// --device auto|cpu|cuda (auto, the default: cuda when this build has CUDA and a GPU is
/// present, else cpu), checked against this build and machine (one-line error otherwise).
std::string parse_device(const Args& args);

/// --compute fp32|bf16: the precision of the CUDA forward (EngineOptions::compute). `fallback`
/// when the flag is absent (a resumed run's, else fp32); the flag with another device than cuda,
/// or another value, is an error naming the command.
std::string parse_compute(const Args& args, const std::string& device, const std::string& fallback = "fp32");

/// --compute's row of a command's option table (its --help).
OptionSpec compute_option_spec();

/// True when this build has CUDA and a CUDA GPU is present.
bool cuda_device_present();

/// Throws when `device` cannot be used here (no CUDA in this build, or no GPU present).
void check_device_available(const std::string& device);

/// --seq-len (default: min(max_position_embeddings, default_cap)), --template, --candidates;
/// --seq-len beyond max_position_embeddings is an error.
DataOptions data_options_from(const Args& args, const ModelConfig& config, std::int64_t default_cap);

/// A tokenizer whose ids reach past the model's vocabulary is an error naming both sizes.
void check_tokenizer_fits(const Args& args, const Tokenizer& tokenizer, const ModelConfig& config);

}  // namespace zo2_opt
