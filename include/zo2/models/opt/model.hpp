// zo2/models/opt/model.hpp -- OPT (Hugging Face OPTForCausalLM) as a zo2::LayerStack, on the
// CPU with Eigen, matching transformers' float32 eager forward.
//
//   prologue   token embedding (-> project_in) + learned positions from the attention mask
//   block i    one decoder layer: pre-LN or post-LN, causal multi-head attention, FFN
//   epilogue   final LayerNorm (pre-LN) -> project_out -> LM head tied to the token
//              embedding -> causal-LM cross entropy (mean over labels != -100)
//
// The model owns no parameters: each function reads its group's flat buffer through a
// ParamView laid out by layout.hpp. All scratch lives in the Workspace, so a steady-state step
// reuses its matrices and allocates nothing of size.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/candidates.hpp>
#include <zo2/models/model_checks.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/backend/cpu/transformer_kernels.hpp>
#include <zo2/models/opt/layout.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2::opt {

namespace kernels = zo2::cpu::kernels;


/// Every group's parameters at one point (theta, or a perturbed copy), for a whole forward.
template <class T>
struct ParamSet {
  ParamView<const T> prologue;
  std::vector<ParamView<const T>> blocks;
  ParamView<const T> epilogue;
};

/// The current parameters of a store whose storage type is the model's precision.
template <class T>
ParamSet<T> param_set(const ParameterStore<T>& store) {
  const ModelLayout& ml = store.model_layout();
  ParamSet<T> set{store.group(ml.prologue()), {}, store.group(ml.epilogue())};
  for (std::size_t i = 0; i < ml.num_blocks(); ++i) set.blocks.push_back(store.group(ml.block(i)));
  return set;
}

/// HF's ignore index for labels.
inline constexpr std::int32_t kIgnoreLabel = -100;

template <class T = float>
class OPTModel {
 public:
  using value_type = T;
  using Matrix = kernels::RowMatrix<T>;

  /// `batch` sequences of `seq` tokens, row-major [batch, seq].
  struct Batch {
    std::size_t batch = 0;
    std::size_t seq = 0;
    std::vector<std::int32_t> input_ids;
    /// 1 = real token, 0 = padding; empty means all ones.
    std::vector<std::int32_t> attention_mask;
    /// Target of each position (the loss shifts them: position s predicts labels[s + 1]);
    /// -100 = ignored. Needed by the epilogue (the loss), not by logits().
    std::vector<std::int32_t> labels;
  };

  /// The residual stream between groups, with what the blocks need to know of the batch
  /// (forward_block sees no Batch).
  struct Activation {
    std::size_t batch = 0;
    std::size_t seq = 0;
    std::vector<std::uint8_t> key_mask;  // [batch * seq], 1 = may be attended to
    Matrix hidden;                       // [batch * seq, hidden_size]
  };

  struct Workspace {
    Matrix normed, q, k, v, scores, context, residual, ffn, projected, gathered, logits;
    std::vector<std::size_t> loss_rows;       // positions that have a target
    std::vector<std::int32_t> loss_targets;   // their targets
  };

  /// `loss_chunk_rows`: the loss computes logits for this many positions at a time, so the
  /// [tokens, vocab] matrix (823 MB for opt-125m at 4096 tokens) is never materialized.
  explicit OPTModel(OPTConfig config, std::size_t loss_chunk_rows = 256)
      : config_(std::move(config)), loss_chunk_rows_(std::max<std::size_t>(1, loss_chunk_rows)) {
    config_.validate();
    prologue_layout_ = opt::prologue_layout(config_);
    block_layout_ = opt::block_layout(config_);
    epilogue_layout_ = opt::epilogue_layout(config_);
    activation_ = kernels::parse_activation(config_.activation_function);
    const TensorIndex tensors = tensor_index(prologue_layout_, block_layout_, epilogue_layout_);
    pro_ = tensors.prologue;
    blk_ = tensors.block;
    epi_ = tensors.epilogue;
  }

  const OPTConfig& config() const { return config_; }
  std::size_t num_blocks() const { return static_cast<std::size_t>(config_.num_hidden_layers); }
  const ParamLayout& prologue_layout() const { return prologue_layout_; }
  const ParamLayout& block_layout() const { return block_layout_; }
  const ParamLayout& epilogue_layout() const { return epilogue_layout_; }

  // ---- the LayerStack interface -------------------------------------------------------------

  void prologue(ParamView<const T> params, const Batch& batch, Activation& out, Workspace& ws) const {
    check_layout(params, prologue_layout_, "prologue");
    validate_inputs(batch);
    const std::size_t tokens = batch.batch * batch.seq;
    out.batch = batch.batch;
    out.seq = batch.seq;
    out.key_mask.resize(tokens);
    for (std::size_t t = 0; t < tokens; ++t)
      out.key_mask[t] = batch.attention_mask.empty() ? 1 : static_cast<std::uint8_t>(batch.attention_mask[t]);

    const Eigen::Index proj = config_.word_embed_proj_dim, hidden = config_.hidden_size;
    const T* embed = params.tensor(pro_.embed_tokens);
    Matrix& token_embeds = config_.has_projection() ? ws.projected : out.hidden;
    token_embeds.resize(static_cast<Eigen::Index>(tokens), proj);
    for (std::size_t t = 0; t < tokens; ++t)
      std::copy_n(embed + static_cast<std::size_t>(batch.input_ids[t]) * proj, proj,
                  token_embeds.data() + t * proj);
    if (config_.has_projection())
      kernels::linear<T>(token_embeds, params.tensor(pro_.project_in), nullptr, hidden, out.hidden);

    // Positions as transformers derives them from the mask: cumsum(mask) * mask - 1, plus
    // OPT's offset 2. Left padding thus starts each sequence at position 2; pads read row 1.
    const T* positions = params.tensor(pro_.embed_positions);
    for (std::size_t b = 0; b < batch.batch; ++b) {
      std::int64_t cumulative = 0;
      for (std::size_t s = 0; s < batch.seq; ++s) {
        const std::size_t t = b * batch.seq + s;
        const std::int64_t m = out.key_mask[t];
        cumulative += m;
        const std::int64_t row = cumulative * m - 1 + OPTConfig::position_offset;
        const T* pos = positions + row * hidden;
        T* h = out.hidden.data() + t * hidden;
        for (Eigen::Index i = 0; i < hidden; ++i) h[i] += pos[i];
      }
    }
  }

  void forward_block(std::size_t /*block*/, ParamView<const T> params, const Activation& in, Activation& out,
                     Workspace& ws) const {
    ZO2_CHECK(&in != &out, "OPTModel::forward_block: input and output activations must differ");
    check_layout(params, block_layout_, "block");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const bool pre_ln = config_.do_layer_norm_before;
    const double eps = OPTConfig::layer_norm_eps;
    const Eigen::Index hidden = config_.hidden_size, ffn = config_.ffn_dim;
    out.batch = in.batch;
    out.seq = in.seq;
    out.key_mask = in.key_mask;

    // Attention sub-layer: residual + attn(LN(x)) (pre-LN) or LN(residual + attn(x)) (post-LN).
    const Matrix& x = in.hidden;
    const Matrix* attn_in = &x;
    if (pre_ln) {
      kernels::layer_norm(x, tensor(blk_.ln1_w), tensor(blk_.ln1_b), eps, ws.normed);
      attn_in = &ws.normed;
    }
    kernels::linear<T>(*attn_in, tensor(blk_.q_w), tensor(blk_.q_b), hidden, ws.q);
    kernels::linear<T>(*attn_in, tensor(blk_.k_w), tensor(blk_.k_b), hidden, ws.k);
    kernels::linear<T>(*attn_in, tensor(blk_.v_w), tensor(blk_.v_b), hidden, ws.v);
    kernels::causal_attention(ws.q, ws.k, ws.v, in.batch, in.seq,
                              static_cast<std::size_t>(config_.num_attention_heads), in.key_mask.data(),
                              ws.scores, ws.context);
    kernels::linear<T>(ws.context, tensor(blk_.o_w), tensor(blk_.o_b), hidden, ws.residual);
    ws.residual += x;
    if (!pre_ln) {
      kernels::layer_norm(ws.residual, tensor(blk_.ln1_w), tensor(blk_.ln1_b), eps, ws.normed);
      ws.residual.swap(ws.normed);
    }

    // Feed-forward sub-layer, same arrangement.
    const Matrix* ffn_in = &ws.residual;
    if (pre_ln) {
      kernels::layer_norm(ws.residual, tensor(blk_.ln2_w), tensor(blk_.ln2_b), eps, ws.normed);
      ffn_in = &ws.normed;
    }
    kernels::linear<T>(*ffn_in, tensor(blk_.fc1_w), tensor(blk_.fc1_b), ffn, ws.ffn);
    kernels::activate(ws.ffn, activation_);
    kernels::linear<T>(ws.ffn, tensor(blk_.fc2_w), tensor(blk_.fc2_b), hidden, out.hidden);
    out.hidden += ws.residual;
    if (!pre_ln) {
      kernels::layer_norm(out.hidden, tensor(blk_.ln2_w), tensor(blk_.ln2_b), eps, ws.normed);
      out.hidden.swap(ws.normed);
    }
  }

  /// The batch's weight in an accumulated step: its targets (the loss is their mean).
  double batch_weight(const Batch& batch) const {
    std::size_t n = 0;
    for (std::size_t b = 0; b < batch.batch; ++b)
      for (std::size_t s = 0; s + 1 < batch.seq; ++s)
        if (b * batch.seq + s + 1 < batch.labels.size() && batch.labels[b * batch.seq + s + 1] != kIgnoreLabel) ++n;
    return static_cast<double>(n);
  }

  /// Causal-LM loss as transformers' ForCausalLMLoss: position s of sequence b predicts
  /// labels[b, s + 1]; the mean is over targets != -100. NaN when there is no target (as HF).
  double epilogue(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                  const Batch& batch, Workspace& ws) const {
    models::check_labels_present(batch, kBatchName);
    const Matrix& features = output_features(params, in, ws);
    std::vector<std::size_t>& rows = ws.loss_rows;
    std::vector<std::int32_t>& targets = ws.loss_targets;
    rows.clear();
    targets.clear();
    for (std::size_t b = 0; b < batch.batch; ++b)
      for (std::size_t s = 0; s + 1 < batch.seq; ++s) {
        const std::int32_t label = batch.labels[b * batch.seq + s + 1];
        if (label == kIgnoreLabel) continue;
        models::check_label(batch, b * batch.seq + s + 1, config_.vocab_size, kBatchName);
        rows.push_back(b * batch.seq + s);
        targets.push_back(label);
      }
    if (rows.empty()) return std::numeric_limits<double>::quiet_NaN();

    double total = 0;
    const Eigen::Index proj = features.cols();
    for (std::size_t start = 0; start < rows.size(); start += loss_chunk_rows_) {
      const std::size_t count = std::min(loss_chunk_rows_, rows.size() - start);
      ws.gathered.resize(static_cast<Eigen::Index>(count), proj);
      for (std::size_t r = 0; r < count; ++r) ws.gathered.row(r) = features.row(rows[start + r]);
      lm_head(prologue_params, ws.gathered, ws.logits);
      for (std::size_t r = 0; r < count; ++r) {
        const T* row = ws.logits.data() + r * ws.logits.cols();
        total += kernels::log_sum_exp(row, ws.logits.cols()) - static_cast<double>(row[targets[start + r]]);
      }
    }
    return total / static_cast<double>(rows.size());
  }

  // ---- whole-model conveniences -------------------------------------------------------------

  /// Logits [batch * seq, vocab] (row b * seq + s) at the given parameters.
  Matrix logits(const ParamSet<T>& params, const Batch& batch, Workspace& ws) const {
    Activation h;
    forward_to_output(params, batch, h, ws);
    Matrix result;
    lm_head(params.prologue, output_features(params.epilogue, h, ws), result);
    return result;
  }

  /// The causal-LM loss (the epilogue's) at the given parameters.
  double loss(const ParamSet<T>& params, const Batch& batch, Workspace& ws) const {
    Activation h;
    forward_to_output(params, batch, h, ws);
    return epilogue(params.epilogue, params.prologue, h, batch, ws);
  }

  /// MeZO-style classification: for each candidate continuation, sum over its tokens of
  /// log p(token | prompt, earlier candidate tokens). One forward for all candidates (right
  /// padding, which causal attention never lets a real token see).
  std::vector<double> score_candidates(const ParamSet<T>& params, std::span<const std::int32_t> prompt,
                                       const std::vector<std::vector<std::int32_t>>& candidates,
                                       Workspace& ws) const {
    const Batch batch = models::candidate_batch<Batch>(prompt, candidates, config_.pad_token_id);
    if (batch.batch == 0) return {};
    Activation h;
    forward_to_output(params, batch, h, ws);
    const Matrix& features = output_features(params.epilogue, h, ws);
    Matrix row_logits;
    return models::candidate_scores(prompt.size(), batch.seq, candidates, [&](std::size_t row, std::int32_t token) {
      lm_head(params.prologue, features.middleRows(static_cast<Eigen::Index>(row), 1), row_logits);
      return static_cast<double>(row_logits(0, token)) - kernels::log_sum_exp(row_logits.data(), row_logits.cols());
    });
  }

 private:
  static constexpr const char* kBatchName = "OPT batch";

  static void check_layout(const ParamView<const T>& params, const ParamLayout& expected, const char* group) {
    models::check_group_layout(params, expected, "OPTModel", group, "OPT");
  }

  void validate_inputs(const Batch& batch) const {
    models::check_batch_sizes(batch, kBatchName);
    for (std::size_t t = 0; t < batch.batch * batch.seq; ++t)
      models::check_token(batch, t, config_.vocab_size, kBatchName);
    for (std::size_t b = 0; b < batch.batch; ++b) {
      std::size_t real = batch.seq;
      if (!batch.attention_mask.empty())
        real = static_cast<std::size_t>(std::count(batch.attention_mask.begin() + b * batch.seq,
                                                   batch.attention_mask.begin() + (b + 1) * batch.seq, 1));
      if (real > static_cast<std::size_t>(config_.max_position_embeddings))
        throw ShapeError("OPT batch: sequence " + std::to_string(b) + " has " + std::to_string(real) +
                         " tokens, more than max_position_embeddings = " +
                         std::to_string(config_.max_position_embeddings));
    }
  }

  void forward_to_output(const ParamSet<T>& params, const Batch& batch, Activation& h, Workspace& ws) const {
    if (params.blocks.size() != num_blocks())
      throw ShapeError("OPTModel: " + std::to_string(params.blocks.size()) + " blocks of parameters given, the model has " +
                       std::to_string(num_blocks()));
    Activation next;
    prologue(params.prologue, batch, h, ws);
    for (std::size_t i = 0; i < num_blocks(); ++i) {
      forward_block(i, params.blocks[i], h, next, ws);
      std::swap(h, next);
    }
  }

  /// What the LM head reads: final LayerNorm (if any), then project_out (if any).
  /// The result is [tokens, word_embed_proj_dim]; it may alias in.hidden.
  const Matrix& output_features(ParamView<const T> params, const Activation& in, Workspace& ws) const {
    check_layout(params, epilogue_layout_, "epilogue");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const Matrix* features = &in.hidden;
    if (config_.has_final_layer_norm()) {
      kernels::layer_norm(in.hidden, tensor(epi_.final_ln_weight), tensor(epi_.final_ln_bias),
                          OPTConfig::layer_norm_eps, ws.normed);
      features = &ws.normed;
    }
    if (config_.has_projection()) {
      kernels::linear<T>(*features, tensor(epi_.project_out), nullptr, config_.word_embed_proj_dim, ws.projected);
      features = &ws.projected;
    }
    return *features;
  }

  /// logits = features E^T with E the (tied) token embedding [vocab, proj].
  void lm_head(ParamView<const T> prologue_params, const kernels::ConstRowsRef<T>& features, Matrix& logits) const {
    check_layout(prologue_params, prologue_layout_, "prologue");
    kernels::linear<T>(features, prologue_params.tensor(pro_.embed_tokens), nullptr, config_.vocab_size, logits);
  }

  OPTConfig config_;
  std::size_t loss_chunk_rows_;
  ParamLayout prologue_layout_, block_layout_, epilogue_layout_;
  kernels::Activation activation_ = kernels::Activation::relu;
  PrologueTensors pro_{};
  BlockTensors blk_{};
  EpilogueTensors epi_{};
};

static_assert(LayerStack<OPTModel<float>>);
static_assert(LayerStack<OPTModel<double>>);

}  // namespace zo2::opt
