// zo2/models/llama/loader.hpp -- Hugging Face LLaMA-family checkpoints <-> zo2::ParameterStore.
//
// load_llama_checkpoint<S>(dir) reads config.json and the safetensors weights (one file or the
// shards model.safetensors.index.json lists; F32, BF16, F16) into a store of storage type S,
// checking every tensor's presence and shape against the config before allocating it.
// CheckpointGroups reads the same checkpoint one parameter group at a time (for
// HostOffload::set_group: the whole model never exists in fp32). save_hf_checkpoint writes
// config.json (the one read, dtype updated) and model.safetensors (or shards and an index), which
// transformers' AutoModelForCausalLM.from_pretrained loads back; save_hf_checkpoint_by_group does
// so from a function that yields one group at a time (HostOffload::get_group).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/opt/loader.hpp>  // detail::encode, detail::write_text_atomically
#include <zo2/optim/parameter_store.hpp>

namespace zo2::llama {

/// The model layout of a config (what a ParameterStore for it is built from).
inline ModelLayout model_layout(const LlamaConfig& config) {
  config.validate();
  return ModelLayout(prologue_layout(config), block_layout(config),
                     static_cast<std::size_t>(config.num_hidden_layers), epilogue_layout(config));
}

template <class S>
struct LoadedCheckpoint {
  LlamaConfig config;
  ParameterStore<S> store;
};

/// One tensor of a checkpoint for `config`: its canonical HF name and where it goes.
using CheckpointTensor = zo2::opt::detail::HfTensor;  // name: e.g. "model.layers.3.self_attn.q_proj.weight"

/// Every tensor a checkpoint of `ml` (a model_layout of some config) holds, in the order
/// transformers' state dict lists groups: prologue, layers 0..N-1, epilogue. The names and
/// shapes a writer needs (save_hf_checkpoint) and a reader checks (load_llama_weights).
inline std::vector<CheckpointTensor> checkpoint_tensors(const ModelLayout& ml) {
  return zo2::opt::detail::hf_tensors(ml, hf_prologue_name, hf_block_name, hf_epilogue_name);
}

namespace detail {

using zo2::opt::detail::file_holding;
using zo2::opt::detail::shape_text;

/// The spellings a tensor may have: LlamaForCausalLM saves "model.*"; a bare LlamaModel saves
/// the names without "model.".
inline std::vector<std::string> candidate_names(const std::string& canonical) {
  const std::string prefix = "model.";
  if (canonical.rfind(prefix, 0) != 0) return {canonical};
  return {canonical, canonical.substr(prefix.size())};
}

/// Whether a checkpoint tensor belongs to the decoder (so an unused one means the config does
/// not describe the weights). Rotary inv_freq buffers some older exports carry are not weights.
inline bool is_model_tensor(const std::string& name) {
  const std::string inv_freq = "rotary_emb.inv_freq";
  if (name.size() >= inv_freq.size() && name.compare(name.size() - inv_freq.size(), inv_freq.size(), inv_freq) == 0)
    return false;
  for (const char* prefix : {"model.", "layers.", "embed_tokens.", "norm.", "lm_head."})
    if (name.rfind(prefix, 0) == 0) return true;
  return false;
}

class TensorReader {
 public:
  explicit TensorReader(const io::SafetensorsCheckpoint& checkpoint) : checkpoint_(&checkpoint) {}

  std::string resolve(const std::string& canonical) const {
    for (const std::string& name : candidate_names(canonical))
      if (checkpoint_->contains(name)) return name;
    throw FileError(checkpoint_->source(), "missing tensor '" + canonical + "'");
  }

  /// Checks that `canonical` is present with spec's shape and a floating dtype, and marks it
  /// used; throws FileError naming the file and the tensor. Reads no data.
  std::string check(const std::string& canonical, const TensorSpec& spec) {
    const std::string name = resolve(canonical);
    const io::TensorEntry& entry = checkpoint_->entry(name);
    if (entry.shape != spec.shape)
      throw FileError(file_holding(*checkpoint_, name), "tensor '" + name + "' has shape " + shape_text(entry.shape) +
                                                            ", config.json implies " + shape_text(spec.shape));
    if (entry.dtype != io::Dtype::F32 && entry.dtype != io::Dtype::BF16 && entry.dtype != io::Dtype::F16 &&
        entry.dtype != io::Dtype::F64)
      throw FileError(file_holding(*checkpoint_, name), "tensor '" + name + "' has dtype " +
                                                            std::string(io::dtype_name(entry.dtype)) +
                                                            " (F32, BF16 or F16 expected)");
    used_.insert(name);
    return name;
  }

  template <class S>
  void read(const std::string& canonical, const TensorSpec& spec, S* dst) {
    const std::string name = check(canonical, spec);
    const std::size_t n = spec.numel();
    if constexpr (std::is_same_v<S, float>) {
      checkpoint_->read_as_float(name, dst, n);
    } else {
      buffer_.resize(n);
      checkpoint_->read_as_float(name, buffer_.data(), n);
      for (std::size_t i = 0; i < n; ++i) dst[i] = store_rounded<S>(static_cast<compute_t<S>>(buffer_[i]), 0, false);
    }
  }

  const std::set<std::string>& used() const { return used_; }

 private:
  const io::SafetensorsCheckpoint* checkpoint_;
  std::vector<float> buffer_;
  std::set<std::string> used_;
};

}  // namespace detail

namespace detail {

/// Opens and checks a checkpoint for `config` (see load_llama_weights for what is checked).
inline zo2::opt::detail::GroupReader open_llama_groups(const std::filesystem::path& checkpoint_path,
                                                      const LlamaConfig& config) {
  io::SafetensorsCheckpoint checkpoint = io::SafetensorsCheckpoint::open(checkpoint_path);
  ModelLayout layout = model_layout(config);
  TensorReader reader(checkpoint);
  std::vector<std::vector<std::string>> names(layout.num_groups());
  for (const CheckpointTensor& t : checkpoint_tensors(layout)) {
    if (t.name == "lm_head.weight" && !checkpoint.contains(t.name))
      throw FileError(checkpoint.source(), "missing tensor 'lm_head.weight' (config.json says tie_word_embeddings "
                                           "is false, so the LM head is its own tensor)");
    names[t.group.value].push_back(reader.check(t.name, *t.spec));
  }
  // A tied config may meet a checkpoint that stores the head anyway: it must be the embedding.
  const bool tied_head_present = config.tie_word_embeddings && checkpoint.contains("lm_head.weight");
  for (const std::string& name : checkpoint.names()) {
    if (!is_model_tensor(name) || reader.used().count(name) != 0) continue;
    if (tied_head_present && name == "lm_head.weight") continue;
    throw FileError(file_holding(checkpoint, name),
                    "unexpected tensor '" + name + "': config.json does not describe it (wrong config?)");
  }
  if (tied_head_present) {
    const std::string embed = reader.resolve(hf_prologue_name("embed_tokens.weight"));
    if (!zo2::opt::detail::same_values(checkpoint, "lm_head.weight", embed))
      throw FileError(file_holding(checkpoint, "lm_head.weight"),
                      "tensor 'lm_head.weight' differs from '" + embed +
                          "', but config.json says tie_word_embeddings is true");
  }
  return zo2::opt::detail::GroupReader(std::move(checkpoint), std::move(layout), std::move(names));
}

}  // namespace detail

/// A LLaMA-family checkpoint, checked as load_llama_weights checks it, whose weights are read
/// one parameter group (prologue, block i, epilogue) at a time: the caller keeps one group's
/// floats, e.g. to encode it into HostOffload::set_group, and the whole model never exists in
/// fp32. The safetensors files stay memory-mapped; each tensor's pages are dropped once read.
class CheckpointGroups : public zo2::opt::detail::GroupReader {
 public:
  /// Opens `checkpoint_path` (a directory, an index .json or a .safetensors file) and checks
  /// every tensor against `config`; the errors are load_llama_weights'.
  CheckpointGroups(const std::filesystem::path& checkpoint_path, const LlamaConfig& config)
      : zo2::opt::detail::GroupReader(detail::open_llama_groups(checkpoint_path, config)) {}
};

/// Reads the weights of a checkpoint directory (or a .safetensors / index .json path) laid out
/// for `config` into a new store. A tensor that is missing, has the wrong shape, or is left
/// over (layer 2 of a 2-layer config, biases a config without them does not describe, an
/// lm_head.weight beside a tied config that differs from the embedding) is a FileError naming
/// the file and tensor. Every tensor is checked before the store is allocated, so a config.json
/// that disagrees with the weights never costs the memory its sizes imply.
template <class S>
ParameterStore<S> load_llama_weights(const std::filesystem::path& checkpoint_path, const LlamaConfig& config) {
  const CheckpointGroups groups(checkpoint_path, config);
  return zo2::opt::detail::store_from_groups<S>(groups);
}

/// config.json + weights of a Hugging Face checkpoint directory.
template <class S>
LoadedCheckpoint<S> load_llama_checkpoint(const std::filesystem::path& directory) {
  LlamaConfig config = LlamaConfig::from_json_file(directory / "config.json");
  ParameterStore<S> store = load_llama_weights<S>(directory, config);
  return LoadedCheckpoint<S>{std::move(config), std::move(store)};
}

/// Writes `directory`/config.json and the weights (dtype F32, BF16 or F16) with transformers'
/// names (lm_head.weight only when untied), so AutoModelForCausalLM.from_pretrained(directory)
/// loads the parameters read_group(GroupIndex, std::span<float>) yields: it fills a group's
/// float flat buffer (HostOffload::get_group, or a copy from a store), is called once per group
/// in order, and is the only source of values, so the model is never whole in memory. Weights of
/// at most `max_shard_bytes` go into model.safetensors; more into transformers' shards and
/// model.safetensors.index.json (see io::ShardedSafetensorsWriter). config.json is
/// config.to_json(dtype): the file the config was read from, its dtype updated. Each file is
/// replaced atomically; a stale index or single file that transformers (or
/// load_llama_checkpoint) would prefer over the new files is removed.
template <class ReadGroup>
void save_hf_checkpoint_by_group(const std::filesystem::path& directory, const LlamaConfig& config,
                                 const ModelLayout& ml, ReadGroup&& read_group, io::Dtype dtype = io::Dtype::F32,
                                 std::uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  if (dtype != io::Dtype::F32 && dtype != io::Dtype::BF16 && dtype != io::Dtype::F16)
    throw ConfigError("dtype", "LLaMA-family checkpoints are saved as F32, BF16 or F16, not " +
                                   std::string(io::dtype_name(dtype)));
  const ModelLayout expected = model_layout(config);
  if (ml.num_blocks() != expected.num_blocks() ||
      !(ml.layout(ml.prologue()) == expected.layout(expected.prologue())) ||
      !(ml.layout(ml.block(0)) == expected.layout(expected.block(0))) ||
      !(ml.layout(ml.epilogue()) == expected.layout(expected.epilogue())))
    throw ConfigError("config", "the parameter store was not laid out for this LLaMA-family config");

  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) throw FileError(directory.string(), "cannot create directory: " + ec.message());

  // Weights first: a config.json next to weights it does not describe is the worse half-state.
  zo2::opt::detail::write_hf_weights(directory, ml, checkpoint_tensors(ml), read_group, dtype, max_shard_bytes);
  zo2::opt::detail::write_text_atomically(
      directory / "config.json", config.to_json(zo2::opt::detail::torch_dtype_name(dtype)).dump(2) + "\n");
}

/// save_hf_checkpoint_by_group from the groups of `store`.
template <class S>
void save_hf_checkpoint(const std::filesystem::path& directory, const LlamaConfig& config,
                        const ParameterStore<S>& store, io::Dtype dtype = io::Dtype::F32,
                        std::uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  save_hf_checkpoint_by_group(directory, config, store.model_layout(), zo2::opt::detail::store_group_reader(store),
                              dtype, max_shard_bytes);
}

}  // namespace zo2::llama
