// zo2/models/llama/model.hpp -- the LLaMA family (Hugging Face LlamaForCausalLM,
// Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM) as a zo2::LayerStack, on the CPU with
// Eigen, matching transformers 5's float32 eager forward.
//
//   prologue   token embedding; the rotary position of each token (0..seq-1 unless the batch
//              gives position_ids, as transformers' forward does even with left padding)
//   block i    x + attn(RMSNorm(x)), then + SwiGLU-MLP(RMSNorm(.)): grouped-query causal
//              attention with rotary q/k (Qwen3: q/k RMSNorm per head first), Qwen2's q/k/v
//              biases, a sliding window on the layers that have one
//   epilogue   final RMSNorm -> LM head (its own, or the token embedding when tied) ->
//              causal-LM cross entropy (mean over labels != -100)
//
// The model owns no parameters: each function reads its group's flat buffer through a
// ParamView laid out by layout.hpp. All scratch lives in the Workspace.
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

#include <zo2/backend/cpu/transformer_kernels.hpp>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/candidates.hpp>
#include <zo2/models/model_checks.hpp>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/opt/model.hpp>  // ParamSet, param_set, kIgnoreLabel: shared by the bundled models
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2::llama {

namespace kernels = zo2::cpu::kernels;
using zo2::opt::kIgnoreLabel;
using zo2::opt::param_set;
using zo2::opt::ParamSet;

/// Positions a batch may name (position_ids): the rotary table grows to the largest one.
inline constexpr std::int64_t kMaxPositionId = std::int64_t{1} << 24;

/// A batch without position_ids numbers each row 0..seq-1: seq must stay within kMaxPositionId.
inline void check_implicit_positions(std::size_t seq) {
  if (seq > static_cast<std::size_t>(kMaxPositionId))
    throw ShapeError("LLaMA batch: seq " + std::to_string(seq) + " exceeds " + std::to_string(kMaxPositionId));
}

/// Token t's explicit position id (batch of rows of `seq` tokens) must lie in [0, kMaxPositionId).
inline void check_position_id(std::int64_t position, std::size_t t, std::size_t seq) {
  if (position < 0 || position >= kMaxPositionId)
    throw ShapeError("LLaMA batch: position_ids" + models::token_at(t, seq) + " = " + std::to_string(position) +
                     " is outside [0, " + std::to_string(kMaxPositionId) + ")");
}

template <class T = float>
class LlamaModel {
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
    /// Rotary position of each token; empty means 0..seq-1 in every row, which is what
    /// transformers' forward uses given input_ids and attention_mask, left padding included.
    /// (Its generate() passes cumsum(mask) - 1 instead; pass those here to match it.)
    std::vector<std::int32_t> position_ids;
  };

  /// The residual stream between groups, with what the blocks need to know of the batch.
  struct Activation {
    std::size_t batch = 0;
    std::size_t seq = 0;
    std::vector<std::uint8_t> key_mask;   // [batch * seq], 1 = may be attended to
    std::vector<std::int32_t> positions;  // [batch * seq], rotary position of each token
    Matrix hidden;                        // [batch * seq, hidden_size]
  };

  struct Workspace {
    Matrix normed, q, k, v, scores, context, residual, gate, up, gathered, logits;
    std::vector<std::size_t> loss_rows;      // positions that have a target
    std::vector<std::int32_t> loss_targets;  // their targets
    // Rotary tables for positions [0, rope_positions), for the frequencies in rope_inv_freq
    // (a workspace used with another model's frequencies is refilled).
    std::vector<float> rope_inv_freq, rope_cos, rope_sin;
    std::size_t rope_positions = 0;
  };

  /// `loss_chunk_rows`: the loss computes logits for this many positions at a time, so the
  /// [tokens, vocab] matrix (4 GB for a 128k vocabulary at 8192 tokens) is never materialized.
  explicit LlamaModel(LlamaConfig config, std::size_t loss_chunk_rows = 256)
      : config_(std::move(config)), loss_chunk_rows_(std::max<std::size_t>(1, loss_chunk_rows)) {
    config_.validate();
    prologue_layout_ = llama::prologue_layout(config_);
    block_layout_ = llama::block_layout(config_);
    epilogue_layout_ = llama::epilogue_layout(config_);
    const TensorIndex tensors = tensor_index(prologue_layout_, block_layout_, epilogue_layout_);
    embed_ = tensors.embed_tokens;
    blk_ = tensors.block;
    epi_ = tensors.epilogue;
    inv_freq_ = config_.rope_inv_freq();
    heads_ = static_cast<std::size_t>(config_.num_attention_heads);
    kv_heads_ = static_cast<std::size_t>(config_.num_key_value_heads);
    head_dim_ = static_cast<std::size_t>(config_.head_dim);
    for (std::size_t i = 0; i < num_blocks(); ++i)
      windows_.push_back(static_cast<std::size_t>(config_.layer_window(i)));
  }

  const LlamaConfig& config() const { return config_; }
  std::size_t num_blocks() const { return static_cast<std::size_t>(config_.num_hidden_layers); }
  const ParamLayout& prologue_layout() const { return prologue_layout_; }
  /// Whether the epilogue reads the prologue's parameters: only a tied LM head (the token
  /// embedding) does (zo2::epilogue_reads_prologue).
  bool epilogue_reads_prologue() const { return config_.tie_word_embeddings; }
  const ParamLayout& block_layout() const { return block_layout_; }
  const ParamLayout& epilogue_layout() const { return epilogue_layout_; }
  /// The rotary inverse frequencies [head_dim / 2] (config().rope_inv_freq()).
  const std::vector<float>& rope_inv_freq() const { return inv_freq_; }

  // ---- the LayerStack interface -------------------------------------------------------------

  void prologue(ParamView<const T> params, const Batch& batch, Activation& out, Workspace&) const {
    check_layout(params, prologue_layout_, "prologue");
    validate_inputs(batch);
    const std::size_t tokens = batch.batch * batch.seq;
    out.batch = batch.batch;
    out.seq = batch.seq;
    out.key_mask.resize(tokens);
    out.positions.resize(tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      out.key_mask[t] = batch.attention_mask.empty() ? 1 : static_cast<std::uint8_t>(batch.attention_mask[t]);
      out.positions[t] = batch.position_ids.empty() ? static_cast<std::int32_t>(t % batch.seq) : batch.position_ids[t];
    }
    const Eigen::Index hidden = config_.hidden_size;
    const T* embed = params.tensor(embed_);
    out.hidden.resize(static_cast<Eigen::Index>(tokens), hidden);
    for (std::size_t t = 0; t < tokens; ++t)
      std::copy_n(embed + static_cast<std::size_t>(batch.input_ids[t]) * hidden, hidden, out.hidden.data() + t * hidden);
  }

  void forward_block(std::size_t block, ParamView<const T> params, const Activation& in, Activation& out,
                     Workspace& ws) const {
    ZO2_CHECK(&in != &out, "LlamaModel::forward_block: input and output activations must differ");
    ZO2_CHECK(block < num_blocks(), "LlamaModel::forward_block: block ", block, " of ", num_blocks());
    check_layout(params, block_layout_, "block");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const double eps = config_.rms_norm_eps;
    const Eigen::Index hidden = config_.hidden_size, ffn = config_.intermediate_size;
    const Eigen::Index q_width = config_.q_width(), kv_width = config_.kv_width();
    const std::size_t tokens = in.batch * in.seq;
    out.batch = in.batch;
    out.seq = in.seq;
    out.key_mask = in.key_mask;
    out.positions = in.positions;

    // Attention: x + o_proj(attention(rope(q), rope(k), v)) of RMSNorm(x).
    kernels::rms_norm(in.hidden, tensor(blk_.input_norm), eps, ws.normed);
    kernels::linear<T>(ws.normed, tensor(blk_.q_w), tensor(blk_.q_b), q_width, ws.q);
    kernels::linear<T>(ws.normed, tensor(blk_.k_w), tensor(blk_.k_b), kv_width, ws.k);
    kernels::linear<T>(ws.normed, tensor(blk_.v_w), tensor(blk_.v_b), kv_width, ws.v);
    if (config_.qk_norm()) {
      kernels::rms_norm_rows(ws.q.data(), ws.q.data(), tokens * heads_, head_dim_, tensor(blk_.q_norm), eps);
      kernels::rms_norm_rows(ws.k.data(), ws.k.data(), tokens * kv_heads_, head_dim_, tensor(blk_.k_norm), eps);
    }
    ensure_rope_table(in.positions, ws);
    kernels::apply_rope(ws.q, heads_, head_dim_, in.positions.data(), ws.rope_cos.data(), ws.rope_sin.data());
    kernels::apply_rope(ws.k, kv_heads_, head_dim_, in.positions.data(), ws.rope_cos.data(), ws.rope_sin.data());
    kernels::grouped_causal_attention(ws.q, ws.k, ws.v, in.batch, in.seq, heads_, kv_heads_, head_dim_,
                                      in.key_mask.data(), windows_[block],
                                      1.0 / std::sqrt(static_cast<double>(head_dim_)), ws.scores, ws.context);
    kernels::linear<T>(ws.context, tensor(blk_.o_w), tensor(blk_.o_b), hidden, ws.residual);
    ws.residual += in.hidden;

    // MLP: residual + down_proj(silu(gate_proj(n)) * up_proj(n)), n = RMSNorm(residual).
    kernels::rms_norm(ws.residual, tensor(blk_.post_norm), eps, ws.normed);
    kernels::linear<T>(ws.normed, tensor(blk_.gate_w), tensor(blk_.gate_b), ffn, ws.gate);
    kernels::linear<T>(ws.normed, tensor(blk_.up_w), tensor(blk_.up_b), ffn, ws.up);
    kernels::swiglu(ws.gate, ws.up);
    kernels::linear<T>(ws.gate, tensor(blk_.down_w), tensor(blk_.down_b), hidden, out.hidden);
    out.hidden += ws.residual;
  }

  /// The batch's weight in an accumulated step: its targets (the loss is their mean).
  double batch_weight(const Batch& batch) const {
    std::size_t n = 0;
    for (std::size_t b = 0; b < batch.batch; ++b)
      for (std::size_t s = 0; s + 1 < batch.seq; ++s)
        if (b * batch.seq + s + 1 < batch.labels.size() && batch.labels[b * batch.seq + s + 1] != kIgnoreLabel) ++n;
    return static_cast<double>(n);
  }

  /// Checks a batch (ids, mask, positions, labels) before any parameter is touched; the
  /// optimizer calls it first, so a bad batch costs no perturbation. Throws ShapeError naming
  /// the field and the element.
  void validate_batch(const Batch& batch) const {
    validate_inputs(batch);
    validate_labels(batch);
  }

  /// Causal-LM loss as transformers' ForCausalLMLoss: position s of sequence b predicts
  /// labels[b, s + 1]; the mean is over targets != -100. NaN when there is no target (as HF).
  double epilogue(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                  const Batch& batch, Workspace& ws) const {
    validate_labels(batch);
    const Matrix& features = output_features(params, in, ws);
    std::vector<std::size_t>& rows = ws.loss_rows;
    std::vector<std::int32_t>& targets = ws.loss_targets;
    rows.clear();
    targets.clear();
    for (std::size_t b = 0; b < batch.batch; ++b)
      for (std::size_t s = 0; s + 1 < batch.seq; ++s) {
        const std::int32_t label = batch.labels[b * batch.seq + s + 1];
        if (label == kIgnoreLabel) continue;
        rows.push_back(b * batch.seq + s);
        targets.push_back(label);
      }
    if (rows.empty()) return std::numeric_limits<double>::quiet_NaN();

    double total = 0;
    for (std::size_t start = 0; start < rows.size(); start += loss_chunk_rows_) {
      const std::size_t count = std::min(loss_chunk_rows_, rows.size() - start);
      ws.gathered.resize(static_cast<Eigen::Index>(count), features.cols());
      for (std::size_t r = 0; r < count; ++r) ws.gathered.row(static_cast<Eigen::Index>(r)) = features.row(rows[start + r]);
      lm_head(params, prologue_params, ws.gathered, ws.logits);
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
    lm_head(params.epilogue, params.prologue, output_features(params.epilogue, h, ws), result);
    return result;
  }

  /// The causal-LM loss (the epilogue's) at the given parameters.
  double loss(const ParamSet<T>& params, const Batch& batch, Workspace& ws) const {
    validate_labels(batch);
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
      lm_head(params.epilogue, params.prologue, features.middleRows(static_cast<Eigen::Index>(row), 1), row_logits);
      return static_cast<double>(row_logits(0, token)) - kernels::log_sum_exp(row_logits.data(), row_logits.cols());
    });
  }

 private:
  static constexpr const char* kBatchName = "LLaMA batch";

  static void check_layout(const ParamView<const T>& params, const ParamLayout& expected, const char* group) {
    models::check_group_layout(params, expected, "LlamaModel", group, "LLaMA-family");
  }

  void validate_inputs(const Batch& batch) const {
    models::check_batch_sizes(batch, kBatchName);
    if (batch.position_ids.empty()) check_implicit_positions(batch.seq);
    for (std::size_t t = 0; t < batch.batch * batch.seq; ++t) {
      models::check_token(batch, t, config_.vocab_size, kBatchName);
      if (!batch.position_ids.empty()) check_position_id(batch.position_ids[t], t, batch.seq);
    }
  }

  void validate_labels(const Batch& batch) const {
    models::check_labels_present(batch, kBatchName);
    for (std::size_t t = 0; t < batch.labels.size(); ++t) models::check_label(batch, t, config_.vocab_size, kBatchName);
  }

  /// Grows the workspace's rotary tables to cover every position of the batch.
  void ensure_rope_table(const std::vector<std::int32_t>& positions, Workspace& ws) const {
    std::size_t needed = 0;
    for (const std::int32_t p : positions) needed = std::max(needed, static_cast<std::size_t>(p) + 1);
    if (ws.rope_inv_freq != inv_freq_) {
      ws.rope_inv_freq = inv_freq_;
      ws.rope_positions = 0;
    }
    if (needed <= ws.rope_positions) return;
    const std::size_t rows = std::max(needed, std::min<std::size_t>(2 * ws.rope_positions, kMaxPositionId));
    const std::size_t half = inv_freq_.size();
    ws.rope_cos.resize(rows * half);
    ws.rope_sin.resize(rows * half);
    kernels::rope_table(inv_freq_.data(), half, rows, config_.rope_attention_scaling(), ws.rope_cos.data(),
                        ws.rope_sin.data());
    ws.rope_positions = rows;
  }

  void forward_to_output(const ParamSet<T>& params, const Batch& batch, Activation& h, Workspace& ws) const {
    if (params.blocks.size() != num_blocks())
      throw ShapeError("LlamaModel: " + std::to_string(params.blocks.size()) +
                       " blocks of parameters given, the model has " + std::to_string(num_blocks()));
    Activation next;
    prologue(params.prologue, batch, h, ws);
    for (std::size_t i = 0; i < num_blocks(); ++i) {
      forward_block(i, params.blocks[i], h, next, ws);
      std::swap(h, next);
    }
  }

  /// The final RMSNorm of the residual stream: what the LM head reads.
  const Matrix& output_features(ParamView<const T> params, const Activation& in, Workspace& ws) const {
    check_layout(params, epilogue_layout_, "epilogue");
    kernels::rms_norm(in.hidden, params.tensor(epi_.norm), config_.rms_norm_eps, ws.normed);
    return ws.normed;
  }

  /// logits = features W^T with W the LM head [vocab, hidden]: the epilogue's own, or the
  /// prologue's token embedding when tied.
  void lm_head(ParamView<const T> epilogue_params, ParamView<const T> prologue_params,
               const kernels::ConstRowsRef<T>& features, Matrix& logits) const {
    const T* weight = nullptr;
    if (config_.tie_word_embeddings) {
      check_layout(prologue_params, prologue_layout_, "prologue");
      weight = prologue_params.tensor(embed_);
    } else {
      check_layout(epilogue_params, epilogue_layout_, "epilogue");
      weight = epilogue_params.tensor(epi_.lm_head);
    }
    kernels::linear<T>(features, weight, nullptr, config_.vocab_size, logits);
  }

  LlamaConfig config_;
  std::size_t loss_chunk_rows_;
  ParamLayout prologue_layout_, block_layout_, epilogue_layout_;
  std::size_t embed_ = 0;
  BlockTensors blk_{};
  EpilogueTensors epi_{};
  std::vector<float> inv_freq_;
  std::vector<std::size_t> windows_;  // per layer, 0 = full causal attention
  std::size_t heads_ = 0, kv_heads_ = 0, head_dim_ = 0;
};

static_assert(LayerStack<LlamaModel<float>>);
static_assert(LayerStack<LlamaModel<double>>);

}  // namespace zo2::llama
