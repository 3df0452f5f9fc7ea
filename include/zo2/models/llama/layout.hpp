// zo2/models/llama/layout.hpp -- a LLaMA-family model's parameter tensors: their names, shapes
// and weight-decay flags per group (prologue, one decoder layer, epilogue), and how those names
// map to the tensor names of a Hugging Face checkpoint.
//
// The group-local names are Hugging Face's with the "model." (and "layers.<i>.") prefix removed;
// the untied LM head is "lm_head.weight" in both. Shapes are HF's: a Linear weight is [out, in],
// row-major.
//
// Order within a block: the three projection weights q, k, v are adjacent, then their biases,
// and gate_proj's weight is followed by up_proj's. Tensor offsets are multiples of 32 elements,
// so when the sizes are multiples of 32 too (every published config) q/k/v form one
// [q_width + 2 kv_width, hidden] matrix and gate/up one [2 intermediate, hidden] matrix in the
// group's buffer: a device backend may compute each pair or triple with one GEMM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/llama/config.hpp>

namespace zo2::llama {

/// The token embedding [vocab, hidden] (also the LM head when tied). Each layout function
/// validates the config first (ConfigError naming the field).
inline ParamLayout prologue_layout(const LlamaConfig& c) {
  c.validate();
  ParamLayout l;
  l.add("embed_tokens.weight", {c.vocab_size, c.hidden_size});
  return l;
}

/// One decoder layer. Biases and norm weights are excluded from weight decay.
inline ParamLayout block_layout(const LlamaConfig& c) {
  c.validate();
  ParamLayout l;
  const std::int64_t h = c.hidden_size, f = c.intermediate_size, q = c.q_width(), kv = c.kv_width();
  l.add("input_layernorm.weight", {h}, false);
  l.add("self_attn.q_proj.weight", {q, h});
  l.add("self_attn.k_proj.weight", {kv, h});
  l.add("self_attn.v_proj.weight", {kv, h});
  if (c.qkv_bias()) {
    l.add("self_attn.q_proj.bias", {q}, false);
    l.add("self_attn.k_proj.bias", {kv}, false);
    l.add("self_attn.v_proj.bias", {kv}, false);
  }
  if (c.qk_norm()) {
    l.add("self_attn.q_norm.weight", {c.head_dim}, false);
    l.add("self_attn.k_norm.weight", {c.head_dim}, false);
  }
  l.add("self_attn.o_proj.weight", {h, q});
  if (c.o_bias()) l.add("self_attn.o_proj.bias", {h}, false);
  l.add("post_attention_layernorm.weight", {h}, false);
  l.add("mlp.gate_proj.weight", {f, h});
  l.add("mlp.up_proj.weight", {f, h});
  if (c.has_mlp_bias()) {
    l.add("mlp.gate_proj.bias", {f}, false);
    l.add("mlp.up_proj.bias", {f}, false);
  }
  l.add("mlp.down_proj.weight", {h, f});
  if (c.has_mlp_bias()) l.add("mlp.down_proj.bias", {h}, false);
  return l;
}

/// The final RMSNorm, and the LM head [vocab, hidden] unless it is tied to the token
/// embedding (then the epilogue reads the prologue's, with the same perturbation).
inline ParamLayout epilogue_layout(const LlamaConfig& c) {
  c.validate();
  ParamLayout l;
  l.add("norm.weight", {c.hidden_size}, false);
  if (!c.tie_word_embeddings) l.add("lm_head.weight", {c.vocab_size, c.hidden_size});
  return l;
}

/// Where each tensor sits in its group's layout (ParamLayout::npos for those a config lacks).
/// The CPU model and a device model both read parameters through these.
struct BlockTensors {
  std::size_t input_norm, q_w, k_w, v_w, q_b, k_b, v_b, q_norm, k_norm, o_w, o_b, post_norm, gate_w, up_w, gate_b,
      up_b, down_w, down_b;
};
struct EpilogueTensors {
  std::size_t norm, lm_head;
};
struct TensorIndex {
  std::size_t embed_tokens;
  BlockTensors block;
  EpilogueTensors epilogue;
};

inline TensorIndex tensor_index(const ParamLayout& prologue, const ParamLayout& b, const ParamLayout& epilogue) {
  return {prologue.find("embed_tokens.weight"),
          {b.find("input_layernorm.weight"), b.find("self_attn.q_proj.weight"), b.find("self_attn.k_proj.weight"),
           b.find("self_attn.v_proj.weight"), b.find("self_attn.q_proj.bias"), b.find("self_attn.k_proj.bias"),
           b.find("self_attn.v_proj.bias"), b.find("self_attn.q_norm.weight"), b.find("self_attn.k_norm.weight"),
           b.find("self_attn.o_proj.weight"), b.find("self_attn.o_proj.bias"),
           b.find("post_attention_layernorm.weight"), b.find("mlp.gate_proj.weight"), b.find("mlp.up_proj.weight"),
           b.find("mlp.gate_proj.bias"), b.find("mlp.up_proj.bias"), b.find("mlp.down_proj.weight"),
           b.find("mlp.down_proj.bias")},
          {epilogue.find("norm.weight"), epilogue.find("lm_head.weight")}};
}

/// Number of parameters as transformers counts them (model.num_parameters(); a tied head once).
inline std::size_t parameter_count(const LlamaConfig& c) {
  auto count = [](const ParamLayout& l) {
    std::size_t n = 0;
    for (const TensorSpec& s : l.specs()) n += s.numel();
    return n;
  };
  return count(prologue_layout(c)) + static_cast<std::size_t>(c.num_hidden_layers) * count(block_layout(c)) +
         count(epilogue_layout(c));
}

/// The canonical checkpoint name of a group-local tensor: "model.<name>" for the prologue and
/// the final norm, "model.layers.<i>.<name>" for block i, "lm_head.weight" for the head.
inline std::string hf_prologue_name(const std::string& local) { return "model." + local; }
inline std::string hf_block_name(std::size_t layer, const std::string& local) {
  return "model.layers." + std::to_string(layer) + "." + local;
}
inline std::string hf_epilogue_name(const std::string& local) {
  return local == "lm_head.weight" ? local : "model." + local;
}

}  // namespace zo2::llama
