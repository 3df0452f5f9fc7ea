// zo2/models/llama/cuda/llama_cuda_model.cuh -- the LLaMA family (Hugging Face LlamaForCausalLM,
// Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM) as a zo2::LayerStack on the GPU: the
// same parameter layouts as the CPU LlamaModel (layout.hpp), so one ParameterStore feeds both,
// with device pointers in the views, and the same arithmetic (model.hpp says what is computed).
//
//   prologue   token embedding; the batch carries each token's rotary position (0..seq-1, or
//              its position_ids) and the cos/sin table of the model's frequencies
//   block i    RMSNorm -> q/k/v (one GEMM over the fused [q + 2 kv, hidden] weight where the
//              layout makes it one matrix; Qwen2's biases in its epilogue) -> per-head q/k RMSNorm
//              (Qwen3) and RoPE in one in-place pass -> grouped-query causal attention with the
//              layer's sliding window (flash kernels at head_dim 64/128 in 16 bits, cuBLASLt
//              otherwise) -> o_proj with the residual fused (beta = 1) -> RMSNorm -> gate/up (one
//              GEMM) -> SwiGLU in one pass -> down_proj with the residual fused
//   epilogue   final RMSNorm -> LM head (its own, or the token embedding when tied) in vocabulary
//              chunks -> causal-LM cross entropy (mean over labels != -100), a double (one sync)
//
// Precision: T is float, zo2::bfloat16 or zo2::float16; GEMMs and reductions accumulate in fp32
// (the loss in double). fp32 GEMMs do not use TF32 unless Options::allow_tf32.
//
// Streams and memory as OPTCudaModel: everything on one stream (the policy's: constructor or
// set_stream), buffers grow on first use and are reused, so a steady-state step allocates nothing.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/cross_entropy.cuh>
#include <zo2/backend/cuda/embedding.cuh>
#include <zo2/backend/cuda/flash_attention.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/rmsnorm.cuh>
#include <zo2/backend/cuda/rope.cuh>
#include <zo2/backend/cuda/swiglu.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/llama/config.hpp>
#include <zo2/models/model_checks.hpp>
#include <zo2/models/llama/layout.hpp>
#include <zo2/models/llama/model.hpp>  // kMaxPositionId, kIgnoreLabel
#include <zo2/optim/layer_stack.hpp>

namespace zo2::llama {

/// Options of LlamaCudaModel (outside the class, as OPTCudaOptions).
struct LlamaCudaOptions {
  /// Vocabulary columns per LM-head chunk in the loss: at most rows x chunk fp32 logits exist.
  std::int64_t vocab_chunk = 8192;
  /// fp32 GEMMs on TF32 tensor cores (off: exact fp32, for parity tests).
  bool allow_tf32 = false;
  /// q/k/v as one GEMM and gate/up as one GEMM where the block layout holds each as one matrix
  /// (sizes multiples of 32: every published config); off: one GEMM per projection.
  bool fused_projections = true;
  /// Grouped-query attention by the fused flash kernels (bf16/fp16, head_dim 64 or 128; other
  /// cases take the cuBLASLt path regardless).
  bool flash_attention = true;
  /// Which fused kernel (as OPTCudaOptions::flash_kernel).
  gpu::FlashKernel flash_kernel = gpu::FlashKernel::kAuto;
  /// cuBLASLt autotuning (gpu::Gemm::set_autotune); 0: the heuristic's first choice.
  int gemm_autotune = 0;
};

template <class T>
class LlamaCudaModel {
 public:
  using value_type = T;
  static_assert(gpu::is_kernel_type_v<T>, "LlamaCudaModel<T>: T is float, zo2::bfloat16 or zo2::float16");

  using Options = LlamaCudaOptions;

  /// A batch on the device: uploaded by make_batch (or refilled by upload_batch), read by every
  /// pass. Its buffers are capacities: the first batch * seq (or num_loss_rows) entries count.
  struct Batch {
    std::size_t batch = 0, seq = 0;
    gpu::DeviceBuffer<std::int32_t> input_ids, positions;
    gpu::DeviceBuffer<std::uint8_t> key_mask;
    /// No 0 in attention_mask: attention runs without a mask (same result, no masking work).
    bool all_visible = true;
    /// cos and sin of every position up to the batch's largest, for the model's frequencies:
    /// [rope_positions, head_dim / 2].
    gpu::DeviceBuffer<float> rope_cos, rope_sin;
    std::size_t rope_positions = 0;
    /// Rows (b * seq + s) whose shifted label labels[b, s + 1] is a target, and those targets.
    gpu::DeviceBuffer<std::int32_t> loss_rows, loss_targets;
    std::size_t num_loss_rows = 0;
    bool has_labels = false;
  };

  /// The residual stream, plus what the blocks need of the batch (forward_block sees no Batch):
  /// pointers into the batch's device buffers, not owned.
  struct Activation {
    std::size_t batch = 0, seq = 0;
    const std::uint8_t* key_mask = nullptr;   // null: every key visible
    const std::int32_t* positions = nullptr;  // [batch * seq]
    const float* rope_cos = nullptr;
    const float* rope_sin = nullptr;
    gpu::DeviceBuffer<T> hidden;  // [batch * seq, hidden_size]
  };

  struct Workspace {
    gpu::DeviceBuffer<T> normed, qkv, context, residual, mlp, gathered;
    gpu::AttentionScratch<T> attention;
    gpu::CrossEntropyScratch loss;
    gpu::DeviceBuffer<float> logits, log_probs;
    gpu::PinnedBuffer<double> loss_host;
    /// The residual stream of the whole-model conveniences (logits, loss, label_log_probs).
    Activation whole[2];
  };

  explicit LlamaCudaModel(LlamaConfig config, cudaStream_t stream = nullptr, Options options = {})
      : config_(std::move(config)), options_(options), stream_(stream), gemm_(std::make_unique<gpu::Gemm>()) {
    config_.validate();
    gemm_->set_allow_tf32(options_.allow_tf32);
    gemm_->set_autotune(options_.gemm_autotune);
    prologue_layout_ = llama::prologue_layout(config_);
    block_layout_ = llama::block_layout(config_);
    epilogue_layout_ = llama::epilogue_layout(config_);
    const TensorIndex tensors = tensor_index(prologue_layout_, block_layout_, epilogue_layout_);
    embed_ = tensors.embed_tokens;
    blk_ = tensors.block;
    epi_ = tensors.epilogue;
    heads_ = config_.num_attention_heads;
    kv_heads_ = config_.num_key_value_heads;
    head_dim_ = config_.head_dim;
    for (std::size_t i = 0; i < num_blocks(); ++i) windows_.push_back(config_.layer_window(i));

    // q/k/v (and their biases), gate/up (and theirs) one after the other: one GEMM each.
    const ParamLayout& b = block_layout_;
    const std::int64_t h = config_.hidden_size, f = config_.intermediate_size;
    const std::int64_t qw = config_.q_width(), kvw = config_.kv_width();
    auto at = [&](std::size_t i) { return static_cast<std::int64_t>(b.offset(i)); };
    fused_qkv_ = at(blk_.k_w) == at(blk_.q_w) + qw * h && at(blk_.v_w) == at(blk_.k_w) + kvw * h;
    if (config_.qkv_bias())
      fused_qkv_ = fused_qkv_ && at(blk_.k_b) == at(blk_.q_b) + qw && at(blk_.v_b) == at(blk_.k_b) + kvw;
    fused_gate_up_ = at(blk_.up_w) == at(blk_.gate_w) + f * h;
    if (config_.has_mlp_bias()) fused_gate_up_ = fused_gate_up_ && at(blk_.up_b) == at(blk_.gate_b) + f;

    const std::vector<float> inv_freq = config_.rope_inv_freq();
    inv_freq_ = gpu::DeviceBuffer<float>(inv_freq.size());
    gpu::copy_to_device(inv_freq_.data(), inv_freq.data(), inv_freq.size(), stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  const LlamaConfig& config() const { return config_; }
  const Options& options() const { return options_; }
  std::size_t num_blocks() const { return static_cast<std::size_t>(config_.num_hidden_layers); }
  const ParamLayout& prologue_layout() const { return prologue_layout_; }
  /// Whether the epilogue reads the prologue's parameters: only a tied LM head (the token
  /// embedding) does (zo2::epilogue_reads_prologue).
  bool epilogue_reads_prologue() const { return config_.tie_word_embeddings; }
  const ParamLayout& block_layout() const { return block_layout_; }
  const ParamLayout& epilogue_layout() const { return epilogue_layout_; }
  cudaStream_t stream() const { return stream_; }
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  gpu::Gemm& gemm() const { return *gemm_; }
  /// Whether q/k/v and gate/up each run as one GEMM (Options::fused_projections and the layout).
  bool fused_qkv() const { return options_.fused_projections && fused_qkv_; }
  bool fused_gate_up() const { return options_.fused_projections && fused_gate_up_; }

  /// Uploads a host batch (any type with batch, seq, input_ids, attention_mask, labels and
  /// optionally position_ids, as LlamaModel<float>::Batch): validates it as the CPU model does
  /// (ShapeError naming the field and element), computes the rotary table of its positions on the
  /// device. Blocks until uploaded (the host vectors may go away afterwards).
  template <class HostBatch>
  Batch make_batch(const HostBatch& host) const {
    Batch b;
    upload_batch(host, b);
    return b;
  }

  /// make_batch into an existing Batch, reusing its device buffers (they grow when the batch is
  /// larger than any before). Enqueued on the model's stream after whatever reads `b` there, and
  /// waits for that stream before returning. On a validation error `b` is left as it was.
  template <class HostBatch>
  void upload_batch(const HostBatch& host, Batch& b) const {
    const std::size_t tokens = host.batch * host.seq;
    models::check_batch_sizes(host, kBatchName);
    bool explicit_positions = false;
    if constexpr (requires { host.position_ids; }) explicit_positions = !host.position_ids.empty();
    if (!explicit_positions) check_implicit_positions(host.seq);
    if (tokens > 0x7fffffff) throw ShapeError("LLaMA batch: more than 2^31 tokens");

    std::vector<std::int32_t> ids(tokens), positions(tokens);
    std::vector<std::uint8_t> mask(tokens, 1);
    bool all_visible = true;
    std::int64_t max_position = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
      models::check_token(host, t, config_.vocab_size, kBatchName);
      ids[t] = static_cast<std::int32_t>(host.input_ids[t]);
      if (!host.attention_mask.empty()) {
        const auto m = static_cast<std::int64_t>(host.attention_mask[t]);
        mask[t] = static_cast<std::uint8_t>(m);
        all_visible = all_visible && m == 1;
      }
      std::int64_t p = static_cast<std::int64_t>(t % host.seq);
      if constexpr (requires { host.position_ids; }) {
        if (explicit_positions) {
          p = static_cast<std::int64_t>(host.position_ids[t]);
          check_position_id(p, t, host.seq);
        }
      }
      positions[t] = static_cast<std::int32_t>(p);
      max_position = std::max(max_position, p);
    }
    std::vector<std::int32_t> rows, targets;
    if (!host.labels.empty()) {
      for (std::size_t s = 0; s < host.batch; ++s)
        for (std::size_t p = 0; p + 1 < host.seq; ++p) {
          const std::size_t t = s * host.seq + p + 1;
          const auto label = static_cast<std::int64_t>(host.labels[t]);
          if (label == kIgnoreLabel) continue;
          models::check_label(host, t, config_.vocab_size, kBatchName);
          rows.push_back(static_cast<std::int32_t>(s * host.seq + p));
          targets.push_back(static_cast<std::int32_t>(label));
        }
    }

    b.batch = host.batch;
    b.seq = host.seq;
    b.all_visible = all_visible;
    b.has_labels = !host.labels.empty();
    b.input_ids.reserve(tokens);
    b.positions.reserve(tokens);
    b.key_mask.reserve(tokens);
    gpu::copy_to_device(b.input_ids.data(), ids.data(), tokens, stream_);
    gpu::copy_to_device(b.positions.data(), positions.data(), tokens, stream_);
    gpu::copy_to_device(b.key_mask.data(), mask.data(), tokens, stream_);
    b.num_loss_rows = rows.size();
    if (!rows.empty()) {
      b.loss_rows.reserve(rows.size());
      b.loss_targets.reserve(rows.size());
      gpu::copy_to_device(b.loss_rows.data(), rows.data(), rows.size(), stream_);
      gpu::copy_to_device(b.loss_targets.data(), targets.data(), targets.size(), stream_);
    }
    // The table is the model's (its frequencies), rebuilt with every upload: a few microseconds.
    const auto half = static_cast<std::size_t>(head_dim_ / 2);
    b.rope_positions = static_cast<std::size_t>(max_position) + 1;
    b.rope_cos.reserve(b.rope_positions * half);
    b.rope_sin.reserve(b.rope_positions * half);
    gpu::rope_table(inv_freq_.data(), static_cast<std::int64_t>(half), static_cast<std::int64_t>(b.rope_positions),
                     static_cast<float>(config_.rope_attention_scaling()), b.rope_cos.data(), b.rope_sin.data(),
                     stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // ---- the LayerStack interface -------------------------------------------------------------

  void prologue(ParamView<const T> params, const Batch& batch, Activation& out, Workspace&) const {
    check_layout(params, prologue_layout_, "prologue");
    const auto tokens = static_cast<std::int64_t>(batch.batch * batch.seq);
    if (tokens == 0) throw ShapeError("LlamaCudaModel::prologue: empty batch (use make_batch)");
    const std::int64_t hidden = config_.hidden_size;
    out.batch = batch.batch;
    out.seq = batch.seq;
    out.key_mask = batch.all_visible ? nullptr : batch.key_mask.data();
    out.positions = batch.positions.data();
    out.rope_cos = batch.rope_cos.data();
    out.rope_sin = batch.rope_sin.data();
    out.hidden.reserve(static_cast<std::size_t>(tokens * hidden));
    gpu::embed<T>(batch.input_ids.data(), params.tensor(embed_), nullptr, nullptr, out.hidden.data(), tokens, hidden,
                   stream_);
  }

  void forward_block(std::size_t block, ParamView<const T> params, const Activation& in, Activation& out,
                     Workspace& ws) const {
    ZO2_CHECK(&in != &out, "LlamaCudaModel::forward_block: input and output activations must differ");
    ZO2_CHECK(block < num_blocks(), "LlamaCudaModel::forward_block: block ", block, " of ", num_blocks());
    check_layout(params, block_layout_, "block");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    const std::int64_t hidden = config_.hidden_size, ffn = config_.intermediate_size;
    const std::int64_t qw = config_.q_width(), kvw = config_.kv_width(), qkv_width = qw + 2 * kvw;
    const auto n_hidden = static_cast<std::size_t>(tokens * hidden);
    out.batch = in.batch;
    out.seq = in.seq;
    out.key_mask = in.key_mask;
    out.positions = in.positions;
    out.rope_cos = in.rope_cos;
    out.rope_sin = in.rope_sin;
    out.hidden.reserve(n_hidden);
    ws.normed.reserve(n_hidden);
    ws.qkv.reserve(static_cast<std::size_t>(tokens * qkv_width));
    ws.context.reserve(static_cast<std::size_t>(tokens * qw));
    ws.residual.reserve(n_hidden);
    ws.mlp.reserve(static_cast<std::size_t>(tokens * 2 * ffn));
    const float eps = static_cast<float>(config_.rms_norm_eps);
    const T* x = in.hidden.data();

    // Attention: residual = x + o_proj(attention(rope(q), rope(k), v)) of RMSNorm(x).
    gpu::rms_norm<T>(x, tensor(blk_.input_norm), ws.normed.data(), tokens, hidden, eps, stream_);
    T* q = ws.qkv.data();
    T* k = q + qw;
    T* v = k + kvw;
    project_qkv(params, ws.normed.data(), q, tokens);
    gpu::apply_rope<T>(q, qkv_width, tokens, heads_, head_dim_, in.positions, in.rope_cos, in.rope_sin,
                        tensor(blk_.q_norm), eps, stream_);
    gpu::apply_rope<T>(k, qkv_width, tokens, kv_heads_, head_dim_, in.positions, in.rope_cos, in.rope_sin,
                        tensor(blk_.k_norm), eps, stream_);
    gpu::AttentionDims dims;
    dims.batch = static_cast<std::int64_t>(in.batch), dims.seq = static_cast<std::int64_t>(in.seq);
    dims.heads = heads_, dims.kv_heads = kv_heads_, dims.head_dim = head_dim_;
    dims.ld_q = qkv_width, dims.ld_kv = qkv_width, dims.ld_out = qw;
    dims.window = windows_[block];
    gpu::grouped_attention_dispatch<T>(*gemm_, q, k, v, in.key_mask, ws.context.data(), dims, ws.attention, stream_,
                                        options_.flash_attention, options_.flash_kernel);
    gemm_->linear<T>(ws.context.data(), tensor(blk_.o_w), tensor(blk_.o_b), ws.residual.data(), tokens, hidden, qw,
                     stream_, false, x);

    // MLP: out = residual + down_proj(silu(gate_proj(n)) * up_proj(n)), n = RMSNorm(residual).
    gpu::rms_norm<T>(ws.residual.data(), tensor(blk_.post_norm), ws.normed.data(), tokens, hidden, eps, stream_);
    project_gate_up(params, ws.normed.data(), ws.mlp.data(), tokens);
    gpu::swiglu<T>(ws.mlp.data(), ws.mlp.data() + ffn, tokens, ffn, 2 * ffn, stream_);
    gpu::GemmArgs<T, T> down;  // reads the activated gate half of mlp (row stride 2 ffn)
    down.m = tokens, down.n = hidden, down.k = ffn;
    down.x = ws.mlp.data(), down.ldx = 2 * ffn;
    down.w = tensor(blk_.down_w), down.ldw = ffn;
    down.y = out.hidden.data(), down.ldy = hidden;
    down.bias = tensor(blk_.down_b);
    down.c = ws.residual.data(), down.beta = 1.0f;
    gemm_->run(down, stream_);
  }

  /// The batch's weight in an accumulated step: its targets (the loss is their mean).
  double batch_weight(const Batch& batch) const { return static_cast<double>(batch.num_loss_rows); }

  /// Causal-LM loss as transformers' ForCausalLMLoss (mean over labels != -100; NaN when there
  /// is none, as HF). Synchronizes the stream once to return the value.
  double epilogue(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                  const Batch& batch, Workspace& ws) const {
    if (!batch.has_labels) throw ShapeError("LlamaCudaModel::epilogue: the batch has no labels");
    const T* head = head_weight(params, prologue_params);
    if (batch.num_loss_rows == 0) return std::numeric_limits<double>::quiet_NaN();
    const T* features = output_features(params, in, ws);
    const std::int64_t hidden = config_.hidden_size;
    const auto rows = static_cast<std::int64_t>(batch.num_loss_rows);
    ws.gathered.reserve(static_cast<std::size_t>(rows * hidden));
    gpu::gather_rows<T>(features, batch.loss_rows.data(), ws.gathered.data(), rows, hidden, stream_);
    ws.loss.loss.reserve(1);
    gpu::cross_entropy_loss<T>(*gemm_, ws.gathered.data(), head, batch.loss_targets.data(), rows, hidden,
                                config_.vocab_size, options_.vocab_chunk, ws.loss, ws.loss.loss.data(), nullptr,
                                stream_);
    if (ws.loss_host.size() < 1) ws.loss_host = gpu::PinnedBuffer<double>(1);
    gpu::copy_to_host(ws.loss_host.data(), ws.loss.loss.data(), 1, stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return ws.loss_host[0];
  }

  // ---- whole-model conveniences (tests, evaluation) -----------------------------------------

  /// Every group's device parameters at one point.
  struct Params {
    ParamView<const T> prologue;
    std::vector<ParamView<const T>> blocks;
    ParamView<const T> epilogue;
  };

  /// Logits [batch * seq, vocab] (row b * seq + s), fp32, copied to the host.
  std::vector<float> logits(const Params& params, const Batch& batch, Workspace& ws) const {
    return output_logits(params.epilogue, params.prologue, forward_to_output(params, batch, ws), ws);
  }

  /// Logits [batch * seq, vocab] of the last block's output `in` (a forward run group by group),
  /// fp32, copied to the host. `prologue_params` supplies a tied LM head.
  std::vector<float> output_logits(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                                   Workspace& ws) const {
    const T* head = head_weight(params, prologue_params);
    const T* features = output_features(params, in, ws);
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    ws.logits.reserve(static_cast<std::size_t>(tokens * config_.vocab_size));
    gpu::GemmArgs<T, float> g;
    g.m = tokens, g.n = config_.vocab_size, g.k = config_.hidden_size;
    g.x = features, g.ldx = g.k;
    g.w = head, g.ldw = g.k;
    g.y = ws.logits.data(), g.ldy = g.n;
    gemm_->run(g, stream_);
    std::vector<float> result(static_cast<std::size_t>(tokens * config_.vocab_size));
    gpu::copy_to_host(result.data(), ws.logits.data(), result.size(), stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return result;
  }

  /// The causal-LM loss at the given parameters.
  double loss(const Params& params, const Batch& batch, Workspace& ws) const {
    return epilogue(params.epilogue, params.prologue, forward_to_output(params, batch, ws), batch, ws);
  }

  /// log p(label | prefix) of every loss row (b * seq + s predicting labels[b, s + 1]), in the
  /// order of the batch's loss rows (rows in order, positions in order within a row).
  std::vector<float> label_log_probs(const Params& params, const Batch& batch, Workspace& ws) const {
    if (batch.num_loss_rows == 0) return {};
    const T* head = head_weight(params.epilogue, params.prologue);
    const T* features = output_features(params.epilogue, forward_to_output(params, batch, ws), ws);
    const std::int64_t hidden = config_.hidden_size;
    const auto rows = static_cast<std::int64_t>(batch.num_loss_rows);
    ws.gathered.reserve(static_cast<std::size_t>(rows * hidden));
    gpu::gather_rows<T>(features, batch.loss_rows.data(), ws.gathered.data(), rows, hidden, stream_);
    ws.loss.loss.reserve(1);
    ws.log_probs.reserve(static_cast<std::size_t>(rows));
    gpu::cross_entropy_loss<T>(*gemm_, ws.gathered.data(), head, batch.loss_targets.data(), rows, hidden,
                                config_.vocab_size, options_.vocab_chunk, ws.loss, ws.loss.loss.data(),
                                ws.log_probs.data(), stream_);
    std::vector<float> result(static_cast<std::size_t>(rows));
    gpu::copy_to_host(result.data(), ws.log_probs.data(), result.size(), stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return result;
  }

 private:
  static constexpr const char* kBatchName = "LLaMA batch";

  static void check_layout(const ParamView<const T>& params, const ParamLayout& expected, const char* group) {
    models::check_group_layout(params, expected, "LlamaCudaModel", group, "LLaMA-family");
  }

  /// The LM head [vocab, hidden]: the epilogue's own, or the prologue's token embedding when tied.
  const T* head_weight(ParamView<const T> epilogue_params, ParamView<const T> prologue_params) const {
    check_layout(epilogue_params, epilogue_layout_, "epilogue");
    if (config_.tie_word_embeddings) {
      check_layout(prologue_params, prologue_layout_, "prologue");
      return prologue_params.tensor(embed_);
    }
    return epilogue_params.tensor(epi_.lm_head);
  }

  /// q, k, v into one [tokens, q + 2 kv] matrix (q's columns first): one GEMM over the fused
  /// weight where the layout has one, else one per projection into its columns.
  void project_qkv(const ParamView<const T>& params, const T* x, T* qkv, std::int64_t tokens) const {
    const std::int64_t hidden = config_.hidden_size, qw = config_.q_width(), kvw = config_.kv_width();
    const std::int64_t width = qw + 2 * kvw;
    const bool bias = config_.qkv_bias();
    auto project = [&](std::size_t w, std::size_t b, std::int64_t n, std::int64_t column) {
      gpu::GemmArgs<T, T> g;
      g.m = tokens, g.n = n, g.k = hidden;
      g.x = x, g.ldx = hidden;
      g.w = params.tensor(w), g.ldw = hidden;
      g.y = qkv + column, g.ldy = width;
      if (bias) g.bias = params.tensor(b);
      gemm_->run(g, stream_);
    };
    if (fused_qkv()) {
      project(blk_.q_w, blk_.q_b, width, 0);
      return;
    }
    project(blk_.q_w, blk_.q_b, qw, 0);
    project(blk_.k_w, blk_.k_b, kvw, qw);
    project(blk_.v_w, blk_.v_b, kvw, qw + kvw);
  }

  /// gate and up into one [tokens, 2 ffn] matrix (gate's columns first), as project_qkv.
  void project_gate_up(const ParamView<const T>& params, const T* x, T* out, std::int64_t tokens) const {
    const std::int64_t hidden = config_.hidden_size, ffn = config_.intermediate_size;
    const bool bias = config_.has_mlp_bias();
    auto project = [&](std::size_t w, std::size_t b, std::int64_t n, std::int64_t column) {
      gpu::GemmArgs<T, T> g;
      g.m = tokens, g.n = n, g.k = hidden;
      g.x = x, g.ldx = hidden;
      g.w = params.tensor(w), g.ldw = hidden;
      g.y = out + column, g.ldy = 2 * ffn;
      if (bias) g.bias = params.tensor(b);
      gemm_->run(g, stream_);
    };
    if (fused_gate_up()) {
      project(blk_.gate_w, blk_.gate_b, 2 * ffn, 0);
      return;
    }
    project(blk_.gate_w, blk_.gate_b, ffn, 0);
    project(blk_.up_w, blk_.up_b, ffn, ffn);
  }

  /// Prologue and every block into ws.whole; returns the one holding the last block's output.
  const Activation& forward_to_output(const Params& params, const Batch& batch, Workspace& ws) const {
    if (params.blocks.size() != num_blocks())
      throw ShapeError("LlamaCudaModel: " + std::to_string(params.blocks.size()) +
                       " blocks of parameters given, the model has " + std::to_string(num_blocks()));
    std::size_t cur = 0;
    prologue(params.prologue, batch, ws.whole[cur], ws);
    for (std::size_t i = 0; i < num_blocks(); ++i) {
      forward_block(i, params.blocks[i], ws.whole[cur], ws.whole[1 - cur], ws);
      cur = 1 - cur;
    }
    return ws.whole[cur];
  }

  /// The final RMSNorm of the residual stream: what the LM head reads [tokens, hidden].
  const T* output_features(ParamView<const T> params, const Activation& in, Workspace& ws) const {
    check_layout(params, epilogue_layout_, "epilogue");
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    const std::int64_t hidden = config_.hidden_size;
    ws.normed.reserve(static_cast<std::size_t>(tokens * hidden));
    gpu::rms_norm<T>(in.hidden.data(), params.tensor(epi_.norm), ws.normed.data(), tokens, hidden,
                      static_cast<float>(config_.rms_norm_eps), stream_);
    return ws.normed.data();
  }

  LlamaConfig config_;
  Options options_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<gpu::Gemm> gemm_;  // plans are cached state behind const forward functions
  ParamLayout prologue_layout_, block_layout_, epilogue_layout_;
  std::size_t embed_ = 0;
  BlockTensors blk_{};
  EpilogueTensors epi_{};
  std::int64_t heads_ = 0, kv_heads_ = 0, head_dim_ = 0;
  std::vector<std::int64_t> windows_;  // per layer, 0 = full causal attention
  bool fused_qkv_ = false, fused_gate_up_ = false;
  gpu::DeviceBuffer<float> inv_freq_;  // [head_dim / 2], the rotary frequencies
};

static_assert(LayerStack<LlamaCudaModel<float>>);
static_assert(LayerStack<LlamaCudaModel<bfloat16>>);
static_assert(LayerStack<LlamaCudaModel<float16>>);

}  // namespace zo2::llama
