// zo2/models/opt/layout.hpp -- OPT's parameter tensors: their names, shapes and weight-decay
// flags per group (prologue, one decoder layer, epilogue), and how those names map to the
// tensor names of a Hugging Face checkpoint.
//
// The group-local names are Hugging Face's with the "model.decoder." (and "layers.<i>.")
// prefix removed, so a checkpoint tensor is found by prefixing, never by a rename table.
// Shapes are HF's too: a Linear weight is [out, in], row-major.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/opt/config.hpp>

namespace zo2::opt {

/// Token embedding [vocab, word_embed_proj_dim] (also the tied LM head), learned positions
/// [max_position_embeddings + 2, hidden], and project_in [hidden, proj] when the widths differ.
/// Each layout function validates the config first (ConfigError naming the field), so no shape
/// is computed from out-of-range sizes.
inline ParamLayout prologue_layout(const OPTConfig& c) {
  c.validate();
  ParamLayout l;
  l.add("embed_tokens.weight", {c.vocab_size, c.word_embed_proj_dim});
  l.add("embed_positions.weight", {c.max_position_embeddings + OPTConfig::position_offset, c.hidden_size});
  if (c.has_projection()) l.add("project_in.weight", {c.hidden_size, c.word_embed_proj_dim});
  return l;
}

/// One decoder layer. Biases and LayerNorm parameters are excluded from weight decay (MeZO,
/// like HF's Trainer, decays only the weight matrices).
inline ParamLayout block_layout(const OPTConfig& c) {
  c.validate();
  ParamLayout l;
  const std::int64_t h = c.hidden_size, f = c.ffn_dim;
  auto linear = [&](const std::string& name, std::int64_t out, std::int64_t in) {
    l.add(name + ".weight", {out, in});
    if (c.enable_bias) l.add(name + ".bias", {out}, /*weight_decay=*/false);
  };
  auto layer_norm = [&](const std::string& name) {
    if (!c.layer_norm_elementwise_affine) return;
    l.add(name + ".weight", {h}, false);
    l.add(name + ".bias", {h}, false);
  };
  linear("self_attn.q_proj", h, h);
  linear("self_attn.k_proj", h, h);
  linear("self_attn.v_proj", h, h);
  linear("self_attn.out_proj", h, h);
  layer_norm("self_attn_layer_norm");
  linear("fc1", f, h);
  linear("fc2", h, f);
  layer_norm("final_layer_norm");
  return l;
}

/// The decoder's final LayerNorm (pre-LN models) and project_out [proj, hidden]. The LM head
/// is not here: it is the prologue's embed_tokens (tied), so it gets the same perturbation.
/// May be empty (a post-LN model without projection).
inline ParamLayout epilogue_layout(const OPTConfig& c) {
  c.validate();
  ParamLayout l;
  if (c.has_final_layer_norm() && c.layer_norm_elementwise_affine) {
    l.add("final_layer_norm.weight", {c.hidden_size}, false);
    l.add("final_layer_norm.bias", {c.hidden_size}, false);
  }
  if (c.has_projection()) l.add("project_out.weight", {c.word_embed_proj_dim, c.hidden_size});
  return l;
}

/// Number of trainable parameters (padding excluded), as transformers counts them with tied
/// embeddings: model.num_parameters().
/// Where each tensor sits in its group's layout (ParamLayout::npos for the ones a config lacks:
/// biases without enable_bias, LayerNorm parameters without elementwise affine, project_in/out
/// without a projection). The CPU and CUDA models both read parameters through these.
struct PrologueTensors {
  std::size_t embed_tokens, embed_positions, project_in;
};
struct BlockTensors {
  std::size_t q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln1_w, ln1_b, fc1_w, fc1_b, fc2_w, fc2_b, ln2_w, ln2_b;
};
struct EpilogueTensors {
  std::size_t final_ln_weight, final_ln_bias, project_out;
};
struct TensorIndex {
  PrologueTensors prologue;
  BlockTensors block;
  EpilogueTensors epilogue;
};

inline TensorIndex tensor_index(const ParamLayout& prologue, const ParamLayout& b, const ParamLayout& epilogue) {
  return {{prologue.find("embed_tokens.weight"), prologue.find("embed_positions.weight"),
           prologue.find("project_in.weight")},
          {b.find("self_attn.q_proj.weight"), b.find("self_attn.q_proj.bias"),
           b.find("self_attn.k_proj.weight"), b.find("self_attn.k_proj.bias"),
           b.find("self_attn.v_proj.weight"), b.find("self_attn.v_proj.bias"),
           b.find("self_attn.out_proj.weight"), b.find("self_attn.out_proj.bias"),
           b.find("self_attn_layer_norm.weight"), b.find("self_attn_layer_norm.bias"),
           b.find("fc1.weight"), b.find("fc1.bias"), b.find("fc2.weight"), b.find("fc2.bias"),
           b.find("final_layer_norm.weight"), b.find("final_layer_norm.bias")},
          {epilogue.find("final_layer_norm.weight"), epilogue.find("final_layer_norm.bias"),
           epilogue.find("project_out.weight")}};
}

inline std::size_t parameter_count(const OPTConfig& c) {
  auto count = [](const ParamLayout& l) {
    std::size_t n = 0;
    for (const TensorSpec& s : l.specs()) n += s.numel();
    return n;
  };
  return count(prologue_layout(c)) + static_cast<std::size_t>(c.num_hidden_layers) * count(block_layout(c)) +
         count(epilogue_layout(c));
}

/// The canonical checkpoint name of a group-local tensor: "model.decoder.<name>" for the
/// prologue and epilogue, "model.decoder.layers.<i>.<name>" for block i.
inline std::string hf_prologue_name(const std::string& local) { return "model.decoder." + local; }
inline std::string hf_block_name(std::size_t layer, const std::string& local) {
  return "model.decoder.layers." + std::to_string(layer) + "." + local;
}
inline std::string hf_epilogue_name(const std::string& local) { return "model.decoder." + local; }

}  // namespace zo2::opt
