// zo2-opt: the model families one program serves, behind one config type. A model directory's
// config.json names its family with "model_type":
//
//   opt (or no model_type)            the OPT model (zo2/models/opt)
//   llama, qwen2, qwen3, mistral      the LLaMA family (zo2/models/llama: LlamaModel)
//
// ModelConfig holds the family's own config and answers what the commands ask of any model
// (vocabulary, positions, special ids, sizes, config.json); the engines and the checkpoint
// writer dispatch on it (visit). Header-only, so every target built from zo2-opt's sources
// (the program, its tests) has it without another source file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>

namespace zo2_opt {

enum class Family { opt, llama };

/// The family that serves a config.json's model_type ("" when config.json has none: OPT, as
/// zo2-opt always read it); nullopt when no family does.
inline std::optional<Family> family_of_model_type(const std::string& model_type) {
  if (model_type.empty() || model_type == "opt") return Family::opt;
  for (const std::string& t : zo2::llama::LlamaConfig::supported_model_types())
    if (model_type == t) return Family::llama;
  return std::nullopt;
}

/// "opt, llama, qwen2, qwen3, mistral": the model types the program serves, for messages.
inline std::string supported_model_types_text() {
  std::string s = "opt";
  for (const std::string& t : zo2::llama::LlamaConfig::supported_model_types()) s += ", " + t;
  return s;
}

class ModelConfig {
 public:
  ModelConfig(zo2::opt::OPTConfig config) : config_(std::move(config)) {}       // NOLINT: implicit by design
  ModelConfig(zo2::llama::LlamaConfig config) : config_(std::move(config)) {}   // NOLINT: implicit by design

  Family family() const { return opt() ? Family::opt : Family::llama; }
  /// The family's own config, or null for the other family.
  const zo2::opt::OPTConfig* opt() const { return std::get_if<zo2::opt::OPTConfig>(&config_); }
  const zo2::llama::LlamaConfig* llama() const { return std::get_if<zo2::llama::LlamaConfig>(&config_); }
  /// f(const OPTConfig&) or f(const LlamaConfig&).
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), config_);
  }

  /// config.json's model_type: "opt", "llama", "qwen2", "qwen3" or "mistral".
  std::string model_type() const { return opt() ? std::string("opt") : llama()->model_type; }
  std::int64_t vocab_size() const {
    return visit([](const auto& c) { return c.vocab_size; });
  }
  std::int64_t max_position_embeddings() const {
    return visit([](const auto& c) { return c.max_position_embeddings; });
  }
  std::int64_t num_hidden_layers() const {
    return visit([](const auto& c) { return c.num_hidden_layers; });
  }
  std::int64_t hidden_size() const {
    return visit([](const auto& c) { return c.hidden_size; });
  }
  std::int64_t num_attention_heads() const {
    return visit([](const auto& c) { return c.num_attention_heads; });
  }
  /// -1: none.
  std::int64_t pad_token_id() const {
    return visit([](const auto& c) { return c.pad_token_id; });
  }
  /// The ids that end a generation (none, one, or a LLaMA-family list).
  std::vector<std::int64_t> eos_token_ids() const {
    if (const auto* o = opt()) return o->eos_token_id >= 0 ? std::vector<std::int64_t>{o->eos_token_id} : std::vector<std::int64_t>{};
    return llama()->eos_token_ids;
  }
  bool is_eos(std::int64_t id) const {
    for (const std::int64_t e : eos_token_ids())
      if (e == id) return true;
    return false;
  }
  /// As transformers counts them (a tied head once).
  std::size_t parameter_count() const {
    return visit([](const auto& c) {
      if constexpr (std::is_same_v<std::decay_t<decltype(c)>, zo2::opt::OPTConfig>) return zo2::opt::parameter_count(c);
      else return zo2::llama::parameter_count(c);
    });
  }
  /// The config.json an export writes (the file it was read from, for a loaded LLaMA model).
  nlohmann::json to_json(const std::string& dtype_name = "float32") const {
    return visit([&](const auto& c) { return c.to_json(dtype_name); });
  }
  /// One line for the log: OPT "2 layers, hidden 64, 4 heads, vocab 260"; the LLaMA family adds
  /// its model type, key/value heads and head width.
  std::string summary() const {
    auto n = [](std::int64_t v) { return std::to_string(v); };
    if (opt())
      return n(num_hidden_layers()) + " layers, hidden " + n(hidden_size()) + ", " + n(num_attention_heads()) +
             " heads, vocab " + n(vocab_size());
    const zo2::llama::LlamaConfig& c = *llama();
    return c.model_type + ", " + n(c.num_hidden_layers) + " layers, hidden " + n(c.hidden_size) + ", " +
           n(c.num_attention_heads) + " heads (" + n(c.num_key_value_heads) + " key/value, head_dim " + n(c.head_dim) +
           "), ffn " + n(c.intermediate_size) + ", vocab " + n(c.vocab_size);
  }

 private:
  std::variant<zo2::opt::OPTConfig, zo2::llama::LlamaConfig> config_;
};

}  // namespace zo2_opt
