// zo2/models/opt/loader.hpp -- Hugging Face OPT checkpoints <-> zo2::ParameterStore.
//
// load_opt_checkpoint<S>(dir) reads config.json and the safetensors weights (one file or
// shards listed by model.safetensors.index.json) into a store of storage type S, checking every
// tensor's presence and shape against the config. save_hf_checkpoint writes config.json and
// model.safetensors that transformers' OPTForCausalLM.from_pretrained loads back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2::opt {

/// The model layout of an OPT config (what a ParameterStore for it is built from).
inline ModelLayout model_layout(const OPTConfig& config) {
  config.validate();
  return ModelLayout(prologue_layout(config), block_layout(config),
                     static_cast<std::size_t>(config.num_hidden_layers), epilogue_layout(config));
}

template <class S>
struct LoadedCheckpoint {
  OPTConfig config;
  ParameterStore<S> store;
};

namespace detail {

/// The spellings a tensor may have in a checkpoint: OPTForCausalLM saves "model.decoder.*",
/// OPTModel saves "decoder.*", and some exports drop the prefix altogether.
inline std::vector<std::string> candidate_names(const std::string& canonical) {
  const std::string decoder = "model.decoder.";
  const std::string local = canonical.substr(decoder.size());
  return {canonical, "decoder." + local, local};
}

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// The file that holds `name` (a shard for sharded checkpoints), for error messages.
inline std::string file_holding(const io::SafetensorsCheckpoint& checkpoint, const std::string& name) {
  for (const auto& shard : checkpoint.shards())
    if (shard.contains(name)) return shard.path();
  return checkpoint.source();
}

class TensorReader {
 public:
  explicit TensorReader(const io::SafetensorsCheckpoint& checkpoint) : checkpoint_(&checkpoint) {}

  /// Reads the tensor known canonically as `canonical` into dst (converted to S), after
  /// checking its shape; throws FileError naming the file and the tensor.
  /// Checks that the tensor known canonically as `canonical` is present with spec's shape and
  /// marks it used; throws FileError naming the file and the tensor. Reads no data.
  std::string check(const std::string& canonical, const TensorSpec& spec) {
    const std::string name = resolve(canonical);
    const io::TensorEntry& entry = checkpoint_->entry(name);
    if (entry.shape != spec.shape)
      throw FileError(file_holding(*checkpoint_, name),
                      "tensor '" + name + "' has shape " + shape_text(entry.shape) + ", config.json implies " +
                          shape_text(spec.shape));
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

  std::string resolve(const std::string& canonical) const {
    for (const std::string& name : candidate_names(canonical))
      if (checkpoint_->contains(name)) return name;
    throw FileError(checkpoint_->source(), "missing tensor '" + canonical + "'");
  }

  const std::set<std::string>& used() const { return used_; }

 private:
  const io::SafetensorsCheckpoint* checkpoint_;
  std::vector<float> buffer_;
  std::set<std::string> used_;
};

}  // namespace detail

/// Reads the weights of an OPT checkpoint directory (or a .safetensors / index .json path)
/// laid out for `config` into a new store. A tensor that is missing, has the wrong shape, or is
/// left over (e.g. layer 12 of a 12-layer config: the config does not match the weights) is a
/// FileError naming the file and tensor; every tensor is checked before the store is
/// allocated, so a config.json that disagrees with the weights never costs the memory its sizes
/// imply. lm_head.weight may be absent (tied) or equal to the token embedding; a different LM
/// head cannot be represented and is an error.
template <class S>
ParameterStore<S> load_opt_weights(const std::filesystem::path& checkpoint_path, const OPTConfig& config) {
  const io::SafetensorsCheckpoint checkpoint = io::SafetensorsCheckpoint::open(checkpoint_path);
  ModelLayout layout = model_layout(config);
  detail::TensorReader reader(checkpoint);

  // fn(spec, group, tensor index, canonical checkpoint name) for every tensor of `ml`.
  auto for_each_tensor = [](const ModelLayout& ml, auto fn) {
    auto group = [&](GroupIndex g, auto canonical_name) {
      const ParamLayout& l = ml.layout(g);
      for (std::size_t r = 0; r < l.num_tensors(); ++r) fn(l.spec(r), g, r, canonical_name(l.spec(r).name));
    };
    group(ml.prologue(), [](const std::string& n) { return hf_prologue_name(n); });
    for (std::size_t i = 0; i < ml.num_blocks(); ++i)
      group(ml.block(i), [i](const std::string& n) { return hf_block_name(i, n); });
    group(ml.epilogue(), [](const std::string& n) { return hf_epilogue_name(n); });
  };
  for_each_tensor(layout, [&](const TensorSpec& spec, GroupIndex, std::size_t, const std::string& canonical) {
    reader.check(canonical, spec);
  });
  for (const std::string& name : checkpoint.names()) {
    const bool decoder_tensor = name.find("decoder.") != std::string::npos || name.find("layers.") == 0 ||
                                name.find("embed_") == 0 || name.find("project_") == 0 ||
                                name.find("final_layer_norm") == 0;
    if (decoder_tensor && reader.used().count(name) == 0)
      throw FileError(detail::file_holding(checkpoint, name),
                      "unexpected tensor '" + name + "': config.json does not describe it (wrong config?)");
  }

  ParameterStore<S> store(std::move(layout));
  for_each_tensor(store.model_layout(), [&](const TensorSpec& spec, GroupIndex g, std::size_t r,
                                            const std::string& canonical) {
    reader.read(canonical, spec, store.group(g).tensor(r));
  });

  for (const std::string head : {"lm_head.weight", "model.lm_head.weight"}) {
    if (!checkpoint.contains(head)) continue;
    const std::string embed = reader.resolve(hf_prologue_name("embed_tokens.weight"));
    const io::TensorEntry& entry = checkpoint.entry(head);
    if (entry.shape != checkpoint.entry(embed).shape ||
        checkpoint.read_as_float(head) != checkpoint.read_as_float(embed))
      throw FileError(detail::file_holding(checkpoint, head),
                      "tensor '" + head + "' differs from '" + embed +
                          "'; only LM heads tied to the token embedding are supported");
  }
  return store;
}

/// config.json + weights of a Hugging Face OPT checkpoint directory.
template <class S>
LoadedCheckpoint<S> load_opt_checkpoint(const std::filesystem::path& directory) {
  OPTConfig config = OPTConfig::from_json_file(directory / "config.json");
  ParameterStore<S> store = load_opt_weights<S>(directory, config);
  return LoadedCheckpoint<S>{std::move(config), std::move(store)};
}

namespace detail {

/// Writes `text` to `path` atomically: a temporary file beside it, fsync'ed, renamed over it.
inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path temp = path.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) throw FileError(path.string(), "cannot create " + temp.string());
    out << text;
    out.flush();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(temp, ignored);
      throw FileError(path.string(), "write to " + temp.string() + " failed");
    }
  }
  std::error_code ec;
  std::filesystem::rename(temp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    throw FileError(path.string(), "cannot rename " + temp.string() + " into place: " + ec.message());
  }
}

template <class S>
void encode(const S* src, std::size_t n, io::Dtype dtype, std::vector<std::byte>& out) {
  out.resize(n * io::dtype_size(dtype));
  for (std::size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(load(src[i]));
    switch (dtype) {
      case io::Dtype::F32: std::memcpy(out.data() + 4 * i, &v, 4); break;
      case io::Dtype::BF16: {
        const std::uint16_t bits = io::float_to_bf16(v);
        std::memcpy(out.data() + 2 * i, &bits, 2);
        break;
      }
      case io::Dtype::F16: {
        const std::uint16_t bits = io::float_to_fp16(v);
        std::memcpy(out.data() + 2 * i, &bits, 2);
        break;
      }
      default: break;  // rejected by the caller
    }
  }
}

}  // namespace detail

/// Writes `directory`/config.json and `directory`/model.safetensors (dtype F32, BF16 or F16)
/// with transformers' names ("model.decoder.*"; lm_head omitted because it is tied), so
/// OPTForCausalLM.from_pretrained(directory) loads the parameters of `store`. Each file is
/// replaced atomically. A stale model.safetensors.index.json is removed, because transformers
/// (and load_opt_checkpoint) would prefer it over the new file.
template <class S>
void save_hf_checkpoint(const std::filesystem::path& directory, const OPTConfig& config,
                        const ParameterStore<S>& store, io::Dtype dtype = io::Dtype::F32) {
  if (dtype != io::Dtype::F32 && dtype != io::Dtype::BF16 && dtype != io::Dtype::F16)
    throw ConfigError("dtype", "OPT checkpoints are saved as F32, BF16 or F16, not " +
                                   std::string(io::dtype_name(dtype)));
  const ModelLayout expected = model_layout(config);
  const ModelLayout& ml = store.model_layout();
  if (ml.num_blocks() != expected.num_blocks() ||
      !(ml.layout(ml.prologue()) == expected.layout(expected.prologue())) ||
      !(ml.layout(ml.block(0)) == expected.layout(expected.block(0))) ||
      !(ml.layout(ml.epilogue()) == expected.layout(expected.epilogue())))
    throw ConfigError("config", "the parameter store was not laid out for this OPT config");

  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) throw FileError(directory.string(), "cannot create directory: " + ec.message());

  std::vector<std::vector<std::byte>> payloads;
  std::vector<io::TensorToWrite> tensors;
  auto add_group = [&](GroupIndex g, auto canonical_name) {
    const ParamView<const S> view = store.group(g);
    const ParamLayout& layout = view.layout();
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      payloads.emplace_back();
      detail::encode(view.tensor(r), layout.spec(r).numel(), dtype, payloads.back());
      tensors.push_back({canonical_name(layout.spec(r).name), dtype, layout.spec(r).shape, nullptr});
    }
  };
  add_group(ml.prologue(), [](const std::string& n) { return hf_prologue_name(n); });
  for (std::size_t i = 0; i < ml.num_blocks(); ++i)
    add_group(ml.block(i), [i](const std::string& n) { return hf_block_name(i, n); });
  add_group(ml.epilogue(), [](const std::string& n) { return hf_epilogue_name(n); });
  for (std::size_t i = 0; i < tensors.size(); ++i) tensors[i].data = payloads[i].data();

  const std::string dtype_name = dtype == io::Dtype::F32 ? "float32" : dtype == io::Dtype::BF16 ? "bfloat16" : "float16";
  // Weights first: a config.json next to weights it does not describe is the worse half-state.
  io::write_safetensors(directory / io::SafetensorsCheckpoint::kSingleFileName, tensors, {{"format", "pt"}});
  detail::write_text_atomically(directory / "config.json", config.to_json(dtype_name).dump(2) + "\n");
  std::filesystem::remove(directory / io::SafetensorsCheckpoint::kIndexFileName, ec);
}

}  // namespace zo2::opt
