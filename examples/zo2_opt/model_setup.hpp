// zo2-opt: where the model comes from: a Hugging Face checkpoint directory of any family
// (config.json's model_type: opt, llama, qwen2, qwen3, mistral), a named preset with random
// weights (optionally shrunk with --layers/--hidden), or the built-in demo config; and where it
// goes: an HF-loadable export, written by the family's save function.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <zo2/models/opt/config.hpp>
#include <zo2/optim/parameter_store.hpp>

#include "model_config.hpp"
#include "tokenizer.hpp"

namespace zo2_opt {

/// A model's initial parameters, handed out one group (prologue, block i, epilogue) at a time:
/// an offloaded engine encodes each group into its host store as it comes, so the whole model
/// never exists in fp32. The CPU and resident engines take it as one store.
class ParameterSource {
 public:
  virtual ~ParameterSource() = default;
  virtual const zo2::ModelLayout& model_layout() const = 0;
  /// Group g's float flat buffer, padding zero, into `flat` (its total_elements()). Groups may
  /// come in any order, and several threads may read different groups at once.
  virtual void read_group(zo2::GroupIndex g, std::span<float> flat) const = 0;
  /// Every group in one store.
  virtual zo2::ParameterStore<float> take_store() const;
};

/// A store as a source (the store is moved in).
std::unique_ptr<ParameterSource> store_source(zo2::ParameterStore<float> store);

/// random_parameters() group by group: the same values, without the whole store.
std::unique_ptr<ParameterSource> random_source(const ModelConfig& config, std::uint64_t seed);

struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<ParameterSource> parameters;  // the checkpoint, memory-mapped, read group by group
  std::optional<Tokenizer> tokenizer;  // absent when the directory has none
  std::string description;
};

/// config.json + model.safetensors (or a sharded index, checked in full here, read group by group
/// later) + the tokenizer (tokenizer.json, or
/// vocab.json + merges.txt) when present. The family is config.json's model_type (none: OPT);
/// one no family serves, a missing config or weights file are errors naming the field or file.
LoadedModel load_model_dir(const std::filesystem::path& dir);

/// The demo model: 2 layers, hidden 64, 4 heads, the byte vocabulary, 256 positions (~150k parameters).
zo2::opt::OPTConfig demo_config();

/// Every name preset_config() takes: "demo", OPT's (opt-125m ...), the LLaMA family's
/// (llama-3.2-1b, llama-3-8b, mistral-7b, qwen2.5-7b, qwen3-8b, qwen3-32b).
std::vector<std::string> preset_names();

/// A named preset (or the demo config for "demo"), with optional overrides (0: none) of the
/// depth, width and head count, and of the vocabulary size (the tokenizer's). OPT: ffn = 4 x
/// hidden. LLaMA family: the FFN keeps the preset's ratio to hidden, head_dim = hidden / heads,
/// and the key/value heads the preset's grouping (where the head count allows it). An override
/// that gives an invalid config is a UsageError naming the flag.
ModelConfig preset_config(const std::string& name, std::int64_t layers, std::int64_t hidden, std::int64_t heads,
                          std::int64_t vocab_size);

/// transformers' _init_weights: N(0, 0.02) for weights and embeddings, zero biases, unit
/// LayerNorm / RMSNorm scales; deterministic in `seed` (zo2's Philox normals).
zo2::ParameterStore<float> random_parameters(const ModelConfig& config, std::uint64_t seed);

/// The parameter groups of a config (what a ParameterStore for it is built from).
zo2::ModelLayout model_layout(const ModelConfig& config);

/// Fills a group's float flat buffer: where an export reads the parameters from, one group at a
/// time (an engine's read_group, or a store's).
using GroupReader = std::function<void(zo2::GroupIndex, std::span<float>)>;

/// A store's groups, copied one at a time.
GroupReader store_reader(const zo2::ParameterStore<float>& store);

/// Largest weights file an export writes before it shards (transformers' layout:
/// model-0000i-of-0000n.safetensors + model.safetensors.index.json); ZO2_OPT_MAX_SHARD_BYTES in
/// the environment overrides the default (zo2::io::kDefaultMaxShardBytes, 2 GB).
std::uint64_t max_shard_bytes();

/// Writes config.json + the weights (F32; sharded when larger than max_shard_bytes()) +
/// tokenizer files into `dir`, atomically: the files are written and fsync'ed in a temporary
/// sibling directory which is then renamed. The weights come group by group from `read_group`
/// (one group's floats in memory at a time). `write_extra`, when given, adds files to the
/// staging directory before it is published.
void export_model(const std::filesystem::path& dir, const ModelConfig& config, const zo2::ModelLayout& layout,
                  const GroupReader& read_group, const Tokenizer* tokenizer,
                  const std::function<void(const std::filesystem::path&)>& write_extra = {});
/// The same from a store.
void export_model(const std::filesystem::path& dir, const ModelConfig& config,
                  const zo2::ParameterStore<float>& store, const Tokenizer* tokenizer,
                  const std::function<void(const std::filesystem::path&)>& write_extra = {});

}  // namespace zo2_opt
