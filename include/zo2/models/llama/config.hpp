// zo2/models/llama/config.hpp -- the hyper-parameters of a LLaMA-family model (Hugging Face
// LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig): read from a config.json, written back to
// one, named presets with published sizes, and validation whose messages name the field at fault.
//
// The four model types share one architecture (pre-RMSNorm decoder, rotary positions, SwiGLU
// MLP, grouped-query attention) and differ in what a few flags switch on:
//
//   llama     q/k/v/o biases = attention_bias, MLP biases = mlp_bias, rope scaling (llama3, linear)
//   qwen2     q/k/v biases always (o_proj none), sliding window on layers >= max_window_layers
//             when use_sliding_window (or as layer_types says)
//   qwen3     per-head RMSNorm of q and k (q_norm, k_norm), head_dim 128 unless given,
//             q/k/v/o biases = attention_bias, sliding window as qwen2
//   mistral   no biases, sliding_window on every layer
//
// These mirror transformers 5 (the modeling files of each type), which is the reference the
// fixtures are made with. A config.json this code cannot honour exactly is refused with a
// ConfigError naming the field, never approximated.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/core/error.hpp>
#include <zo2/io/json_file.hpp>

namespace zo2::llama {

/// Rotary embedding parameters (transformers 5's rope_parameters; rope_scaling + rope_theta in
/// configs written by transformers 4).
struct RopeConfig {
  /// "default", "linear" or "llama3"; other types are refused when parsing.
  std::string type = "default";
  double theta = 10000.0;
  /// linear and llama3: the frequencies are divided by it (llama3: the low ones, smoothly).
  double factor = 1.0;
  /// llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 8192;

  friend bool operator==(const RopeConfig&, const RopeConfig&) = default;
};

struct LlamaConfig {
  /// "llama", "qwen2", "qwen3" or "mistral": selects the flags described at the top.
  std::string model_type = "llama";
  std::int64_t hidden_size = 4096;
  std::int64_t intermediate_size = 11008;
  std::int64_t num_hidden_layers = 32;
  std::int64_t num_attention_heads = 32;
  std::int64_t num_key_value_heads = 32;
  /// Width of one attention head; hidden_size / num_attention_heads unless given (Qwen3: 128).
  std::int64_t head_dim = 128;
  std::int64_t vocab_size = 32000;
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  /// "silu" (HF's "swish" is the same function).
  std::string hidden_act = "silu";
  /// llama, qwen3: biases on q/k/v/o_proj. Ignored by qwen2 (q/k/v always, o never) and mistral.
  bool attention_bias = false;
  /// llama: biases on gate/up/down_proj.
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  RopeConfig rope;
  /// Sliding-window attention: a query sees at most the last `sliding_window` keys (itself
  /// included). -1 means none. mistral: every layer; qwen2/qwen3: the layers layer_window()
  /// names, only when use_sliding_window.
  std::int64_t sliding_window = -1;
  bool use_sliding_window = false;
  std::int64_t max_window_layers = 28;
  /// qwen2/qwen3: "full_attention" or "sliding_attention" per layer; empty means derived from
  /// use_sliding_window and max_window_layers, as transformers derives it.
  std::vector<std::string> layer_types;
  std::int64_t pad_token_id = -1;
  std::int64_t bos_token_id = -1;
  std::vector<std::int64_t> eos_token_ids;
  /// The config.json this config was read from (null for a config built in code). to_json()
  /// writes it back with only the dtype changed, so an export keeps every field transformers
  /// reads, including the ones zo2 does not (tokenizer ids, generation defaults, ...).
  nlohmann::json source_json;

  static std::vector<std::string> supported_model_types() { return {"llama", "qwen2", "qwen3", "mistral"}; }

  // ---- what the flags mean for the architecture ---------------------------------------------
  bool qkv_bias() const {
    if (model_type == "qwen2") return true;
    if (model_type == "mistral") return false;
    return attention_bias;
  }
  bool o_bias() const { return (model_type == "llama" || model_type == "qwen3") && attention_bias; }
  bool has_mlp_bias() const { return model_type == "llama" && mlp_bias; }
  bool qk_norm() const { return model_type == "qwen3"; }
  std::int64_t q_width() const { return num_attention_heads * head_dim; }
  std::int64_t kv_width() const { return num_key_value_heads * head_dim; }

  /// The sliding window of layer `i` (0: full causal attention), as transformers applies it.
  std::int64_t layer_window(std::size_t i) const {
    if (model_type == "mistral") return sliding_window > 0 ? sliding_window : 0;
    if (model_type != "qwen2" && model_type != "qwen3") return 0;
    if (!use_sliding_window || sliding_window <= 0) return 0;
    if (!layer_types.empty()) return layer_types.at(i) == "sliding_attention" ? sliding_window : 0;
    return static_cast<std::int64_t>(i) >= max_window_layers ? sliding_window : 0;
  }

  /// The rotary inverse frequencies [head_dim / 2] as transformers 5 computes them
  /// (modeling_rope_utils: default, linear, llama3), in float.
  std::vector<float> rope_inv_freq() const {
    const std::size_t half = static_cast<std::size_t>(head_dim / 2);
    std::vector<float> inv(half);
    const float base = static_cast<float>(rope.theta);
    for (std::size_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      const float power = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
      inv[i] = 1.0f / power;
    }
    if (rope.type == "linear") {
      for (float& f : inv) f = static_cast<float>(static_cast<double>(f) / rope.factor);
    } else if (rope.type == "llama3") {
      const double old_context = static_cast<double>(rope.original_max_position_embeddings);
      const double low_wavelen = old_context / rope.low_freq_factor;
      const double high_wavelen = old_context / rope.high_freq_factor;
      for (float& f : inv) {
        const double freq = f;
        const double wavelen = 2 * M_PI / freq;
        double scaled = wavelen > low_wavelen ? freq / rope.factor : freq;
        if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
          const double smooth = (old_context / wavelen - rope.low_freq_factor) /
                                (rope.high_freq_factor - rope.low_freq_factor);
          scaled = (1 - smooth) * scaled / rope.factor + smooth * scaled;
        }
        f = static_cast<float>(scaled);
      }
    }
    return inv;
  }
  /// cos/sin multiplier: 1 for every supported rope type.
  double rope_attention_scaling() const { return 1.0; }

  // ---- validation ---------------------------------------------------------------------------

  /// Upper bounds validate() enforces: several times the largest published sizes of the
  /// family (Llama-3.1-405B: hidden 16384, ffn 53248, 126 layers, 128 heads; Qwen: vocab
  /// 151936), small enough that no tensor's element count or layout offset can overflow.
  static constexpr std::int64_t kMaxHiddenSize = std::int64_t{1} << 16;
  static constexpr std::int64_t kMaxIntermediateSize = std::int64_t{1} << 18;
  static constexpr std::int64_t kMaxLayers = std::int64_t{1} << 12;
  static constexpr std::int64_t kMaxHeads = std::int64_t{1} << 12;
  static constexpr std::int64_t kMaxHeadDim = std::int64_t{1} << 12;
  static constexpr std::int64_t kMaxVocabSize = std::int64_t{1} << 24;
  static constexpr std::int64_t kMaxPositions = std::int64_t{1} << 24;

  /// Throws ConfigError naming the first field that is out of range or inconsistent.
  void validate() const {
    bool known = false;
    for (const auto& t : supported_model_types()) known = known || t == model_type;
    if (!known)
      throw ConfigError("model_type", "'" + model_type + "' is not a LLaMA-family type (llama, qwen2, qwen3, mistral)");
    auto in_range = [](const char* field, std::int64_t v, std::int64_t max) {
      if (v <= 0) throw ConfigError(field, "must be > 0, got " + std::to_string(v));
      if (v > max) throw ConfigError(field, "must be at most " + std::to_string(max) + ", got " + std::to_string(v));
    };
    in_range("hidden_size", hidden_size, kMaxHiddenSize);
    in_range("intermediate_size", intermediate_size, kMaxIntermediateSize);
    in_range("num_hidden_layers", num_hidden_layers, kMaxLayers);
    in_range("num_attention_heads", num_attention_heads, kMaxHeads);
    in_range("num_key_value_heads", num_key_value_heads, kMaxHeads);
    in_range("head_dim", head_dim, kMaxHeadDim);
    in_range("vocab_size", vocab_size, kMaxVocabSize);
    in_range("max_position_embeddings", max_position_embeddings, kMaxPositions);
    if (num_attention_heads % num_key_value_heads != 0)
      throw ConfigError("num_key_value_heads", "num_attention_heads " + std::to_string(num_attention_heads) +
                                                   " is not a multiple of num_key_value_heads " +
                                                   std::to_string(num_key_value_heads));
    if (head_dim % 2 != 0)
      throw ConfigError("head_dim", "rotary embeddings need an even head_dim, got " + std::to_string(head_dim));
    if (q_width() > kMaxHiddenSize * 4)
      throw ConfigError("head_dim", "num_attention_heads * head_dim = " + std::to_string(q_width()) +
                                        " exceeds " + std::to_string(kMaxHiddenSize * 4));
    if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps))
      throw ConfigError("rms_norm_eps", "must be a positive finite number");
    if (hidden_act != "silu" && hidden_act != "swish")
      throw ConfigError("hidden_act", "'" + hidden_act + "' is not supported (silu)");
    if (!(rope.theta > 0) || !std::isfinite(rope.theta))
      throw ConfigError("rope_theta", "must be a positive finite number");
    if (rope.type != "default" && rope.type != "linear" && rope.type != "llama3")
      throw ConfigError("rope_parameters", "rope_type '" + rope.type + "' is not supported (default, linear, llama3)");
    if (rope.type != "default" && (!(rope.factor > 0) || !std::isfinite(rope.factor)))
      throw ConfigError("rope_parameters", "factor must be a positive finite number");
    if (rope.type == "llama3") {
      if (!(rope.high_freq_factor > rope.low_freq_factor) || !(rope.low_freq_factor > 0) ||
          !std::isfinite(rope.high_freq_factor))
        throw ConfigError("rope_parameters", "llama3 needs 0 < low_freq_factor < high_freq_factor");
      if (rope.original_max_position_embeddings <= 0)
        throw ConfigError("rope_parameters", "original_max_position_embeddings must be > 0");
    }
    if (sliding_window == 0 || sliding_window < -1)
      throw ConfigError("sliding_window", "must be > 0 (or null), got " + std::to_string(sliding_window));
    if (!layer_types.empty()) {
      if (layer_types.size() != static_cast<std::size_t>(num_hidden_layers))
        throw ConfigError("layer_types", "has " + std::to_string(layer_types.size()) + " entries, num_hidden_layers is " +
                                             std::to_string(num_hidden_layers));
      for (const auto& t : layer_types) {
        if (t != "full_attention" && t != "sliding_attention")
          throw ConfigError("layer_types", "'" + t + "' is not supported (full_attention, sliding_attention)");
        if (t == "sliding_attention" && (model_type == "qwen2" || model_type == "qwen3") &&
            !(use_sliding_window && sliding_window > 0))
          throw ConfigError("layer_types", "names a sliding_attention layer, but use_sliding_window is false or "
                                           "sliding_window is null (transformers cannot build that mask)");
      }
    }
    for (auto [field, id] : {std::pair{"pad_token_id", pad_token_id}, std::pair{"bos_token_id", bos_token_id}})
      if (id < -1 || id >= vocab_size)
        throw ConfigError(field, std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(vocab_size) +
                                     ") (null means none)");
    for (std::int64_t id : eos_token_ids)
      if (id < 0 || id >= vocab_size)
        throw ConfigError("eos_token_id", std::to_string(id) + " is outside the vocabulary [0, " +
                                              std::to_string(vocab_size) + ")");
  }

  // ---- presets ------------------------------------------------------------------------------

  /// The names preset() accepts.
  static std::vector<std::string> preset_names() {
    return {"llama-3.2-1b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "qwen3-32b"};
  }

  /// Published architectures (random-weight runs and benchmarks): meta-llama/Llama-3.2-1B,
  /// meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B, Qwen/Qwen3-8B,
  /// Qwen/Qwen3-32B.
  static LlamaConfig preset(const std::string& name) {
    LlamaConfig c;
    c.rms_norm_eps = 1e-5;
    if (name == "llama-3.2-1b") {
      c.hidden_size = 2048, c.intermediate_size = 8192, c.num_hidden_layers = 16, c.num_attention_heads = 32;
      c.num_key_value_heads = 8, c.head_dim = 64, c.vocab_size = 128256, c.max_position_embeddings = 131072;
      c.tie_word_embeddings = true;
      c.rope = {"llama3", 500000.0, 32.0, 1.0, 4.0, 8192};
      c.bos_token_id = 128000, c.eos_token_ids = {128001};
    } else if (name == "llama-3-8b") {
      c.hidden_size = 4096, c.intermediate_size = 14336, c.num_hidden_layers = 32, c.num_attention_heads = 32;
      c.num_key_value_heads = 8, c.head_dim = 128, c.vocab_size = 128256, c.max_position_embeddings = 8192;
      c.rope.theta = 500000.0;
      c.bos_token_id = 128000, c.eos_token_ids = {128001};
    } else if (name == "mistral-7b") {
      c.model_type = "mistral";
      c.hidden_size = 4096, c.intermediate_size = 14336, c.num_hidden_layers = 32, c.num_attention_heads = 32;
      c.num_key_value_heads = 8, c.head_dim = 128, c.vocab_size = 32000, c.max_position_embeddings = 32768;
      c.sliding_window = 4096;
      c.bos_token_id = 1, c.eos_token_ids = {2};
    } else if (name == "qwen2.5-7b") {
      c.model_type = "qwen2";
      c.hidden_size = 3584, c.intermediate_size = 18944, c.num_hidden_layers = 28, c.num_attention_heads = 28;
      c.num_key_value_heads = 4, c.head_dim = 128, c.vocab_size = 152064, c.max_position_embeddings = 131072;
      c.rms_norm_eps = 1e-6, c.rope.theta = 1000000.0;
      c.sliding_window = 131072, c.max_window_layers = 28;
      c.bos_token_id = 151643, c.eos_token_ids = {151643};
    } else if (name == "qwen3-8b") {
      c.model_type = "qwen3";
      c.hidden_size = 4096, c.intermediate_size = 12288, c.num_hidden_layers = 36, c.num_attention_heads = 32;
      c.num_key_value_heads = 8, c.head_dim = 128, c.vocab_size = 151936, c.max_position_embeddings = 40960;
      c.rms_norm_eps = 1e-6, c.rope.theta = 1000000.0;
      c.sliding_window = -1, c.max_window_layers = 36;
      c.bos_token_id = 151643, c.eos_token_ids = {151645};
    } else if (name == "qwen3-32b") {
      c.model_type = "qwen3";
      c.hidden_size = 5120, c.intermediate_size = 25600, c.num_hidden_layers = 64, c.num_attention_heads = 64;
      c.num_key_value_heads = 8, c.head_dim = 128, c.vocab_size = 151936, c.max_position_embeddings = 40960;
      c.rms_norm_eps = 1e-6, c.rope.theta = 1000000.0;
      c.sliding_window = -1, c.max_window_layers = 64;
      c.bos_token_id = 151643, c.eos_token_ids = {151645};
    } else {
      std::string valid;
      for (const auto& n : preset_names()) valid += (valid.empty() ? "" : ", ") + n;
      throw ConfigError("preset", "unknown LLaMA-family preset '" + name + "'; valid names: " + valid);
    }
    c.validate();
    return c;
  }

  // ---- config.json --------------------------------------------------------------------------

  /// Parses a Hugging Face config.json. Throws FileError when the file cannot be read or is not
  /// JSON, ConfigError naming the field (and the file) for a missing, mistyped or unsupported
  /// field.
  static LlamaConfig from_json_file(const std::filesystem::path& path) {
    return from_json(io::read_json_file(path), path.string());
  }

  /// As from_json_file, on parsed JSON; `source` names the origin in messages. Absent fields
  /// take the defaults of the model type's config class in transformers 5.
  static LlamaConfig from_json(const nlohmann::json& j, const std::string& source) {
    if (!j.is_object()) throw FileError(source, "config is not a JSON object");
    auto error = [&](const std::string& field, const std::string& why) {
      return ConfigError(field, why + " (" + source + ")");
    };
    auto present = [&](const char* field) { return j.contains(field) && !j.at(field).is_null(); };
    auto get_int = [&](const char* field, std::int64_t& out, bool required) {
      if (!present(field)) {
        if (required) throw error(field, "is missing");
        return;
      }
      const auto& v = j.at(field);
      if (!v.is_number_integer()) throw error(field, "must be an integer, got " + io::json_brief(v));
      out = v.get<std::int64_t>();
    };
    auto get_bool = [&](const char* field, bool& out) {
      if (!present(field)) return;
      const auto& v = j.at(field);
      if (!v.is_boolean()) throw error(field, "must be true or false, got " + io::json_brief(v));
      out = v.get<bool>();
    };
    auto get_number = [&](const nlohmann::json& object, const std::string& field, const std::string& name,
                          double& out) {
      const auto& v = object.at(field);
      if (!v.is_number()) throw error(name, "must be a number, got " + io::json_brief(v));
      out = v.get<double>();
    };

    LlamaConfig c;
    if (!j.contains("model_type")) throw error("model_type", "is missing");
    if (!j.at("model_type").is_string()) throw error("model_type", "must be a string, got " + io::json_brief(j.at("model_type")));
    c.model_type = j.at("model_type").get<std::string>();
    bool known = false;
    for (const auto& t : supported_model_types()) known = known || t == c.model_type;
    if (!known)
      throw error("model_type", "'" + c.model_type + "' is not a LLaMA-family type (llama, qwen2, qwen3, mistral)");
    if (present("quantization_config"))
      throw error("quantization_config", "quantized checkpoints are not supported");

    // Defaults of the model type's config class where config.json is silent.
    if (c.model_type == "qwen2" || c.model_type == "qwen3") {
      c.max_position_embeddings = 32768;
      c.sliding_window = 4096;
      c.vocab_size = 151936;
    } else if (c.model_type == "mistral") {
      c.max_position_embeddings = 4096 * 32;
      c.sliding_window = 4096;
    }
    get_int("hidden_size", c.hidden_size, true);
    get_int("intermediate_size", c.intermediate_size, true);
    get_int("num_hidden_layers", c.num_hidden_layers, true);
    get_int("num_attention_heads", c.num_attention_heads, true);
    get_int("vocab_size", c.vocab_size, true);
    get_int("max_position_embeddings", c.max_position_embeddings, false);
    c.num_key_value_heads = c.num_attention_heads;
    if (c.model_type == "mistral") c.num_key_value_heads = 8;
    get_int("num_key_value_heads", c.num_key_value_heads, false);
    if (c.num_attention_heads <= 0)
      throw error("num_attention_heads", "must be > 0, got " + std::to_string(c.num_attention_heads));
    c.head_dim = c.model_type == "qwen3" ? 128 : c.hidden_size / c.num_attention_heads;
    get_int("head_dim", c.head_dim, false);
    if (present("rms_norm_eps")) get_number(j, "rms_norm_eps", "rms_norm_eps", c.rms_norm_eps);
    if (present("hidden_act")) {
      if (!j.at("hidden_act").is_string()) throw error("hidden_act", "must be a string, got " + io::json_brief(j.at("hidden_act")));
      c.hidden_act = j.at("hidden_act").get<std::string>();
    }
    get_bool("attention_bias", c.attention_bias);
    get_bool("mlp_bias", c.mlp_bias);
    get_bool("tie_word_embeddings", c.tie_word_embeddings);
    if (c.model_type == "llama" && present("pretraining_tp")) {
      std::int64_t tp = 1;
      get_int("pretraining_tp", tp, false);  // transformers 5 ignores it too: only a 4.x numerics switch
    }

    // Sliding window. qwen2/qwen3 keep the window only with use_sliding_window.
    if (c.model_type != "llama") {
      if (j.contains("sliding_window") && j.at("sliding_window").is_null()) c.sliding_window = -1;
      else get_int("sliding_window", c.sliding_window, false);
    }
    if (c.model_type == "qwen2" || c.model_type == "qwen3") {
      get_bool("use_sliding_window", c.use_sliding_window);
      get_int("max_window_layers", c.max_window_layers, false);
      if (present("layer_types")) {
        const auto& v = j.at("layer_types");
        if (!v.is_array()) throw error("layer_types", "must be a list of strings, got " + io::json_brief(v));
        for (const auto& t : v) {
          if (!t.is_string()) throw error("layer_types", "must be a list of strings, holds " + io::json_brief(t));
          c.layer_types.push_back(t.get<std::string>());
        }
      }
    }

    // Rotary embeddings: rope_scaling (transformers 4) wins over rope_parameters (5), as in
    // transformers' convert_rope_params_to_dict; rope_theta and partial_rotary_factor may sit
    // beside either.
    const bool scaling_given = j.contains("rope_scaling") && !j.at("rope_scaling").is_null() &&
                               !(j.at("rope_scaling").is_object() && j.at("rope_scaling").empty());
    const char* rope_field = scaling_given ? "rope_scaling" : "rope_parameters";
    // A reference, not a copy: copying a JSON value recurses once per level (io/json_file.hpp).
    const nlohmann::json no_rope = nlohmann::json::object();
    const nlohmann::json& rope = scaling_given || present("rope_parameters") ? j.at(rope_field) : no_rope;
    if (!rope.is_object()) throw error(rope_field, "must be an object, got " + io::json_brief(rope));
    for (const char* layer_type : {"full_attention", "sliding_attention"})
      if (rope.contains(layer_type))
        throw error(rope_field, "per-layer-type rotary parameters are not supported");
    auto rope_name = [&](const std::string& key) { return std::string(rope_field) + "." + key; };
    if (rope.contains("rope_type") || rope.contains("type")) {
      const auto& v = rope.contains("rope_type") ? rope.at("rope_type") : rope.at("type");
      if (!v.is_string()) throw error(rope_name("rope_type"), "must be a string, got " + io::json_brief(v));
      c.rope.type = v.get<std::string>();
    }
    if (c.rope.type != "default" && c.rope.type != "linear" && c.rope.type != "llama3")
      throw error(rope_field, "rope_type '" + c.rope.type + "' is not supported (default, linear, llama3)");
    if (rope.contains("rope_theta") && !rope.at("rope_theta").is_null())
      get_number(rope, "rope_theta", rope_name("rope_theta"), c.rope.theta);
    else if (present("rope_theta"))
      get_number(j, "rope_theta", "rope_theta", c.rope.theta);
    for (const nlohmann::json* holder : {static_cast<const nlohmann::json*>(&rope), &j}) {
      if (!holder->contains("partial_rotary_factor") || holder->at("partial_rotary_factor").is_null()) continue;
      double partial = 1;
      get_number(*holder, "partial_rotary_factor", "partial_rotary_factor", partial);
      if (partial != 1.0) throw error("partial_rotary_factor", "partial rotary embeddings are not supported");
    }
    auto rope_number = [&](const char* key, double& out) {
      if (!rope.contains(key) || rope.at(key).is_null()) throw error(rope_name(key), "is missing");
      get_number(rope, key, rope_name(key), out);
    };
    if (c.rope.type == "linear") rope_number("factor", c.rope.factor);
    if (c.rope.type == "llama3") {
      rope_number("factor", c.rope.factor);
      rope_number("low_freq_factor", c.rope.low_freq_factor);
      rope_number("high_freq_factor", c.rope.high_freq_factor);
      c.rope.original_max_position_embeddings = c.max_position_embeddings;
      const nlohmann::json* holder = present("original_max_position_embeddings") ? &j
                                     : rope.contains("original_max_position_embeddings") ? &rope
                                                                                          : nullptr;
      if (holder != nullptr) {
        const auto& v = holder->at("original_max_position_embeddings");
        if (!v.is_number_integer())
          throw error(rope_name("original_max_position_embeddings"), "must be an integer, got " + io::json_brief(v));
        c.rope.original_max_position_embeddings = v.get<std::int64_t>();
      }
    }

    auto token_id = [&](const char* field, std::int64_t& out) {
      if (!present(field)) return;
      const auto& v = j.at(field);
      if (v.is_array() && v.size() == 1 && v[0].is_number_integer()) {  // [id] is id
        out = v[0].get<std::int64_t>();
        return;
      }
      if (!v.is_number_integer()) throw error(field, "must be an integer or null, got " + io::json_brief(v));
      out = v.get<std::int64_t>();
    };
    if (c.model_type == "llama" || c.model_type == "mistral") {
      c.bos_token_id = 1;
      c.eos_token_ids = {2};
    }
    token_id("pad_token_id", c.pad_token_id);
    token_id("bos_token_id", c.bos_token_id);
    if (j.contains("eos_token_id")) {
      const auto& v = j.at("eos_token_id");
      c.eos_token_ids.clear();
      if (v.is_number_integer()) {
        c.eos_token_ids.push_back(v.get<std::int64_t>());
      } else if (v.is_array()) {
        for (const auto& id : v) {
          if (!id.is_number_integer()) throw error("eos_token_id", "must be an integer or a list of integers, holds " + io::json_brief(id));
          c.eos_token_ids.push_back(id.get<std::int64_t>());
        }
      } else if (!v.is_null()) {
        throw error("eos_token_id", "must be an integer or a list of integers, got " + io::json_brief(v));
      }
    }
    try {
      c.validate();
    } catch (const ConfigError& e) {
      throw ConfigError(e.field(), std::string(e.what()) + " (" + source + ")");
    }
    c.source_json = j;
    return c;
  }

  /// A config.json that transformers' AutoModelForCausalLM.from_pretrained accepts. For a config
  /// read from a file it is that file with "dtype" / "torch_dtype" set to `dtype_name`; else
  /// the model type's fields.
  nlohmann::json to_json(const std::string& dtype_name = "float32") const {
    if (!source_json.is_null()) {
      nlohmann::json j = source_json;
      j["dtype"] = dtype_name;
      if (j.contains("torch_dtype")) j["torch_dtype"] = dtype_name;
      return j;
    }
    auto id_or_null = [](std::int64_t id) { return id < 0 ? nlohmann::json(nullptr) : nlohmann::json(id); };
    const std::string architecture = model_type == "llama"   ? "LlamaForCausalLM"
                                     : model_type == "qwen2" ? "Qwen2ForCausalLM"
                                     : model_type == "qwen3" ? "Qwen3ForCausalLM"
                                                             : "MistralForCausalLM";
    nlohmann::json rope_json = {{"rope_type", rope.type}, {"rope_theta", rope.theta}};
    if (rope.type != "default") rope_json["factor"] = rope.factor;
    if (rope.type == "llama3") {
      rope_json["low_freq_factor"] = rope.low_freq_factor;
      rope_json["high_freq_factor"] = rope.high_freq_factor;
      rope_json["original_max_position_embeddings"] = rope.original_max_position_embeddings;
    }
    nlohmann::json j = {
        {"architectures", {architecture}},
        {"attention_dropout", 0.0},
        {"bos_token_id", id_or_null(bos_token_id)},
        {"dtype", dtype_name},
        {"eos_token_id", eos_token_ids.size() == 1 ? nlohmann::json(eos_token_ids[0])
                         : eos_token_ids.empty()   ? nlohmann::json(nullptr)
                                                   : nlohmann::json(eos_token_ids)},
        {"head_dim", head_dim},
        {"hidden_act", hidden_act},
        {"hidden_size", hidden_size},
        {"initializer_range", 0.02},
        {"intermediate_size", intermediate_size},
        {"max_position_embeddings", max_position_embeddings},
        {"model_type", model_type},
        {"num_attention_heads", num_attention_heads},
        {"num_hidden_layers", num_hidden_layers},
        {"num_key_value_heads", num_key_value_heads},
        {"pad_token_id", id_or_null(pad_token_id)},
        {"rms_norm_eps", rms_norm_eps},
        {"rope_parameters", rope_json},
        {"tie_word_embeddings", tie_word_embeddings},
        {"use_cache", true},
        {"vocab_size", vocab_size},
    };
    if (model_type == "llama") {
      j["attention_bias"] = attention_bias;
      j["mlp_bias"] = mlp_bias;
    }
    if (model_type == "qwen3") j["attention_bias"] = attention_bias;
    if (model_type == "mistral") j["sliding_window"] = sliding_window > 0 ? nlohmann::json(sliding_window) : nlohmann::json(nullptr);
    if (model_type == "qwen2" || model_type == "qwen3") {
      j["sliding_window"] = sliding_window > 0 ? nlohmann::json(sliding_window) : nlohmann::json(nullptr);
      j["use_sliding_window"] = use_sliding_window;
      j["max_window_layers"] = max_window_layers;
      if (!layer_types.empty()) j["layer_types"] = layer_types;
    }
    return j;
  }

  /// Equal architectures and token ids; the JSON a config was read from is not compared.
  friend bool operator==(const LlamaConfig& a, const LlamaConfig& b) {
    auto fields = [](const LlamaConfig& c) {
      return std::tie(c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                      c.num_key_value_heads, c.head_dim, c.vocab_size, c.max_position_embeddings, c.rms_norm_eps,
                      c.hidden_act, c.attention_bias, c.mlp_bias, c.tie_word_embeddings, c.rope, c.sliding_window,
                      c.use_sliding_window, c.max_window_layers, c.layer_types, c.pad_token_id, c.bos_token_id,
                      c.eos_token_ids);
    };
    return fields(a) == fields(b);
  }
};

}  // namespace zo2::llama
