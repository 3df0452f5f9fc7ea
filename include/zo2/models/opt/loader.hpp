// zo2/models/opt/loader.hpp -- Hugging Face OPT checkpoints <-> zo2::ParameterStore.
//
// load_opt_checkpoint<S>(dir) reads config.json and the safetensors weights (one file or
// shards listed by model.safetensors.index.json) into a store of storage type S, checking every
// tensor's presence and shape against the config. CheckpointGroups reads the same checkpoint
// one parameter group at a time (for HostOffload::set_group: the whole model never exists in
// fp32). save_hf_checkpoint writes config.json and model.safetensors (or shards and an index)
// that transformers' OPTForCausalLM.from_pretrained loads back; save_hf_checkpoint_by_group
// does so from a function that yields one group at a time (HostOffload::get_group).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/parallel.hpp>
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

/// One tensor of a checkpoint: its name in the file (or the name to write) and where it goes.
struct HfTensor {
  std::string name;
  GroupIndex group;
  std::size_t index;  // within the group's layout
  const TensorSpec* spec;
};

/// Whether tensors `a` and `b` of `checkpoint` hold the same values (as float), compared a
/// million elements at a time so that no whole tensor is ever converted at once. Tensors of a
/// dtype that does not convert to float are a FileError naming the file.
inline bool same_values(const io::SafetensorsCheckpoint& checkpoint, const std::string& a, const std::string& b) {
  const io::TensorEntry& ea = checkpoint.entry(a);
  const io::TensorEntry& eb = checkpoint.entry(b);
  if (ea.shape != eb.shape) return false;
  constexpr std::size_t kChunk = std::size_t{1} << 20;
  const std::size_t n = ea.numel();
  std::vector<float> x(std::min(n, kChunk)), y(std::min(n, kChunk));
  bool same = true;
  for (std::size_t first = 0; same && first < n; first += kChunk) {
    const std::size_t m = std::min(kChunk, n - first);
    io::SafetensorsFile::convert_range_to_float(ea, first, m, x.data(), checkpoint.file_of(a));
    io::SafetensorsFile::convert_range_to_float(eb, first, m, y.data(), checkpoint.file_of(b));
    same = std::equal(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(m), y.begin());
  }
  checkpoint.release(a);
  checkpoint.release(b);
  return same;
}

/// A checkpoint whose tensors have all been checked, read one parameter group at a time:
/// `names[g][r]` is the file's name of group g's tensor r.
class GroupReader {
 public:
  GroupReader(io::SafetensorsCheckpoint checkpoint, ModelLayout layout, std::vector<std::vector<std::string>> names)
      : checkpoint_(std::move(checkpoint)), layout_(std::move(layout)), names_(std::move(names)) {}

  const ModelLayout& model_layout() const { return layout_; }
  const std::string& source() const { return checkpoint_.source(); }

  /// Group g's float flat buffer (padding zero) into `flat` (layout(g).total_elements() of
  /// them). Each tensor's pages of the mapped file are dropped once it is converted, so the
  /// process holds the group and nothing of the file. A large group's tensors are converted on
  /// several cores. Safe to call from several threads for different groups.
  void read_group(GroupIndex g, std::span<float> flat) const {
    if (g.value >= layout_.num_groups())
      throw Error("read_group: group " + std::to_string(g.value) + " of a model with " +
                  std::to_string(layout_.num_groups()) + " groups");
    const ParamLayout& l = layout_.layout(g);
    if (flat.size() != l.total_elements())
      throw ShapeError("read_group: group " + std::to_string(g.value) + " has " + std::to_string(l.total_elements()) +
                       " elements (padding included), the buffer " + std::to_string(flat.size()));
    std::fill(flat.begin(), flat.end(), 0.0f);
    parallel_for(
        l.num_tensors(),
        [&](std::size_t r) {
          const std::string& name = names_[g.value][r];
          checkpoint_.read_as_float(name, flat.data() + l.offset(r), l.spec(r).numel());
          checkpoint_.release(name);
        },
        threads_for(l.total_elements()));
  }
  std::size_t num_groups() const { return layout_.num_groups(); }
  /// fn(GroupIndex, std::span<const float>) for every group in order, through one buffer.
  template <class Fn>
  void for_each_group(Fn&& fn) const {
    std::vector<float> buffer;
    for (std::size_t g = 0; g < num_groups(); ++g) {
      buffer.resize(layout_.layout(GroupIndex{g}).total_elements());
      read_group(GroupIndex{g}, buffer);
      fn(GroupIndex{g}, std::span<const float>(buffer));
    }
  }

 private:
  io::SafetensorsCheckpoint checkpoint_;
  ModelLayout layout_;
  std::vector<std::vector<std::string>> names_;
};

/// Opens and checks an OPT checkpoint for `config` (see load_opt_weights for what is checked).
inline GroupReader open_opt_groups(const std::filesystem::path& checkpoint_path, const OPTConfig& config) {
  io::SafetensorsCheckpoint checkpoint = io::SafetensorsCheckpoint::open(checkpoint_path);
  ModelLayout layout = model_layout(config);
  TensorReader reader(checkpoint);

  std::vector<std::vector<std::string>> names(layout.num_groups());
  auto check_group = [&](GroupIndex g, auto canonical_name) {
    const ParamLayout& l = layout.layout(g);
    for (std::size_t r = 0; r < l.num_tensors(); ++r)
      names[g.value].push_back(reader.check(canonical_name(l.spec(r).name), l.spec(r)));
  };
  check_group(layout.prologue(), [](const std::string& n) { return hf_prologue_name(n); });
  for (std::size_t i = 0; i < layout.num_blocks(); ++i)
    check_group(layout.block(i), [i](const std::string& n) { return hf_block_name(i, n); });
  check_group(layout.epilogue(), [](const std::string& n) { return hf_epilogue_name(n); });
  for (const std::string& name : checkpoint.names()) {
    const bool decoder_tensor = name.find("decoder.") != std::string::npos || name.find("layers.") == 0 ||
                                name.find("embed_") == 0 || name.find("project_") == 0 ||
                                name.find("final_layer_norm") == 0;
    if (decoder_tensor && reader.used().count(name) == 0)
      throw FileError(file_holding(checkpoint, name),
                      "unexpected tensor '" + name + "': config.json does not describe it (wrong config?)");
  }
  for (const std::string head : {"lm_head.weight", "model.lm_head.weight"}) {
    if (!checkpoint.contains(head)) continue;
    const std::string embed = reader.resolve(hf_prologue_name("embed_tokens.weight"));
    if (!same_values(checkpoint, head, embed))
      throw FileError(file_holding(checkpoint, head),
                      "tensor '" + head + "' differs from '" + embed +
                          "'; only LM heads tied to the token embedding are supported");
  }
  return GroupReader(std::move(checkpoint), std::move(layout), std::move(names));
}

/// A store of S filled group by group from `groups` (one group's floats at a time beside it).
template <class S>
ParameterStore<S> store_from_groups(const GroupReader& groups) {
  ParameterStore<S> store(groups.model_layout());
  std::vector<float> buffer;
  for (std::size_t g = 0; g < store.num_groups(); ++g) {
    const ParamView<S> view = store.group(GroupIndex{g});
    const std::size_t n = view.layout().total_elements();
    if constexpr (std::is_same_v<S, float>) {
      groups.read_group(GroupIndex{g}, std::span<float>(view.data(), n));
    } else {
      buffer.resize(n);
      groups.read_group(GroupIndex{g}, buffer);
      for (std::size_t i = 0; i < n; ++i)
        view.data()[i] = store_rounded<S>(static_cast<compute_t<S>>(buffer[i]), 0, false);
    }
  }
  return store;
}

}  // namespace detail

/// An OPT checkpoint, checked as load_opt_weights checks it, whose weights are read one
/// parameter group (prologue, block i, epilogue) at a time: the caller keeps one group's floats,
/// e.g. to encode it into HostOffload::set_group, and the whole model never exists in fp32. The
/// safetensors files stay memory-mapped; each tensor's pages are dropped once it is read.
class CheckpointGroups : public detail::GroupReader {
 public:
  /// Opens `checkpoint_path` (a directory, an index .json or a .safetensors file) and checks
  /// every tensor against `config`; the errors are load_opt_weights'.
  CheckpointGroups(const std::filesystem::path& checkpoint_path, const OPTConfig& config)
      : detail::GroupReader(detail::open_opt_groups(checkpoint_path, config)) {}
};

/// Reads the weights of an OPT checkpoint directory (or a .safetensors / index .json path)
/// laid out for `config` into a new store. A tensor that is missing, has the wrong shape, or is
/// left over (e.g. layer 12 of a 12-layer config: the config does not match the weights) is a
/// FileError naming the file and tensor; every tensor is checked before the store is
/// allocated, so a config.json that disagrees with the weights never costs the memory its sizes
/// imply. lm_head.weight may be absent (tied) or equal to the token embedding; a different LM
/// head cannot be represented and is an error.
template <class S>
ParameterStore<S> load_opt_weights(const std::filesystem::path& checkpoint_path, const OPTConfig& config) {
  const CheckpointGroups groups(checkpoint_path, config);
  return detail::store_from_groups<S>(groups);
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

namespace detail {

/// Writes the weights `tensors` lists (in that order, groups in ascending order) into
/// `directory` with ShardedSafetensorsWriter: read_group(GroupIndex, std::span<float>) fills a
/// group's float flat buffer when its first tensor comes, and each tensor is encoded to `dtype`
/// and written before the next: one group's floats and one tensor's bytes in memory at a time.
template <class ReadGroup>
void write_hf_weights(const std::filesystem::path& directory, const ModelLayout& ml, const std::vector<HfTensor>& tensors,
                      ReadGroup&& read_group, io::Dtype dtype, std::uint64_t max_shard_bytes) {
  std::vector<io::TensorHeader> headers;
  headers.reserve(tensors.size());
  for (const HfTensor& t : tensors) headers.push_back({t.name, dtype, t.spec->shape});
  io::ShardedSafetensorsWriter writer(directory, std::move(headers), max_shard_bytes, {{"format", "pt"}});
  std::vector<float> group;
  std::optional<std::size_t> current;
  std::vector<std::byte> bytes;
  for (const HfTensor& t : tensors) {
    if (current != t.group.value) {
      group.assign(ml.layout(t.group).total_elements(), 0.0f);
      read_group(t.group, std::span<float>(group));
      current = t.group.value;
    }
    const ParamLayout& l = ml.layout(t.group);
    encode(group.data() + l.offset(t.index), t.spec->numel(), dtype, bytes);
    writer.write(t.name, bytes);
  }
  writer.finish();
}

/// Every tensor of `ml` under its name in a Hugging Face checkpoint, in the order transformers'
/// state dict lists groups (prologue, layers 0..N-1, epilogue); the family's naming functions
/// give the names (prologue_name(local), block_name(layer, local), epilogue_name(local)).
template <class PrologueName, class BlockName, class EpilogueName>
std::vector<HfTensor> hf_tensors(const ModelLayout& ml, PrologueName prologue_name, BlockName block_name,
                                 EpilogueName epilogue_name) {
  std::vector<HfTensor> out;
  auto group = [&](GroupIndex g, auto hf_name) {
    const ParamLayout& l = ml.layout(g);
    for (std::size_t r = 0; r < l.num_tensors(); ++r) out.push_back({hf_name(l.spec(r).name), g, r, &l.spec(r)});
  };
  group(ml.prologue(), prologue_name);
  for (std::size_t i = 0; i < ml.num_blocks(); ++i)
    group(ml.block(i), [&](const std::string& n) { return block_name(i, n); });
  group(ml.epilogue(), epilogue_name);
  return out;
}

inline std::vector<HfTensor> opt_hf_tensors(const ModelLayout& ml) {
  return hf_tensors(ml, hf_prologue_name, hf_block_name, hf_epilogue_name);
}

inline std::string torch_dtype_name(io::Dtype dtype) {
  return dtype == io::Dtype::F32 ? "float32" : dtype == io::Dtype::BF16 ? "bfloat16" : "float16";
}

}  // namespace detail

/// Writes `directory`/config.json and the weights (dtype F32, BF16 or F16) with transformers'
/// names ("model.decoder.*"; lm_head omitted because it is tied), so
/// OPTForCausalLM.from_pretrained(directory) loads the parameters that
/// read_group(GroupIndex, std::span<float>) yields: it fills a group's float flat buffer
/// (HostOffload::get_group, or a copy from a store), is called once per group in order, and is
/// the only source of values, so the model is never whole in memory. Weights of at most
/// `max_shard_bytes` go into model.safetensors; more into transformers' shards
/// (model-00001-of-0000n.safetensors, each at most max_shard_bytes unless one tensor is larger)
/// and model.safetensors.index.json. Each file is replaced atomically; a stale index or single
/// file that transformers (or load_opt_checkpoint) would prefer over the new files is removed.
template <class ReadGroup>
void save_hf_checkpoint_by_group(const std::filesystem::path& directory, const OPTConfig& config, const ModelLayout& ml,
                                 ReadGroup&& read_group, io::Dtype dtype = io::Dtype::F32,
                                 std::uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  if (dtype != io::Dtype::F32 && dtype != io::Dtype::BF16 && dtype != io::Dtype::F16)
    throw ConfigError("dtype", "OPT checkpoints are saved as F32, BF16 or F16, not " +
                                   std::string(io::dtype_name(dtype)));
  const ModelLayout expected = model_layout(config);
  if (ml.num_blocks() != expected.num_blocks() ||
      !(ml.layout(ml.prologue()) == expected.layout(expected.prologue())) ||
      !(ml.layout(ml.block(0)) == expected.layout(expected.block(0))) ||
      !(ml.layout(ml.epilogue()) == expected.layout(expected.epilogue())))
    throw ConfigError("config", "the parameter store was not laid out for this OPT config");

  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) throw FileError(directory.string(), "cannot create directory: " + ec.message());
  // Weights first: a config.json next to weights it does not describe is the worse half-state.
  detail::write_hf_weights(directory, ml, detail::opt_hf_tensors(ml), read_group, dtype, max_shard_bytes);
  detail::write_text_atomically(directory / "config.json", config.to_json(detail::torch_dtype_name(dtype)).dump(2) + "\n");
}

namespace detail {
/// A read_group function (save_hf_checkpoint_by_group's) over the groups of `store`, as floats.
template <class S>
auto store_group_reader(const ParameterStore<S>& store) {
  return [&store](GroupIndex g, std::span<float> flat) {
    const ParamView<const S> view = store.group(g);
    for (std::size_t i = 0; i < flat.size(); ++i) flat[i] = static_cast<float>(load(view.data()[i]));
  };
}
}  // namespace detail

/// save_hf_checkpoint_by_group from the groups of `store`.
template <class S>
void save_hf_checkpoint(const std::filesystem::path& directory, const OPTConfig& config,
                        const ParameterStore<S>& store, io::Dtype dtype = io::Dtype::F32,
                        std::uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  save_hf_checkpoint_by_group(directory, config, store.model_layout(), detail::store_group_reader(store), dtype,
                              max_shard_bytes);
}

}  // namespace zo2::opt
