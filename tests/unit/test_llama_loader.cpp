// LLaMA-family config.json parsing (every model type's defaults, rope_parameters and the older
// rope_scaling, errors naming the field), checkpoint loading (single file, sharded, prefixes,
// tied and untied heads, bf16/fp16/fp32) with errors naming the file and tensor, and
// save_hf_checkpoint round trips.
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/models/llama/llama.hpp>

namespace {

namespace fs = std::filesystem;
using zo2::llama::LlamaConfig;

const std::vector<std::string> kFixtures = {"llama_gqa",       "llama_mqa_tied_bf16", "llama3_rope_bf16",
                                            "qwen2_bias_bf16", "qwen3_qknorm_fp16",   "mistral_window"};

fs::path fixture(const std::string& name) {
  const char* env = std::getenv("ZO2_TEST_DATA_DIR");
  return fs::path(env ? env : ZO2_TEST_DATA_DIR) / "llama" / name;
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_llama_loader_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
  fs::path sub(const std::string& name) const {
    fs::create_directories(path / name);
    return path / name;
  }
};

/// Copies a fixture checkpoint into `dir`, passing each tensor name through `rename` (nullopt
/// drops the tensor) and letting `extra` add tensors; config.json through `edit_config`.
void rewrite_checkpoint(const std::string& source, const fs::path& dir,
                        const std::function<std::optional<std::string>(const std::string&)>& rename,
                        const std::function<void(nlohmann::json&)>& edit_config = {},
                        std::vector<zo2::io::TensorToWrite> extra = {}) {
  const auto file = zo2::io::SafetensorsFile::open(fixture(source) / "model.safetensors");
  std::vector<zo2::io::TensorToWrite> tensors;
  for (const auto& e : file.entries())
    if (auto name = rename(e.name)) tensors.push_back({*name, e.dtype, e.shape, e.bytes.data()});
  for (auto& t : extra) tensors.push_back(t);
  zo2::io::write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  nlohmann::json config = read_json(fixture(source) / "config.json");
  if (edit_config) edit_config(config);
  std::ofstream(dir / "config.json") << config.dump(2);
}

std::optional<std::string> keep(const std::string& name) { return name; }

/// The config of `fixture` with `edit` applied to its JSON.
LlamaConfig edited(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = read_json(fixture(name) / "config.json");
  edit(j);
  return LlamaConfig::from_json(j, "edited/config.json");
}

/// Whether `fn` throws a ConfigError naming `field`, with the origin in the message.
void check_config_error(const std::string& name, const std::function<void(nlohmann::json&)>& edit,
                        const std::string& field, const std::string& text = "") {
  CAPTURE(field);
  try {
    edited(name, edit);
    FAIL("no error for field " << field);
  } catch (const zo2::ConfigError& e) {
    CHECK(e.field() == field);
    CHECK(std::string(e.what()).find("edited/config.json") != std::string::npos);
    if (!text.empty()) CHECK(std::string(e.what()).find(text) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("config.json of every fixture: the model type's fields and defaults") {
  const LlamaConfig qwen3 = LlamaConfig::from_json_file(fixture("qwen3_qknorm_fp16") / "config.json");
  CHECK(qwen3.model_type == "qwen3");
  CHECK(qwen3.head_dim == 16);
  CHECK(qwen3.q_width() == 64);
  CHECK(qwen3.kv_width() == 32);
  CHECK(qwen3.rope.theta == 1000000.0);
  CHECK(qwen3.layer_window(0) == 0);
  CHECK(qwen3.eos_token_ids == std::vector<std::int64_t>{2});

  // Without head_dim: Qwen3's default is 128; the other types divide hidden by heads.
  CHECK(edited("qwen3_qknorm_fp16", [](nlohmann::json& j) { j.erase("head_dim"); }).head_dim == 128);
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j.erase("head_dim"); }).head_dim == 8);
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j["head_dim"] = nullptr; }).head_dim == 8);
  // Without num_key_value_heads: as many as the heads (Mistral: 8).
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j.erase("num_key_value_heads"); }).num_key_value_heads == 4);
  CHECK(edited("mistral_window", [](nlohmann::json& j) {
          j.erase("num_key_value_heads");
          j["num_attention_heads"] = 8;
        }).num_key_value_heads == 8);
  // Qwen2 keeps the window only with use_sliding_window; layer_types may be derived.
  const LlamaConfig qwen2 = LlamaConfig::from_json_file(fixture("qwen2_bias_bf16") / "config.json");
  CHECK(qwen2.layer_window(1) == 6);
  const LlamaConfig derived = edited("qwen2_bias_bf16", [](nlohmann::json& j) { j.erase("layer_types"); });
  CHECK(derived.layer_window(0) == 0);
  CHECK(derived.layer_window(1) == 6);
  const LlamaConfig off = edited("qwen2_bias_bf16", [](nlohmann::json& j) {
    j.erase("layer_types");
    j["use_sliding_window"] = false;
  });
  CHECK(off.layer_window(1) == 0);
  // Mistral: sliding_window null means none; Llama ignores a sliding_window field.
  CHECK(edited("mistral_window", [](nlohmann::json& j) { j["sliding_window"] = nullptr; }).layer_window(0) == 0);
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j["sliding_window"] = 4; }).layer_window(0) == 0);
  // eos_token_id may be a list (Llama 3).
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j["eos_token_id"] = {2, 3}; }).eos_token_ids ==
        std::vector<std::int64_t>{2, 3});
  // qwen2's q/k/v biases do not depend on attention_bias (transformers hard-codes them).
  CHECK(edited("qwen2_bias_bf16", [](nlohmann::json& j) { j["attention_bias"] = false; }).qkv_bias());
}

TEST_CASE("rope_scaling + rope_theta (transformers 4) read as rope_parameters (transformers 5)") {
  const LlamaConfig v5 = LlamaConfig::from_json_file(fixture("llama3_rope_bf16") / "config.json");
  CHECK(v5.rope.type == "llama3");
  CHECK(v5.rope.factor == 8.0);
  CHECK(v5.rope.low_freq_factor == 1.0);
  CHECK(v5.rope.high_freq_factor == 4.0);
  CHECK(v5.rope.original_max_position_embeddings == 64);
  const LlamaConfig v4 = edited("llama3_rope_bf16", [](nlohmann::json& j) {
    nlohmann::json scaling = j["rope_parameters"];
    j["rope_theta"] = scaling["rope_theta"];
    scaling.erase("rope_theta");
    scaling.erase("rope_type");
    scaling["type"] = "llama3";  // the oldest spelling
    j.erase("rope_parameters");
    j["rope_scaling"] = scaling;
  });
  CHECK(v4 == v5);
  CHECK(v4.rope_inv_freq() == v5.rope_inv_freq());
  // rope_scaling wins over rope_parameters when both are there, as in transformers.
  const LlamaConfig both = edited("llama_gqa", [](nlohmann::json& j) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}};
  });
  CHECK(both.rope.type == "linear");
  CHECK(both.rope.factor == 4.0);
  CHECK(both.rope.theta == 10000.0);
  // A null or empty rope_scaling is no scaling; original_max_position_embeddings beside the rope
  // dict (Phi-3 style) takes precedence; absent, it is max_position_embeddings.
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = nullptr; }).rope.type == "default");
  CHECK(edited("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = nlohmann::json::object(); }).rope.type ==
        "default");
  CHECK(edited("llama3_rope_bf16", [](nlohmann::json& j) { j["original_max_position_embeddings"] = 32; })
            .rope.original_max_position_embeddings == 32);
  CHECK(edited("llama3_rope_bf16", [](nlohmann::json& j) { j["rope_parameters"].erase("original_max_position_embeddings"); })
            .rope.original_max_position_embeddings == 256);
  // No rope field at all: theta 10000, default type.
  const LlamaConfig bare = edited("llama_gqa", [](nlohmann::json& j) { j.erase("rope_parameters"); });
  CHECK(bare.rope == zo2::llama::RopeConfig{});
}

TEST_CASE("config.json errors are ConfigErrors naming the field") {
  check_config_error("llama3_rope_bf16", [](nlohmann::json& j) { j["rope_parameters"]["rope_type"] = "yarn"; },
                     "rope_parameters", "'yarn'");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}}; },
                     "rope_scaling", "'dynamic'");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = {{"rope_type", "longrope"}}; },
                     "rope_scaling", "not supported");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = "linear"; }, "rope_scaling");
  check_config_error("llama3_rope_bf16", [](nlohmann::json& j) { j["rope_parameters"].erase("low_freq_factor"); },
                     "rope_parameters.low_freq_factor", "missing");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_scaling"] = {{"rope_type", "linear"}}; },
                     "rope_scaling.factor", "missing");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_parameters"]["rope_theta"] = "big"; },
                     "rope_parameters.rope_theta");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rope_parameters"]["rope_theta"] = -1; }, "rope_theta");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["partial_rotary_factor"] = 0.5; }, "partial_rotary_factor");
  check_config_error("llama_gqa",
                     [](nlohmann::json& j) {
                       j["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}}}};
                     },
                     "rope_parameters", "per-layer");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j.erase("hidden_size"); }, "hidden_size", "missing");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["intermediate_size"] = "64"; }, "intermediate_size");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["num_hidden_layers"] = 0; }, "num_hidden_layers");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["vocab_size"] = std::int64_t{1} << 40; }, "vocab_size");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["num_key_value_heads"] = 3; }, "num_key_value_heads");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["head_dim"] = 7; }, "head_dim");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["hidden_act"] = "gelu"; }, "hidden_act", "'gelu'");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["rms_norm_eps"] = 0; }, "rms_norm_eps");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["model_type"] = "gpt2"; }, "model_type", "'gpt2'");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j.erase("model_type"); }, "model_type", "missing");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["tie_word_embeddings"] = 1; }, "tie_word_embeddings");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["quantization_config"] = {{"bits", 4}}; },
                     "quantization_config");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["bos_token_id"] = 500; }, "bos_token_id");
  check_config_error("llama_gqa", [](nlohmann::json& j) { j["eos_token_id"] = {2, "x"}; }, "eos_token_id");
  check_config_error("mistral_window", [](nlohmann::json& j) { j["sliding_window"] = 0; }, "sliding_window");
  check_config_error("qwen2_bias_bf16", [](nlohmann::json& j) { j["layer_types"] = {"full_attention"}; },
                     "layer_types", "num_hidden_layers");
  check_config_error("qwen2_bias_bf16", [](nlohmann::json& j) { j["layer_types"][0] = "chunked_attention"; },
                     "layer_types", "chunked_attention");
  check_config_error("qwen2_bias_bf16", [](nlohmann::json& j) { j["use_sliding_window"] = false; }, "layer_types",
                     "use_sliding_window");

  // An unreadable or non-JSON file is a FileError naming it.
  TempDir tmp;
  const fs::path bad = tmp.sub("bad") / "config.json";
  std::ofstream(bad) << "{ not json";
  CHECK_THROWS_WITH_AS(LlamaConfig::from_json_file(bad), doctest::Contains("bad/config.json"), zo2::FileError);
  CHECK_THROWS_AS(LlamaConfig::from_json_file(tmp.path / "absent.json"), zo2::FileError);
}

TEST_CASE("Presets have the published parameter counts") {
  struct Known {
    const char* name;
    std::size_t parameters;
  };
  // transformers' model.num_parameters() of each architecture (tied heads counted once).
  for (const Known k : {Known{"llama-3.2-1b", 1235814400}, Known{"llama-3-8b", 8030261248},
                        Known{"mistral-7b", 7241732096}, Known{"qwen2.5-7b", 7615616512},
                        Known{"qwen3-8b", 8190735360}, Known{"qwen3-32b", 32762123264}}) {
    CAPTURE(k.name);
    const LlamaConfig c = LlamaConfig::preset(k.name);
    CHECK(zo2::llama::parameter_count(c) == k.parameters);
    // A preset's config.json reads back as the same config.
    CHECK(LlamaConfig::from_json(c.to_json(), "preset") == c);
  }
  CHECK_THROWS_WITH_AS(LlamaConfig::preset("llama-9"), doctest::Contains("llama-3-8b"), zo2::ConfigError);
}

TEST_CASE("A sharded checkpoint loads to the same store as the single file") {
  const auto single = zo2::llama::load_llama_checkpoint<float>(fixture("qwen2_bias_bf16"));
  const auto sharded = zo2::llama::load_llama_checkpoint<float>(fixture("qwen2_bias_bf16_sharded"));
  CHECK(single.config == sharded.config);
  CHECK(single.store == sharded.store);
  CHECK(zo2::io::SafetensorsCheckpoint::open(fixture("qwen2_bias_bf16_sharded")).shards().size() > 1);
}

TEST_CASE("bf16 and fp16 checkpoints load exactly into bf16, fp16 and float stores") {
  for (const std::string name : {"llama_mqa_tied_bf16", "qwen3_qknorm_fp16"}) {
    CAPTURE(name);
    const auto f32 = zo2::llama::load_llama_checkpoint<float>(fixture(name));
    const auto b16 = zo2::llama::load_llama_checkpoint<zo2::bfloat16>(fixture(name));
    const auto h16 = zo2::llama::load_llama_checkpoint<zo2::float16>(fixture(name));
    const auto& ml = f32.store.model_layout();
    std::size_t mismatches = 0;
    const bool is_bf16 = name.find("bf16") != std::string::npos;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const auto a = f32.store.group(zo2::GroupIndex{g});
      const auto b = b16.store.group(zo2::GroupIndex{g});
      const auto h = h16.store.group(zo2::GroupIndex{g});
      for (std::size_t r = 0; r < a.layout().num_tensors(); ++r)
        for (std::size_t j = 0; j < a.numel(r); ++j) {
          if (is_bf16) mismatches += zo2::load(b.tensor(r)[j]) != a.tensor(r)[j];
          else mismatches += zo2::load(h.tensor(r)[j]) != a.tensor(r)[j];
        }
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("Checkpoint tensor names are accepted with or without the model. prefix") {
  TempDir tmp;
  for (const std::string name : {"llama_gqa", "llama_mqa_tied_bf16"}) {
    CAPTURE(name);
    const auto reference = zo2::llama::load_llama_checkpoint<float>(fixture(name));
    const fs::path bare = tmp.sub(name + "_bare");
    rewrite_checkpoint(name, bare, [](const std::string& n) -> std::optional<std::string> {
      return n.rfind("model.", 0) == 0 ? n.substr(6) : n;
    });
    CHECK(zo2::llama::load_llama_checkpoint<float>(bare).store == reference.store);
  }
}

TEST_CASE("Tied and untied LM heads: presence, equality, the config's word") {
  TempDir tmp;
  const auto file = zo2::io::SafetensorsFile::open(fixture("llama_mqa_tied_bf16") / "model.safetensors");
  const auto& embed = file.entry("model.embed_tokens.weight");
  CHECK_FALSE(file.contains("lm_head.weight"));  // transformers 5 drops a tied head on save

  // A tied config beside a stored head equal to the embedding: accepted.
  const fs::path tied = tmp.sub("tied");
  rewrite_checkpoint("llama_mqa_tied_bf16", tied, keep, {},
                     {{"lm_head.weight", embed.dtype, embed.shape, embed.bytes.data()}});
  CHECK(zo2::llama::load_llama_checkpoint<float>(tied).store ==
        zo2::llama::load_llama_checkpoint<float>(fixture("llama_mqa_tied_bf16")).store);

  // ... but not a different one.
  std::vector<float> other = file.read_as_float("model.embed_tokens.weight");
  other[17] += 1.0f;
  const fs::path differs = tmp.sub("differs");
  rewrite_checkpoint("llama_mqa_tied_bf16", differs, keep, {},
                     {{"lm_head.weight", zo2::io::Dtype::F32, embed.shape, other.data()}});
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(differs),
                       doctest::Contains("'lm_head.weight' differs"), zo2::FileError);

  // An untied config needs the head.
  const fs::path headless = tmp.sub("headless");
  rewrite_checkpoint("llama_mqa_tied_bf16", headless, keep,
                     [](nlohmann::json& c) { c["tie_word_embeddings"] = false; });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(headless),
                       doctest::Contains("missing tensor 'lm_head.weight'"), zo2::FileError);

  // A tied config over an untied checkpoint: the head is left over.
  const fs::path untied_weights = tmp.sub("untied_weights");
  rewrite_checkpoint("llama_gqa", untied_weights, keep, [](nlohmann::json& c) { c["tie_word_embeddings"] = true; });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(untied_weights),
                       doctest::Contains("'lm_head.weight' differs"), zo2::FileError);
}

TEST_CASE("A missing tensor, a wrong shape or a left-over tensor names the file and the tensor") {
  TempDir tmp;
  const fs::path missing = tmp.sub("missing");
  rewrite_checkpoint("qwen3_qknorm_fp16", missing, [](const std::string& n) -> std::optional<std::string> {
    if (n == "model.layers.1.self_attn.k_norm.weight") return std::nullopt;
    return n;
  });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(missing),
                       doctest::Contains("missing tensor 'model.layers.1.self_attn.k_norm.weight'"), zo2::FileError);
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(missing), doctest::Contains("missing/model.safetensors"),
                       zo2::FileError);

  const fs::path shape = tmp.sub("shape");
  rewrite_checkpoint("llama_gqa", shape, keep, [](nlohmann::json& c) { c["intermediate_size"] = 40; });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(shape),
                       doctest::Contains("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [48, 32], "
                                         "config.json implies [40, 32]"),
                       zo2::FileError);
  // Grouped-query attention: the kv width comes from num_key_value_heads.
  const fs::path kv = tmp.sub("kv");
  rewrite_checkpoint("llama_gqa", kv, keep, [](nlohmann::json& c) { c["num_key_value_heads"] = 4; });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(kv),
                       doctest::Contains("'model.layers.0.self_attn.k_proj.weight' has shape [16, 32]"), zo2::FileError);

  const fs::path extra_layer = tmp.sub("extra_layer");
  rewrite_checkpoint("llama_gqa", extra_layer, keep, [](nlohmann::json& c) { c["num_hidden_layers"] = 1; });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(extra_layer),
                       doctest::Contains("unexpected tensor 'model.layers.1."), zo2::FileError);

  // Qwen2 weights read as Mistral: the q/k/v biases are left over.
  const fs::path biases = tmp.sub("biases");
  rewrite_checkpoint("qwen2_bias_bf16", biases, keep, [](nlohmann::json& c) {
    c["model_type"] = "mistral";
    c["sliding_window"] = nullptr;
  });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(biases), doctest::Contains("_proj.bias'"),
                       zo2::FileError);

  // Rotary inv_freq buffers of older exports are not weights: ignored.
  const fs::path inv_freq = tmp.sub("inv_freq");
  std::vector<float> freqs(4, 1.0f);
  rewrite_checkpoint("llama_gqa", inv_freq, keep, {},
                     {{"model.layers.0.self_attn.rotary_emb.inv_freq", zo2::io::Dtype::F32, {4}, freqs.data()}});
  CHECK(zo2::llama::load_llama_checkpoint<float>(inv_freq).store ==
        zo2::llama::load_llama_checkpoint<float>(fixture("llama_gqa")).store);

  // An integer tensor where a weight belongs names the tensor and its dtype.
  const fs::path ints = tmp.sub("ints");
  const auto file = zo2::io::SafetensorsFile::open(fixture("llama_gqa") / "model.safetensors");
  const auto& norm = file.entry("model.norm.weight");
  rewrite_checkpoint(
      "llama_gqa", ints,
      [](const std::string& n) -> std::optional<std::string> {
        if (n == "model.norm.weight") return std::nullopt;
        return n;
      },
      {}, {{"model.norm.weight", zo2::io::Dtype::I32, norm.shape, norm.bytes.data()}});
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(ints), doctest::Contains("'model.norm.weight' has dtype I32"),
                       zo2::FileError);

  // A sharded checkpoint names the shard that holds the bad tensor.
  CHECK_THROWS_WITH_AS(
      [] {
        LlamaConfig c = LlamaConfig::from_json_file(fixture("qwen2_bias_bf16_sharded") / "config.json");
        c.intermediate_size = 40;
        zo2::llama::load_llama_weights<float>(fixture("qwen2_bias_bf16_sharded"), c);
      }(),
      doctest::Contains("model-0000"), zo2::FileError);

  // A config that wants far more memory than the weights hold fails on the check, not on allocation.
  const fs::path huge = tmp.sub("huge");
  rewrite_checkpoint("llama_gqa", huge, keep, [](nlohmann::json& c) {
    c["vocab_size"] = 1 << 22;
    c["hidden_size"] = 1 << 14;
    c["head_dim"] = 8;
  });
  CHECK_THROWS_WITH_AS(zo2::llama::load_llama_checkpoint<float>(huge), doctest::Contains("embed_tokens.weight"),
                       zo2::FileError);
}

TEST_CASE("save_hf_checkpoint round trips in F32, BF16 and F16 and keeps config.json") {
  TempDir tmp;
  for (const std::string& name : kFixtures) {
    CAPTURE(name);
    const auto original = zo2::llama::load_llama_checkpoint<float>(fixture(name));

    const fs::path f32 = tmp.path / (name + "_f32");
    zo2::llama::save_hf_checkpoint(f32, original.config, original.store);
    const auto back = zo2::llama::load_llama_checkpoint<float>(f32);
    CHECK(back.config == original.config);
    CHECK(back.store == original.store);
    const auto file = zo2::io::SafetensorsFile::open(f32 / "model.safetensors");
    CHECK(file.metadata().at("format") == "pt");
    CHECK(file.contains("model.embed_tokens.weight"));
    CHECK(file.contains("lm_head.weight") == !original.config.tie_word_embeddings);
    CHECK(file.entry("model.layers.1.mlp.down_proj.weight").dtype == zo2::io::Dtype::F32);
    // Every tensor of the source checkpoint, under the same name and shape.
    const auto source = zo2::io::SafetensorsCheckpoint::open(fixture(name));
    CHECK(file.names().size() == source.names().size());
    for (const std::string& tensor : source.names()) {
      CAPTURE(tensor);
      REQUIRE(file.contains(tensor));
      CHECK(file.entry(tensor).shape == source.entry(tensor).shape);
    }
    // config.json is the one read, with the dtype of the weights written.
    nlohmann::json written = read_json(f32 / "config.json"), given = read_json(fixture(name) / "config.json");
    CHECK(written.at("dtype") == "float32");
    written.erase("dtype");
    given.erase("dtype");
    CHECK(written == given);

    // BF16 / F16 on disk: the store rounded to nearest, element by element; the fixtures stored
    // in that dtype come back bit for bit.
    const bool is_bf16 = name.find("bf16") != std::string::npos, is_fp16 = name.find("fp16") != std::string::npos;
    const fs::path b16 = tmp.path / (name + "_bf16");
    zo2::llama::save_hf_checkpoint(b16, original.config, original.store, zo2::io::Dtype::BF16);
    const auto back16 = zo2::llama::load_llama_checkpoint<zo2::bfloat16>(b16);
    CHECK(read_json(b16 / "config.json").at("dtype") == "bfloat16");
    const fs::path h16 = tmp.path / (name + "_fp16");
    zo2::llama::save_hf_checkpoint(h16, original.config, original.store, zo2::io::Dtype::F16);
    const auto backh = zo2::llama::load_llama_checkpoint<zo2::float16>(h16);
    const auto& ml = original.store.model_layout();
    std::size_t mismatches = 0;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const auto a = original.store.group(zo2::GroupIndex{g});
      const auto b = back16.store.group(zo2::GroupIndex{g});
      const auto h = backh.store.group(zo2::GroupIndex{g});
      for (std::size_t r = 0; r < a.layout().num_tensors(); ++r)
        for (std::size_t j = 0; j < a.numel(r); ++j) {
          mismatches += zo2::to_bfloat16(a.tensor(r)[j]).bits != b.tensor(r)[j].bits;
          if (is_bf16) mismatches += zo2::load(b.tensor(r)[j]) != a.tensor(r)[j];
          if (is_fp16) mismatches += zo2::load(h.tensor(r)[j]) != a.tensor(r)[j];
        }
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("save_hf_checkpoint replaces a stale index and rejects a bad dtype or a foreign store") {
  TempDir tmp;
  const auto original = zo2::llama::load_llama_checkpoint<float>(fixture("qwen2_bias_bf16"));
  const fs::path dir = tmp.sub("stale");
  fs::copy(fixture("qwen2_bias_bf16_sharded"), dir, fs::copy_options::overwrite_existing);
  zo2::llama::save_hf_checkpoint(dir, original.config, original.store);
  CHECK_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  CHECK(zo2::llama::load_llama_checkpoint<float>(dir).store == original.store);
  for (const auto& entry : fs::directory_iterator(dir))
    CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);

  CHECK_THROWS_AS(zo2::llama::save_hf_checkpoint(tmp.path / "i32", original.config, original.store, zo2::io::Dtype::I32),
                  zo2::ConfigError);
  LlamaConfig other = original.config;
  other.intermediate_size = 40;
  CHECK_THROWS_AS(zo2::llama::save_hf_checkpoint(tmp.path / "other", other, original.store), zo2::ConfigError);

  // A config built in code (no source JSON) writes a complete config.json that reads back.
  LlamaConfig built = original.config;
  built.source_json = nullptr;
  const fs::path fresh = tmp.sub("fresh");
  zo2::llama::save_hf_checkpoint(fresh, built, original.store);
  const auto reread = zo2::llama::load_llama_checkpoint<float>(fresh);
  CHECK(reread.config == original.config);
  CHECK(reread.store == original.store);
  CHECK(read_json(fresh / "config.json").at("architectures")[0] == "Qwen2ForCausalLM");
}
