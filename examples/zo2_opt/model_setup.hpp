// zo2-opt: where the model comes from: a Hugging Face checkpoint directory, a named preset with
// random weights (optionally shrunk with --layers/--hidden), or the built-in demo config; and
// where it goes: an HF-loadable export.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include <zo2/models/opt/config.hpp>
#include <zo2/optim/parameter_store.hpp>

#include "tokenizer.hpp"

namespace zo2_opt {

struct LoadedModel {
  zo2::opt::OPTConfig config;
  zo2::ParameterStore<float> store;
  std::optional<Tokenizer> tokenizer;  // absent when the directory has none
  std::string description;
};

/// config.json + model.safetensors (or a sharded index) + vocab.json/merges.txt when present.
/// A missing config or weights file is an error naming it.
LoadedModel load_model_dir(const std::filesystem::path& dir);

/// The demo model: 2 layers, hidden 64, 4 heads, the byte vocabulary, 256 positions (~150k parameters).
zo2::opt::OPTConfig demo_config();

/// A named preset (or the demo config for "demo"), with optional overrides of the depth, width
/// and head count, and of the vocabulary size (the tokenizer's).
zo2::opt::OPTConfig preset_config(const std::string& name, std::int64_t layers, std::int64_t hidden,
                                  std::int64_t heads, std::int64_t vocab_size);

/// OPT's initialization (transformers' _init_weights): N(0, 0.02) for weights and embeddings,
/// zero biases, unit LayerNorm scales; deterministic in `seed` (zo2's Philox normals).
zo2::ParameterStore<float> random_parameters(const zo2::opt::OPTConfig& config, std::uint64_t seed);

/// Writes config.json + model.safetensors (F32) + tokenizer files into `dir`, atomically: the
/// files are written and fsync'ed in a temporary sibling directory which is then renamed.
/// `write_extra`, when given, adds files to the staging directory before it is published.
void export_model(const std::filesystem::path& dir, const zo2::opt::OPTConfig& config,
                  const zo2::ParameterStore<float>& store, const Tokenizer* tokenizer,
                  const std::function<void(const std::filesystem::path&)>& write_extra = {});

}  // namespace zo2_opt
