#include "model_setup.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <optional>
#include <type_traits>

#include <zo2/core/error.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/io/json_file.hpp>
#include <zo2/models/llama/loader.hpp>
#include <zo2/models/opt/loader.hpp>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "fs_util.hpp"

namespace zo2_opt {

namespace fs = std::filesystem;
using zo2::llama::LlamaConfig;
using zo2::opt::OPTConfig;

namespace {

/// config.json's model_type ("" when it has none), checked before the family's reader runs.
std::string model_type_of(const fs::path& file) {
  const nlohmann::json j = zo2::io::read_json_file(file);
  if (!j.is_object()) throw zo2::FileError(file.string(), "config is not a JSON object");
  if (!j.contains("model_type") || j.at("model_type").is_null()) return "";
  if (!j.at("model_type").is_string())
    throw zo2::FileError(file.string(), "field 'model_type' must be a string, got " + zo2::io::json_brief(j.at("model_type")));
  return j.at("model_type").get<std::string>();
}

/// A checkpoint read group by group (zo2::opt::CheckpointGroups or zo2::llama::CheckpointGroups).
template <class Groups>
class CheckpointSource final : public ParameterSource {
 public:
  template <class Config>
  CheckpointSource(const fs::path& dir, const Config& config) : groups_(dir, config) {}
  const zo2::ModelLayout& model_layout() const override { return groups_.model_layout(); }
  void read_group(zo2::GroupIndex g, std::span<float> flat) const override { groups_.read_group(g, flat); }

 private:
  Groups groups_;
};

class StoreSource final : public ParameterSource {
 public:
  explicit StoreSource(zo2::ParameterStore<float> store) : store_(std::move(store)) {}
  const zo2::ModelLayout& model_layout() const override { return store_.model_layout(); }
  void read_group(zo2::GroupIndex g, std::span<float> flat) const override { store_reader(store_)(g, flat); }
  zo2::ParameterStore<float> take_store() const override { return store_; }

 private:
  zo2::ParameterStore<float> store_;
};

/// transformers' _init_weights for one group (see random_parameters).
void random_group(const ModelConfig& config, const zo2::ModelLayout& ml, std::uint64_t seed, zo2::GroupIndex group,
                  std::span<float> flat) {
  // A stream of its own (step 0xffffffff is never a training step's noise).
  constexpr std::uint32_t kInitStep = 0xffffffffu;
  const zo2::ParamLayout& layout = ml.layout(group);
  if (flat.size() != layout.total_elements())
    throw zo2::ShapeError("read_group: group " + std::to_string(group.value) + " has " +
                          std::to_string(layout.total_elements()) + " elements, the buffer " + std::to_string(flat.size()));
  std::fill(flat.begin(), flat.end(), 0.0f);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
    const std::string& name = layout.spec(r).name;
    const std::size_t n = layout.spec(r).numel();
    float* t = flat.data() + layout.offset(r);
    const bool bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    // OPT's LayerNorms (self_attn_layer_norm, ...); the LLaMA family's RMSNorms (input_layernorm,
    // q_norm, norm, ...).
    const bool norm = name.find(config.family() == Family::opt ? "layer_norm" : "norm") != std::string::npos;
    const std::uint32_t id = ml.first_tensor_id(group) + static_cast<std::uint32_t>(r);
    if (bias) continue;  // zeros, as filled
    if (norm) {
      std::fill(t, t + n, 1.0f);
      continue;
    }
    // Counter-based draws: chunks on all cores give the same values as one loop (a 30B
    // model's start-up is this loop). One Philox call yields four consecutive normals
    // (normal_at(j) is normal4(j / 4).z[j % 4]), so each quad is drawn once: 4x fewer calls.
    constexpr std::size_t kChunk = std::size_t{1} << 20;  // a multiple of 4: chunks hold whole quads
    zo2::parallel_for((n + kChunk - 1) / kChunk, [&](std::size_t c) {
      const std::size_t end = std::min(n, (c + 1) * kChunk);
      for (std::size_t j = c * kChunk; j < end; j += 4) {
        const auto quad = zo2::normal4(seed, kInitStep, id, j / 4);
        for (std::size_t k = 0; k < 4 && j + k < end; ++k) t[j + k] = 0.02f * quad.z[k];
      }
    });
  }
}

class RandomSource final : public ParameterSource {
 public:
  RandomSource(ModelConfig config, std::uint64_t seed)
      : config_(std::move(config)), layout_(zo2_opt::model_layout(config_)), seed_(seed) {}
  const zo2::ModelLayout& model_layout() const override { return layout_; }
  void read_group(zo2::GroupIndex g, std::span<float> flat) const override {
    random_group(config_, layout_, seed_, g, flat);
  }
  zo2::ParameterStore<float> take_store() const override { return random_parameters(config_, seed_); }

 private:
  ModelConfig config_;
  zo2::ModelLayout layout_;
  std::uint64_t seed_;
};

}  // namespace

zo2::ParameterStore<float> ParameterSource::take_store() const {
  zo2::ParameterStore<float> store(model_layout());
  for (std::size_t g = 0; g < store.num_groups(); ++g) {
    auto view = store.group(zo2::GroupIndex{g});
    read_group(zo2::GroupIndex{g}, std::span<float>(view.data(), view.layout().total_elements()));
  }
  return store;
}

std::unique_ptr<ParameterSource> store_source(zo2::ParameterStore<float> store) {
  return std::make_unique<StoreSource>(std::move(store));
}

std::unique_ptr<ParameterSource> random_source(const ModelConfig& config, std::uint64_t seed) {
  return std::make_unique<RandomSource>(config, seed);
}

GroupReader store_reader(const zo2::ParameterStore<float>& store) {
  return [&store](zo2::GroupIndex g, std::span<float> flat) {
    const auto view = store.group(g);
    if (flat.size() != view.layout().total_elements())
      throw zo2::ShapeError("read_group: group " + std::to_string(g.value) + " has " +
                            std::to_string(view.layout().total_elements()) + " elements, the buffer " +
                            std::to_string(flat.size()));
    std::copy(view.data(), view.data() + flat.size(), flat.begin());
  };
}

std::uint64_t max_shard_bytes() {
  const char* env = std::getenv("ZO2_OPT_MAX_SHARD_BYTES");
  if (env == nullptr || *env == '\0') return zo2::io::kDefaultMaxShardBytes;
  const std::string text(env);
  if (text.size() > 19 || text.find_first_not_of("0123456789") != std::string::npos || std::stoull(text) == 0)
    throw UsageError("ZO2_OPT_MAX_SHARD_BYTES must be a positive byte count, got '" + text + "'");
  return std::stoull(text);
}

LoadedModel load_model_dir(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw zo2::FileError(dir.string(), "no such model directory");
  if (!fs::exists(dir / "config.json"))
    throw zo2::FileError((dir / "config.json").string(), "missing (a model directory needs config.json and model.safetensors)");
  if (!fs::exists(dir / "model.safetensors") && !fs::exists(dir / "model.safetensors.index.json"))
    throw zo2::FileError((dir / "model.safetensors").string(),
                         "missing (a model directory needs config.json and model.safetensors or model.safetensors.index.json)");
  const std::string model_type = model_type_of(dir / "config.json");
  const std::optional<Family> family = family_of_model_type(model_type);
  if (!family)
    throw zo2::FileError((dir / "config.json").string(), "field 'model_type' is '" + model_type +
                                                             "', which zo2 does not support (" +
                                                             supported_model_types_text() + ")");
  // Every tensor is checked now; the weights are read when the engine takes them, group by group.
  auto with_tokenizer = [&](auto config, auto groups) {
    std::optional<Tokenizer> tokenizer;
    if (Tokenizer::present_in(dir)) tokenizer = Tokenizer::from_directory(dir);
    return LoadedModel{ModelConfig(std::move(config)), std::move(groups), std::move(tokenizer), dir.string()};
  };
  if (*family == Family::llama) {
    LlamaConfig config = LlamaConfig::from_json_file(dir / "config.json");
    auto groups = std::make_unique<CheckpointSource<zo2::llama::CheckpointGroups>>(dir, config);
    return with_tokenizer(std::move(config), std::move(groups));
  }
  OPTConfig config = OPTConfig::from_json_file(dir / "config.json");
  auto groups = std::make_unique<CheckpointSource<zo2::opt::CheckpointGroups>>(dir, config);
  return with_tokenizer(std::move(config), std::move(groups));
}

OPTConfig demo_config() {
  OPTConfig c;
  c.hidden_size = 64;
  c.ffn_dim = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.word_embed_proj_dim = 64;
  c.vocab_size = Tokenizer::kByteVocabSize;
  c.max_position_embeddings = 256;
  return c;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names = {"demo"};
  for (const auto& n : OPTConfig::preset_names()) names.push_back(n);
  for (const auto& n : LlamaConfig::preset_names()) names.push_back(n);
  return names;
}

namespace {

bool is_llama_preset(const std::string& name) {
  for (const auto& n : LlamaConfig::preset_names())
    if (n == name) return true;
  return false;
}

OPTConfig opt_preset_config(const std::string& name, std::int64_t layers, std::int64_t hidden, std::int64_t heads,
                            std::int64_t vocab_size) {
  OPTConfig c = name == "demo" ? demo_config() : OPTConfig::preset(name);
  // The flag each overridden field comes from, for the message when validate() rejects it.
  auto flag_of = [](const std::string& field) -> std::string {
    if (field == "num_hidden_layers") return "--layers";
    if (field == "hidden_size" || field == "ffn_dim" || field == "word_embed_proj_dim") return "--hidden";
    if (field == "num_attention_heads") return "--heads";
    if (field == "vocab_size") return "--vocab-size";
    return "";
  };
  if (hidden > OPTConfig::kMaxHiddenSize)  // before ffn_dim = 4 * hidden is computed
    throw UsageError("--hidden " + std::to_string(hidden) + " is too large: the most is " +
                     std::to_string(OPTConfig::kMaxHiddenSize));
  if (layers > 0) c.num_hidden_layers = layers;
  if (hidden > 0) {
    const bool projected = c.has_projection();
    c.hidden_size = hidden;
    c.ffn_dim = 4 * hidden;
    if (!projected) c.word_embed_proj_dim = hidden;
    if (heads <= 0 && hidden % c.num_attention_heads != 0)
      c.num_attention_heads = hidden % 64 == 0 ? hidden / 64 : (hidden % 4 == 0 ? 4 : 1);
  }
  if (heads > 0) c.num_attention_heads = heads;
  if (vocab_size > 0) c.vocab_size = vocab_size;
  try {
    c.validate();
  } catch (const zo2::ConfigError& e) {
    const std::string flag = flag_of(e.field());
    throw UsageError((flag.empty() ? std::string() : flag + ": ") + "model overrides give an invalid config: " + e.what());
  }
  return c;
}

LlamaConfig llama_preset_config(const std::string& name, std::int64_t layers, std::int64_t hidden, std::int64_t heads,
                                std::int64_t vocab_size) {
  LlamaConfig c = LlamaConfig::preset(name);
  auto flag_of = [](const std::string& field) -> std::string {
    if (field == "num_hidden_layers") return "--layers";
    if (field == "hidden_size" || field == "intermediate_size") return "--hidden";
    if (field == "num_attention_heads" || field == "num_key_value_heads") return "--heads";
    if (field == "head_dim") return "--hidden/--heads";
    if (field == "vocab_size") return "--vocab-size";
    return "";
  };
  // Before hidden x the preset's FFN ratio, or hidden / heads, is computed.
  if (hidden > LlamaConfig::kMaxHiddenSize)
    throw UsageError("--hidden " + std::to_string(hidden) + " is too large: the most is " +
                     std::to_string(LlamaConfig::kMaxHiddenSize));
  if (heads > LlamaConfig::kMaxHeads)
    throw UsageError("--heads " + std::to_string(heads) + " is too large: the most is " +
                     std::to_string(LlamaConfig::kMaxHeads));
  if (layers > 0) c.num_hidden_layers = layers;
  if (hidden > 0 || heads > 0) {
    const std::int64_t h = hidden > 0 ? hidden : c.hidden_size;
    // Without --heads: the preset's head width where it divides the new hidden size, else as OPT picks.
    const std::int64_t n = heads > 0 ? heads
                           : h % c.head_dim == 0 ? h / c.head_dim
                           : h % 64 == 0         ? h / 64
                           : h % 4 == 0          ? 4
                                                 : 1;
    if (h % n != 0)
      throw UsageError("--heads " + std::to_string(n) + " does not divide the hidden size " + std::to_string(h) +
                       " (head_dim = hidden / heads)");
    const std::int64_t group = c.num_attention_heads / c.num_key_value_heads;  // queries per key/value head
    if (hidden > 0) c.intermediate_size = std::max<std::int64_t>(1, h * c.intermediate_size / c.hidden_size);
    c.hidden_size = h;
    c.num_attention_heads = n;
    c.num_key_value_heads = n % group == 0 ? n / group : n;
    c.head_dim = h / n;
  }
  if (vocab_size > 0) {
    c.vocab_size = vocab_size;
    // The preset's special ids belong to its own vocabulary: those outside the new one go.
    if (c.bos_token_id >= vocab_size) c.bos_token_id = -1;
    if (c.pad_token_id >= vocab_size) c.pad_token_id = -1;
    std::erase_if(c.eos_token_ids, [&](std::int64_t id) { return id >= vocab_size; });
  }
  try {
    c.validate();
  } catch (const zo2::ConfigError& e) {
    const std::string flag = flag_of(e.field());
    throw UsageError((flag.empty() ? std::string() : flag + ": ") + "model overrides give an invalid config: " + e.what());
  }
  return c;
}

}  // namespace

ModelConfig preset_config(const std::string& name, std::int64_t layers, std::int64_t hidden, std::int64_t heads,
                          std::int64_t vocab_size) {
  if (is_llama_preset(name)) return llama_preset_config(name, layers, hidden, heads, vocab_size);
  bool known = name == "demo";
  for (const auto& n : OPTConfig::preset_names()) known = known || n == name;
  if (!known) {
    std::string valid;
    for (const auto& n : preset_names()) valid += (valid.empty() ? "" : ", ") + n;
    throw UsageError("--preset: unknown preset '" + name + "' (valid: " + valid + ")");
  }
  return opt_preset_config(name, layers, hidden, heads, vocab_size);
}

zo2::ModelLayout model_layout(const ModelConfig& config) {
  return config.visit([](const auto& c) {
    if constexpr (std::is_same_v<std::decay_t<decltype(c)>, OPTConfig>) return zo2::opt::model_layout(c);
    else return zo2::llama::model_layout(c);
  });
}

zo2::ParameterStore<float> random_parameters(const ModelConfig& config, std::uint64_t seed) {
  // A config inside the family's bounds can still ask for more memory than the machine has:
  // say so with the size rather than fail in the allocator.
  const zo2::ModelLayout layout = model_layout(config);
  const double gib = static_cast<double>(layout.total_elements()) * sizeof(float) / (1024.0 * 1024.0 * 1024.0);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  const double memory_gib = pages > 0 && page_size > 0
                                ? static_cast<double>(pages) * static_cast<double>(page_size) / (1024.0 * 1024.0 * 1024.0)
                                : 0.0;
  auto too_large = [&] {
    char what[320];
    std::snprintf(what, sizeof what,
                  "the model's %zu parameters need %.1f GiB of host memory as fp32, more than this machine %s: "
                  "choose a smaller --preset, --layers or --hidden",
                  config.parameter_count(), gib,
                  memory_gib > 0 ? ("has (" + std::to_string(static_cast<long long>(memory_gib)) + " GiB)").c_str()
                                 : "can allocate");
    return zo2::Error(what);
  };
  if (memory_gib > 0 && gib > memory_gib) throw too_large();
  std::optional<zo2::ParameterStore<float>> allocated;
  try {
    allocated.emplace(layout);
  } catch (const std::bad_alloc&) {
    throw too_large();
  }
  zo2::ParameterStore<float>& store = *allocated;
  const zo2::ModelLayout& ml = store.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto view = store.group(zo2::GroupIndex{g});
    random_group(config, ml, seed, zo2::GroupIndex{g}, std::span<float>(view.data(), view.layout().total_elements()));
  }
  return std::move(store);
}

void export_model(const fs::path& dir, const ModelConfig& config, const zo2::ModelLayout& layout,
                  const GroupReader& read_group, const Tokenizer* tokenizer,
                  const std::function<void(const fs::path&)>& write_extra) {
  const std::uint64_t shard_limit = max_shard_bytes();
  const fs::path target = fs::absolute(dir).lexically_normal();
  const fs::path parent = target.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw zo2::FileError(parent.string(), "cannot create directory: " + ec.message());
  const fs::path staging = parent / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()));
  fs::remove_all(staging, ec);
  try {
    fs::create_directories(staging);
    // The family's writer: config.json (a loaded LLaMA model's own, dtype updated) + the weights,
    // one group at a time.
    config.visit([&](const auto& c) {
      if constexpr (std::is_same_v<std::decay_t<decltype(c)>, OPTConfig>)
        zo2::opt::save_hf_checkpoint_by_group(staging, c, layout, read_group, zo2::io::Dtype::F32, shard_limit);
      else
        zo2::llama::save_hf_checkpoint_by_group(staging, c, layout, read_group, zo2::io::Dtype::F32, shard_limit);
    });
    if (tokenizer) tokenizer->save(staging);
    if (write_extra) write_extra(staging);
    publish_directory(staging, target);
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
}

void export_model(const fs::path& dir, const ModelConfig& config, const zo2::ParameterStore<float>& store,
                  const Tokenizer* tokenizer, const std::function<void(const fs::path&)>& write_extra) {
  export_model(dir, config, store.model_layout(), store_reader(store), tokenizer, write_extra);
}

}  // namespace zo2_opt
