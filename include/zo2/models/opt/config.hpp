// zo2/models/opt/config.hpp -- the hyper-parameters of an OPT model (Hugging Face OPTConfig):
// read from a config.json, written back to one, named presets with the published sizes, and
// validation whose messages name the field at fault.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/io/json_file.hpp>

namespace zo2::opt {

struct OPTConfig {
  std::int64_t hidden_size = 768;
  std::int64_t ffn_dim = 3072;
  std::int64_t num_hidden_layers = 12;
  std::int64_t num_attention_heads = 12;
  std::int64_t vocab_size = 50272;
  /// Learned positions; the table has max_position_embeddings + 2 rows (OPT's offset of 2).
  std::int64_t max_position_embeddings = 2048;
  /// Width of the token embedding; differs from hidden_size only in opt-350m, where
  /// project_in / project_out translate between the two.
  std::int64_t word_embed_proj_dim = 768;
  /// true: pre-LN blocks (all OPT sizes but 350m); false: post-LN.
  bool do_layer_norm_before = true;
  bool enable_bias = true;
  bool layer_norm_elementwise_affine = true;
  /// "relu" (every released OPT), "gelu" (erf form) or "gelu_new" (tanh form).
  std::string activation_function = "relu";
  std::int64_t pad_token_id = 1;
  std::int64_t bos_token_id = 2;
  std::int64_t eos_token_id = 2;
  /// Kept for old checkpoints: when true, the decoder has no final LayerNorm even if pre-LN.
  bool _remove_final_layer_norm = false;

  std::int64_t head_dim() const { return hidden_size / num_attention_heads; }
  bool has_projection() const { return word_embed_proj_dim != hidden_size; }
  bool has_final_layer_norm() const { return do_layer_norm_before && !_remove_final_layer_norm; }
  /// LayerNorm epsilon: OPT uses torch's default.
  static constexpr double layer_norm_eps = 1e-5;
  /// OPT's learned positional embedding reserves the first two rows (a fairseq legacy).
  static constexpr std::int64_t position_offset = 2;

  static std::vector<std::string> supported_activations() { return {"relu", "gelu", "gelu_new"}; }

  /// Upper bounds validate() enforces: several times the largest published OPT (opt-175b:
  /// hidden 12288, ffn 49152, 96 layers, 96 heads, vocab 50272, 2048 positions), and small
  /// enough that no tensor's element count, no layout offset and parameter_count() can overflow.
  static constexpr std::int64_t kMaxHiddenSize = std::int64_t{1} << 16;
  static constexpr std::int64_t kMaxFfnDim = std::int64_t{1} << 18;
  static constexpr std::int64_t kMaxLayers = std::int64_t{1} << 12;
  static constexpr std::int64_t kMaxHeads = std::int64_t{1} << 12;
  static constexpr std::int64_t kMaxVocabSize = std::int64_t{1} << 24;
  static constexpr std::int64_t kMaxPositions = std::int64_t{1} << 20;

  /// Throws ConfigError naming the first field that is out of range or inconsistent.
  void validate() const {
    auto in_range = [](const char* field, std::int64_t v, std::int64_t max) {
      if (v <= 0) throw ConfigError(field, "must be > 0, got " + std::to_string(v));
      if (v > max)
        throw ConfigError(field, "must be at most " + std::to_string(max) + ", got " + std::to_string(v));
    };
    in_range("hidden_size", hidden_size, kMaxHiddenSize);
    in_range("ffn_dim", ffn_dim, kMaxFfnDim);
    in_range("num_hidden_layers", num_hidden_layers, kMaxLayers);
    in_range("num_attention_heads", num_attention_heads, kMaxHeads);
    in_range("vocab_size", vocab_size, kMaxVocabSize);
    in_range("max_position_embeddings", max_position_embeddings, kMaxPositions);
    in_range("word_embed_proj_dim", word_embed_proj_dim, kMaxHiddenSize);
    if (hidden_size % num_attention_heads != 0)
      throw ConfigError("num_attention_heads", "hidden_size " + std::to_string(hidden_size) +
                                                   " is not divisible by num_attention_heads " +
                                                   std::to_string(num_attention_heads));
    bool known = false;
    for (const auto& a : supported_activations()) known = known || a == activation_function;
    if (!known)
      throw ConfigError("activation_function",
                        "'" + activation_function + "' is not supported (relu, gelu, gelu_new)");
    for (auto [field, id] : {std::pair{"pad_token_id", pad_token_id}, std::pair{"bos_token_id", bos_token_id},
                             std::pair{"eos_token_id", eos_token_id}})
      if (id < -1 || id >= vocab_size)
        throw ConfigError(field, std::to_string(id) + " is outside the vocabulary [0, " +
                                     std::to_string(vocab_size) + ") (-1 means none)");
  }

  /// The names preset() accepts, smallest first.
  static std::vector<std::string> preset_names() {
    return {"opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b",
            "opt-13b",  "opt-30b",  "opt-66b",  "opt-175b"};
  }

  /// The published facebook/opt-* architectures ("facebook/" prefix optional).
  static OPTConfig preset(std::string name) {
    if (name.rfind("facebook/", 0) == 0) name = name.substr(9);
    struct Sizes {
      const char* name;
      std::int64_t hidden, ffn, layers, heads;
    };
    static constexpr Sizes kSizes[] = {
        {"opt-125m", 768, 3072, 12, 12},     {"opt-350m", 1024, 4096, 24, 16},
        {"opt-1.3b", 2048, 8192, 24, 32},    {"opt-2.7b", 2560, 10240, 32, 32},
        {"opt-6.7b", 4096, 16384, 32, 32},   {"opt-13b", 5120, 20480, 40, 40},
        {"opt-30b", 7168, 28672, 48, 56},    {"opt-66b", 9216, 36864, 64, 72},
        {"opt-175b", 12288, 49152, 96, 96}};
    for (const Sizes& s : kSizes) {
      if (name != s.name) continue;
      OPTConfig c;
      c.hidden_size = s.hidden;
      c.ffn_dim = s.ffn;
      c.num_hidden_layers = s.layers;
      c.num_attention_heads = s.heads;
      c.word_embed_proj_dim = s.hidden;
      if (name == "opt-350m") {  // the odd one out: post-LN, 512-wide embeddings
        c.word_embed_proj_dim = 512;
        c.do_layer_norm_before = false;
      }
      return c;
    }
    std::string valid;
    for (const auto& n : preset_names()) valid += (valid.empty() ? "" : ", ") + n;
    throw ConfigError("preset", "unknown OPT preset '" + name + "'; valid names: " + valid);
  }

  /// Parses a Hugging Face config.json. The size fields are required; the others take
  /// OPTConfig's defaults in transformers when absent. Throws FileError naming the file and the
  /// field for a missing or mistyped field, and for a config that validate() rejects.
  static OPTConfig from_json_file(const std::filesystem::path& path) {
    return from_json(io::read_json_file(path), path.string());
  }

  /// As from_json_file, on parsed JSON; `source` names the origin in messages.
  static OPTConfig from_json(const nlohmann::json& j, const std::string& source) {
    if (!j.is_object()) throw FileError(source, "config is not a JSON object");
    auto field_error = [&](const std::string& field, const std::string& why) {
      return FileError(source, "field '" + field + "' " + why);
    };
    auto get_int = [&](const char* field, std::int64_t& out, bool required, bool nullable = false) {
      if (!j.contains(field)) {
        if (required) throw field_error(field, "is missing");
        return;
      }
      const auto& v = j.at(field);
      if (nullable && v.is_null()) {
        out = -1;
        return;
      }
      if (!v.is_number_integer()) throw field_error(field, "must be an integer, got " + io::json_brief(v));
      out = v.get<std::int64_t>();
    };
    auto get_bool = [&](const char* field, bool& out) {
      if (!j.contains(field)) return;
      const auto& v = j.at(field);
      if (!v.is_boolean()) throw field_error(field, "must be true or false, got " + io::json_brief(v));
      out = v.get<bool>();
    };

    if (j.contains("model_type")) {
      const auto& v = j.at("model_type");
      if (!v.is_string() || v.get<std::string>() != "opt")
        throw field_error("model_type", "must be \"opt\", got " + io::json_brief(v));
    }
    OPTConfig c;
    get_int("hidden_size", c.hidden_size, true);
    get_int("ffn_dim", c.ffn_dim, true);
    get_int("num_hidden_layers", c.num_hidden_layers, true);
    get_int("num_attention_heads", c.num_attention_heads, true);
    get_int("vocab_size", c.vocab_size, true);
    get_int("max_position_embeddings", c.max_position_embeddings, true);
    c.word_embed_proj_dim = c.hidden_size;  // transformers: None means hidden_size
    if (j.contains("word_embed_proj_dim") && !j.at("word_embed_proj_dim").is_null())
      get_int("word_embed_proj_dim", c.word_embed_proj_dim, false);
    get_bool("do_layer_norm_before", c.do_layer_norm_before);
    get_bool("enable_bias", c.enable_bias);
    get_bool("layer_norm_elementwise_affine", c.layer_norm_elementwise_affine);
    get_bool("_remove_final_layer_norm", c._remove_final_layer_norm);
    if (j.contains("activation_function")) {
      const auto& v = j.at("activation_function");
      if (!v.is_string()) throw field_error("activation_function", "must be a string, got " + io::json_brief(v));
      c.activation_function = v.get<std::string>();
    }
    get_int("pad_token_id", c.pad_token_id, false, true);
    get_int("bos_token_id", c.bos_token_id, false, true);
    get_int("eos_token_id", c.eos_token_id, false, true);
    if (j.contains("tie_word_embeddings")) {
      bool tied = true;
      get_bool("tie_word_embeddings", tied);
      // The LM head is read from the token embedding; an untied head would be silently wrong.
      if (!tied) throw field_error("tie_word_embeddings", "is false; only tied LM heads are supported");
    }
    try {
      c.validate();
    } catch (const ConfigError& e) {
      throw FileError(source, std::string(e.what()));
    }
    return c;
  }

  /// A config.json that transformers' OPTForCausalLM.from_pretrained accepts.
  nlohmann::json to_json(const std::string& dtype_name = "float32") const {
    auto id_or_null = [](std::int64_t id) { return id < 0 ? nlohmann::json(nullptr) : nlohmann::json(id); };
    return nlohmann::json{
        {"_remove_final_layer_norm", _remove_final_layer_norm},
        {"activation_dropout", 0.0},
        {"activation_function", activation_function},
        {"architectures", {"OPTForCausalLM"}},
        {"attention_dropout", 0.0},
        {"bos_token_id", id_or_null(bos_token_id)},
        {"do_layer_norm_before", do_layer_norm_before},
        {"dropout", 0.0},
        {"dtype", dtype_name},
        {"enable_bias", enable_bias},
        {"eos_token_id", id_or_null(eos_token_id)},
        {"ffn_dim", ffn_dim},
        {"hidden_size", hidden_size},
        {"init_std", 0.02},
        {"layer_norm_elementwise_affine", layer_norm_elementwise_affine},
        {"layerdrop", 0.0},
        {"max_position_embeddings", max_position_embeddings},
        {"model_type", "opt"},
        {"num_attention_heads", num_attention_heads},
        {"num_hidden_layers", num_hidden_layers},
        {"pad_token_id", id_or_null(pad_token_id)},
        {"tie_word_embeddings", true},
        {"torch_dtype", dtype_name},
        {"use_cache", true},
        {"vocab_size", vocab_size},
        {"word_embed_proj_dim", word_embed_proj_dim},
    };
  }

  friend bool operator==(const OPTConfig&, const OPTConfig&) = default;
};

}  // namespace zo2::opt
