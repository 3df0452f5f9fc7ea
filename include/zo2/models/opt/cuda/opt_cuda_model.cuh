// zo2/models/opt/cuda/opt_cuda_model.cuh -- OPT (Hugging Face OPTForCausalLM) as a
// zo2::LayerStack on the GPU: the same parameter layouts as the CPU OPTModel (layout.hpp), so
// one ParameterStore feeds both, with device pointers in the views.
//
//   prologue   positions from the mask, token embedding (-> project_in) + learned positions
//   block i    pre-LN or post-LN decoder layer: LayerNorm, Q/K/V (one batched GEMM of 3),
//              causal masked attention, out_proj with the residual fused (beta = 1), FFN with
//              bias+ReLU fused, fc2 with the residual fused
//   epilogue   final LayerNorm -> project_out -> tied LM head in vocabulary chunks -> causal-LM
//              cross entropy (mean over labels != -100), returned as a double (one sync)
//
// Precision: T is float, zo2::bfloat16 or zo2::float16 (activations and weights); GEMMs and
// reductions accumulate in fp32 (the loss in double). fp32 GEMMs do not use TF32 unless
// Options::allow_tf32.
//
// Streams and memory: everything is enqueued on one stream (the policy's, given to the
// constructor or set_stream), so the policy's perturbation kernels and the forward are ordered
// without events. Activation, Workspace and Batch buffers grow on first use and are reused
// (DeviceBuffer::reserve: grow-only, with headroom), so a steady-state step makes no cudaMalloc
// and no cudaFree (which would wait for the whole device): upload_batch refills a Batch in place,
// and the whole-model conveniences (logits, loss, label_log_probs) keep their activations and
// outputs in the Workspace.
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
#include <zo2/backend/cuda/flash_attention.cuh>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/cross_entropy.cuh>
#include <zo2/backend/cuda/embedding.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/layernorm.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/models/model_checks.hpp>
#include <zo2/models/opt/config.hpp>
#include <zo2/models/opt/layout.hpp>
#include <zo2/optim/layer_stack.hpp>

namespace zo2::opt {

namespace cuda_detail {

enum class Act { relu, gelu, gelu_tanh };

template <class T>
__global__ void activation_kernel(T* __restrict__ x, std::int64_t n, Act act) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = zo2::gpu::ld_f32(x[i]);
    float r;
    if (act == Act::relu) r = v > 0.0f ? v : 0.0f;
    else if (act == Act::gelu) r = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    else r = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    x[i] = zo2::gpu::st_from_f32<T>(r);
  }
}

}  // namespace cuda_detail

/// Options of OPTCudaModel (outside the class: a nested struct with default member
/// initializers cannot be a default argument of its enclosing class's constructor).
struct OPTCudaOptions {
  /// Vocabulary columns per LM-head chunk in the loss: at most rows x chunk fp32 logits exist.
  std::int64_t vocab_chunk = 8192;
  /// fp32 GEMMs on TF32 tensor cores (off: exact fp32, for parity tests).
  bool allow_tf32 = false;
  /// Q, K and V as one strided-batched GEMM of 3 when the layout allows it.
  bool fused_qkv = true;
  /// Causal attention by the fused flash kernel (flash_attention.cuh: bf16/fp16, head_dim 64 or
  /// 128; other cases take the materialized path regardless). Passed
  /// tests/cuda/test_flash_attention.cu and the HF parity tests on an H100 (2026-11-23); 1.9-3.3x
  /// faster than the materialized path at seq 2048 (bench/results/h100-attention-*-flash.jsonl).
  bool flash_attention = true;
  /// Which fused kernel: kAuto takes the wgmma kernel (flash_attention_wgmma.cuh) on a Hopper GPU
  /// when the build targets sm_90a, the mma.sync kernel otherwise.
  gpu::FlashKernel flash_kernel = gpu::FlashKernel::kAuto;
  /// cuBLASLt algorithms each GEMM shape times at its first run, keeping the fastest
  /// (gpu::Gemm::set_autotune); 0: the heuristic's first choice, reproducible across processes.
  int gemm_autotune = 0;
};

template <class T>
class OPTCudaModel {
 public:
  using value_type = T;
  static_assert(gpu::is_kernel_type_v<T>, "OPTCudaModel<T>: T is float, zo2::bfloat16 or zo2::float16");

  using Options = OPTCudaOptions;

  /// A batch on the device: uploaded by make_batch (or refilled by upload_batch), read by every
  /// pass. Its buffers are capacities: the first batch_ * seq_ (or num_loss_rows) entries count.
  struct Batch {
    std::size_t batch = 0, seq = 0;
    gpu::DeviceBuffer<std::int32_t> input_ids, positions;
    gpu::DeviceBuffer<std::uint8_t> key_mask;
    /// Every key visible (no 0 in attention_mask): attention then runs without a mask, which
    /// gives the same result and skips the per-tile masking and the masked-row fix-up.
    bool all_visible = true;
    /// Rows (b * seq + s) whose shifted label labels[b, s + 1] is a target, and those targets.
    gpu::DeviceBuffer<std::int32_t> loss_rows, loss_targets;
    std::size_t num_loss_rows = 0;
    bool has_labels = false;
  };

  /// The residual stream, plus what the blocks need of the batch (forward_block sees no Batch).
  struct Activation {
    std::size_t batch = 0, seq = 0;
    const std::uint8_t* key_mask = nullptr;  // the batch's device mask (not owned)
    gpu::DeviceBuffer<T> hidden;            // [batch * seq, hidden_size]
  };

  struct Workspace {
    gpu::DeviceBuffer<T> normed, qkv, context, residual, ffn, projected, gathered;
    gpu::AttentionScratch<T> attention;
    gpu::CrossEntropyScratch loss;
    gpu::DeviceBuffer<float> logits, log_probs;
    gpu::PinnedBuffer<double> loss_host;
    /// The residual stream of the whole-model conveniences (logits, loss, label_log_probs).
    Activation whole[2];
  };

  explicit OPTCudaModel(OPTConfig config, cudaStream_t stream = nullptr, Options options = {})
      : config_(std::move(config)), options_(options), stream_(stream), gemm_(std::make_unique<gpu::Gemm>()) {
    config_.validate();
    gemm_->set_allow_tf32(options_.allow_tf32);
    gemm_->set_autotune(options_.gemm_autotune);
    prologue_layout_ = opt::prologue_layout(config_);
    block_layout_ = opt::block_layout(config_);
    epilogue_layout_ = opt::epilogue_layout(config_);
    const std::string& a = config_.activation_function;
    act_ = a == "gelu" ? cuda_detail::Act::gelu : a == "gelu_new" ? cuda_detail::Act::gelu_tanh : cuda_detail::Act::relu;
    const TensorIndex tensors = tensor_index(prologue_layout_, block_layout_, epilogue_layout_);
    pro_ = tensors.prologue;
    blk_ = tensors.block;
    epi_ = tensors.epilogue;
    const ParamLayout& b = block_layout_;
    // Q, K, V weights (and biases) at one fixed distance: one GEMM of batch 3.
    const std::int64_t dw = static_cast<std::int64_t>(b.offset(blk_.k_w)) - static_cast<std::int64_t>(b.offset(blk_.q_w));
    qkv_weight_stride_ = dw;
    qkv_uniform_ = dw == static_cast<std::int64_t>(b.offset(blk_.v_w)) - static_cast<std::int64_t>(b.offset(blk_.k_w));
    if (config_.enable_bias) {
      qkv_bias_stride_ = static_cast<std::int64_t>(b.offset(blk_.k_b)) - static_cast<std::int64_t>(b.offset(blk_.q_b));
      qkv_uniform_ = qkv_uniform_ &&
                     qkv_bias_stride_ == static_cast<std::int64_t>(b.offset(blk_.v_b)) -
                                             static_cast<std::int64_t>(b.offset(blk_.k_b));
    }
  }

  const OPTConfig& config() const { return config_; }
  const Options& options() const { return options_; }
  std::size_t num_blocks() const { return static_cast<std::size_t>(config_.num_hidden_layers); }
  const ParamLayout& prologue_layout() const { return prologue_layout_; }
  const ParamLayout& block_layout() const { return block_layout_; }
  const ParamLayout& epilogue_layout() const { return epilogue_layout_; }
  cudaStream_t stream() const { return stream_; }
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  gpu::Gemm& gemm() const { return *gemm_; }

  /// Uploads a host batch (any type with batch, seq, input_ids, attention_mask, labels, as
  /// OPTModel<float>::Batch): validates it as the CPU model does, computes positions on the
  /// device. Blocks until uploaded (the host vectors may go away afterwards).
  template <class HostBatch>
  Batch make_batch(const HostBatch& host) const {
    Batch b;
    upload_batch(host, b);
    return b;
  }

  /// make_batch into an existing Batch, reusing its device buffers (they grow when the batch is
  /// larger than any before; no allocation otherwise). Enqueued on the model's stream after
  /// whatever reads `b` there, and waits for that stream (not the device) before returning. On a
  /// validation error `b` is left as it was.
  template <class HostBatch>
  void upload_batch(const HostBatch& host, Batch& b) const {
    bool all_visible = true;
    const std::size_t tokens = host.batch * host.seq;
    models::check_batch_sizes(host, kBatchName);
    std::vector<std::int32_t> ids(tokens);
    std::vector<std::uint8_t> mask(tokens, 1);
    for (std::size_t t = 0; t < tokens; ++t) {
      models::check_token(host, t, config_.vocab_size, kBatchName);
      ids[t] = static_cast<std::int32_t>(host.input_ids[t]);
      if (!host.attention_mask.empty()) {
        const auto m = static_cast<std::int64_t>(host.attention_mask[t]);
        mask[t] = static_cast<std::uint8_t>(m);
        if (m == 0) all_visible = false;
      }
    }
    for (std::size_t s = 0; s < host.batch; ++s) {
      const auto real = static_cast<std::size_t>(std::count(mask.begin() + s * host.seq, mask.begin() + (s + 1) * host.seq, 1));
      if (real > static_cast<std::size_t>(config_.max_position_embeddings))
        throw ShapeError("OPT batch: sequence " + std::to_string(s) + " has " + std::to_string(real) +
                         " tokens, more than max_position_embeddings = " + std::to_string(config_.max_position_embeddings));
    }
    std::vector<std::int32_t> rows, targets;
    if (!host.labels.empty()) {
      for (std::size_t s = 0; s < host.batch; ++s)
        for (std::size_t p = 0; p + 1 < host.seq; ++p) {
          const auto label = static_cast<std::int64_t>(host.labels[s * host.seq + p + 1]);
          if (label == -100) continue;
          models::check_label(host, s * host.seq + p + 1, config_.vocab_size, kBatchName);
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
    gpu::copy_to_device(b.key_mask.data(), mask.data(), tokens, stream_);
    b.num_loss_rows = rows.size();
    if (!rows.empty()) {
      b.loss_rows.reserve(rows.size());
      b.loss_targets.reserve(rows.size());
      gpu::copy_to_device(b.loss_rows.data(), rows.data(), rows.size(), stream_);
      gpu::copy_to_device(b.loss_targets.data(), targets.data(), targets.size(), stream_);
    }
    gpu::positions_from_mask(b.key_mask.data(), b.positions.data(), static_cast<std::int64_t>(b.batch),
                              static_cast<std::int64_t>(b.seq), static_cast<int>(OPTConfig::position_offset), stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // ---- the LayerStack interface -------------------------------------------------------------

  void prologue(ParamView<const T> params, const Batch& batch, Activation& out, Workspace& ws) const {
    check_layout(params, prologue_layout_, "prologue");
    const auto tokens = static_cast<std::int64_t>(batch.batch * batch.seq);
    if (tokens == 0) throw ShapeError("OPTCudaModel::prologue: empty batch (use make_batch)");
    const std::int64_t hidden = config_.hidden_size, proj = config_.word_embed_proj_dim;
    out.batch = batch.batch;
    out.seq = batch.seq;
    out.key_mask = batch.all_visible ? nullptr : batch.key_mask.data();
    out.hidden.reserve(static_cast<std::size_t>(tokens * hidden));
    const T* positions = params.tensor(pro_.embed_positions);
    if (config_.has_projection()) {
      ws.projected.reserve(static_cast<std::size_t>(tokens * proj));
      gpu::embed<T>(batch.input_ids.data(), params.tensor(pro_.embed_tokens), nullptr, nullptr, ws.projected.data(),
                     tokens, proj, stream_);
      gemm_->linear<T>(ws.projected.data(), params.tensor(pro_.project_in), nullptr, out.hidden.data(), tokens, hidden,
                       proj, stream_);
      gpu::embed<T>(nullptr, nullptr, batch.positions.data(), positions, out.hidden.data(), tokens, hidden, stream_);
    } else {
      gpu::embed<T>(batch.input_ids.data(), params.tensor(pro_.embed_tokens), batch.positions.data(), positions,
                     out.hidden.data(), tokens, hidden, stream_);
    }
  }

  void forward_block(std::size_t /*block*/, ParamView<const T> params, const Activation& in, Activation& out,
                     Workspace& ws) const {
    ZO2_CHECK(&in != &out, "OPTCudaModel::forward_block: input and output activations must differ");
    check_layout(params, block_layout_, "block");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    const std::int64_t hidden = config_.hidden_size, ffn = config_.ffn_dim;
    const auto n_hidden = static_cast<std::size_t>(tokens * hidden);
    out.batch = in.batch;
    out.seq = in.seq;
    out.key_mask = in.key_mask;
    out.hidden.reserve(n_hidden);
    ws.normed.reserve(n_hidden);
    ws.qkv.reserve(3 * n_hidden);
    ws.context.reserve(n_hidden);
    ws.residual.reserve(n_hidden);
    ws.ffn.reserve(static_cast<std::size_t>(tokens * ffn));
    const bool pre_ln = config_.do_layer_norm_before;
    const float eps = static_cast<float>(OPTConfig::layer_norm_eps);
    const T* x = in.hidden.data();

    // Attention: residual = x + attn(LN(x)) (pre-LN) or LN(x + attn(x)) (post-LN).
    const T* attn_in = x;
    if (pre_ln) {
      gpu::layer_norm<T>(x, tensor(blk_.ln1_w), tensor(blk_.ln1_b), ws.normed.data(), tokens, hidden, eps, stream_);
      attn_in = ws.normed.data();
    }
    T* q = ws.qkv.data();
    T* k = q + n_hidden;
    T* v = k + n_hidden;
    project_qkv(params, attn_in, q, k, v, tokens);
    gpu::causal_attention_dispatch<T>(*gemm_, q, k, v, in.key_mask, ws.context.data(),
                                       static_cast<std::int64_t>(in.batch), static_cast<std::int64_t>(in.seq),
                                       config_.num_attention_heads, config_.head_dim(), ws.attention, stream_,
                                       options_.flash_attention, options_.flash_kernel);
    gemm_->linear<T>(ws.context.data(), tensor(blk_.o_w), tensor(blk_.o_b), ws.residual.data(), tokens, hidden, hidden,
                     stream_, false, x);
    if (!pre_ln)
      gpu::layer_norm<T>(ws.residual.data(), tensor(blk_.ln1_w), tensor(blk_.ln1_b), ws.residual.data(), tokens,
                          hidden, eps, stream_);

    // Feed-forward, same arrangement.
    const T* ffn_in = ws.residual.data();
    if (pre_ln) {
      gpu::layer_norm<T>(ws.residual.data(), tensor(blk_.ln2_w), tensor(blk_.ln2_b), ws.normed.data(), tokens, hidden,
                          eps, stream_);
      ffn_in = ws.normed.data();
    }
    const bool fused_relu = act_ == cuda_detail::Act::relu;
    gemm_->linear<T>(ffn_in, tensor(blk_.fc1_w), tensor(blk_.fc1_b), ws.ffn.data(), tokens, ffn, hidden, stream_,
                     fused_relu);
    if (!fused_relu) activate(ws.ffn.data(), tokens * ffn);
    gemm_->linear<T>(ws.ffn.data(), tensor(blk_.fc2_w), tensor(blk_.fc2_b), out.hidden.data(), tokens, hidden, ffn,
                     stream_, false, ws.residual.data());
    if (!pre_ln)
      gpu::layer_norm<T>(out.hidden.data(), tensor(blk_.ln2_w), tensor(blk_.ln2_b), out.hidden.data(), tokens, hidden,
                          eps, stream_);
  }

  /// The batch's weight in an accumulated step: its targets (the loss is their mean).
  double batch_weight(const Batch& batch) const { return static_cast<double>(batch.num_loss_rows); }

  /// Causal-LM loss as transformers' ForCausalLMLoss (mean over labels != -100; NaN when there
  /// is none, as HF). Synchronizes the stream once to return the value.
  double epilogue(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                  const Batch& batch, Workspace& ws) const {
    if (!batch.has_labels) throw ShapeError("OPTCudaModel::epilogue: the batch has no labels");
    check_layout(prologue_params, prologue_layout_, "prologue");
    if (batch.num_loss_rows == 0) return std::numeric_limits<double>::quiet_NaN();
    const T* features = output_features(params, in, ws);
    const std::int64_t proj = config_.word_embed_proj_dim;
    const auto rows = static_cast<std::int64_t>(batch.num_loss_rows);
    ws.gathered.reserve(static_cast<std::size_t>(rows * proj));
    gpu::gather_rows<T>(features, batch.loss_rows.data(), ws.gathered.data(), rows, proj, stream_);
    ws.loss.loss.reserve(1);
    gpu::cross_entropy_loss<T>(*gemm_, ws.gathered.data(), prologue_params.tensor(pro_.embed_tokens),
                                batch.loss_targets.data(), rows, proj, config_.vocab_size, options_.vocab_chunk, ws.loss,
                                ws.loss.loss.data(), nullptr, stream_);
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

  /// Logits [batch * seq, vocab] of the last block's output `in` (a forward run group by group,
  /// e.g. with the blocks streamed through a policy's current()), fp32, copied to the host.
  /// `prologue_params` supplies the tied LM head (the token embedding).
  std::vector<float> output_logits(ParamView<const T> params, ParamView<const T> prologue_params, const Activation& in,
                                   Workspace& ws) const {
    check_layout(prologue_params, prologue_layout_, "prologue");
    const T* features = output_features(params, in, ws);
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    ws.logits.reserve(static_cast<std::size_t>(tokens * config_.vocab_size));
    gpu::GemmArgs<T, float> g;
    g.m = tokens, g.n = config_.vocab_size, g.k = config_.word_embed_proj_dim;
    g.x = features, g.ldx = g.k;
    g.w = prologue_params.tensor(pro_.embed_tokens), g.ldw = g.k;
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
  /// order of the batch's loss rows: candidate scoring sums these over a candidate's tokens.
  std::vector<float> label_log_probs(const Params& params, const Batch& batch, Workspace& ws) const {
    if (batch.num_loss_rows == 0) return {};
    const T* features = output_features(params.epilogue, forward_to_output(params, batch, ws), ws);
    const std::int64_t proj = config_.word_embed_proj_dim;
    const auto rows = static_cast<std::int64_t>(batch.num_loss_rows);
    ws.gathered.reserve(static_cast<std::size_t>(rows * proj));
    gpu::gather_rows<T>(features, batch.loss_rows.data(), ws.gathered.data(), rows, proj, stream_);
    ws.loss.loss.reserve(1);
    ws.log_probs.reserve(static_cast<std::size_t>(rows));
    gpu::cross_entropy_loss<T>(*gemm_, ws.gathered.data(), params.prologue.tensor(pro_.embed_tokens),
                                batch.loss_targets.data(), rows, proj, config_.vocab_size, options_.vocab_chunk, ws.loss,
                                ws.loss.loss.data(), ws.log_probs.data(), stream_);
    std::vector<float> result(static_cast<std::size_t>(rows));
    gpu::copy_to_host(result.data(), ws.log_probs.data(), result.size(), stream_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return result;
  }

 private:
  static constexpr const char* kBatchName = "OPT batch";

  static void check_layout(const ParamView<const T>& params, const ParamLayout& expected, const char* group) {
    models::check_group_layout(params, expected, "OPTCudaModel", group, "OPT");
  }

  void project_qkv(const ParamView<const T>& params, const T* x, T* q, T* k, T* v, std::int64_t tokens) const {
    const std::int64_t hidden = config_.hidden_size;
    const bool bias = config_.enable_bias;
    if (options_.fused_qkv && qkv_uniform_) {
      gpu::GemmArgs<T, T> g;
      g.m = tokens, g.n = hidden, g.k = hidden;
      g.x = x, g.ldx = hidden, g.stride_x = 0;
      g.w = params.tensor(blk_.q_w), g.ldw = hidden, g.stride_w = qkv_weight_stride_;
      g.y = q, g.ldy = hidden, g.stride_y = tokens * hidden;
      if (bias) g.bias = params.tensor(blk_.q_b), g.stride_bias = qkv_bias_stride_;
      g.batch = 3;
      if (gemm_->try_run(g, stream_)) return;
    }
    auto b = [&](std::size_t i) -> const T* { return bias ? params.tensor(i) : nullptr; };
    gemm_->linear<T>(x, params.tensor(blk_.q_w), b(blk_.q_b), q, tokens, hidden, hidden, stream_);
    gemm_->linear<T>(x, params.tensor(blk_.k_w), b(blk_.k_b), k, tokens, hidden, hidden, stream_);
    gemm_->linear<T>(x, params.tensor(blk_.v_w), b(blk_.v_b), v, tokens, hidden, hidden, stream_);
  }

  void activate(T* x, std::int64_t n) const {
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 4096));
    cuda_detail::activation_kernel<T><<<blocks, 256, 0, stream_>>>(x, n, act_);
    ZO2_CUDA_CHECK_LAUNCH("zo2::opt::cuda_detail::activation_kernel");
  }

  /// Prologue and every block into ws.whole; returns the one holding the last block's output.
  const Activation& forward_to_output(const Params& params, const Batch& batch, Workspace& ws) const {
    if (params.blocks.size() != num_blocks())
      throw ShapeError("OPTCudaModel: " + std::to_string(params.blocks.size()) +
                       " blocks of parameters given, the model has " + std::to_string(num_blocks()));
    std::size_t cur = 0;
    prologue(params.prologue, batch, ws.whole[cur], ws);
    for (std::size_t i = 0; i < num_blocks(); ++i) {
      forward_block(i, params.blocks[i], ws.whole[cur], ws.whole[1 - cur], ws);
      cur = 1 - cur;
    }
    return ws.whole[cur];
  }

  /// Final LayerNorm (if any), then project_out (if any): [tokens, word_embed_proj_dim].
  const T* output_features(ParamView<const T> params, const Activation& in, Workspace& ws) const {
    check_layout(params, epilogue_layout_, "epilogue");
    auto tensor = [&](std::size_t i) -> const T* { return i == ParamLayout::npos ? nullptr : params.tensor(i); };
    const auto tokens = static_cast<std::int64_t>(in.batch * in.seq);
    const std::int64_t hidden = config_.hidden_size, proj = config_.word_embed_proj_dim;
    const T* features = in.hidden.data();
    if (config_.has_final_layer_norm()) {
      ws.normed.reserve(static_cast<std::size_t>(tokens * hidden));
      gpu::layer_norm<T>(features, tensor(epi_.final_ln_weight), tensor(epi_.final_ln_bias), ws.normed.data(), tokens,
                          hidden, static_cast<float>(OPTConfig::layer_norm_eps), stream_);
      features = ws.normed.data();
    }
    if (config_.has_projection()) {
      ws.projected.reserve(static_cast<std::size_t>(tokens * proj));
      gemm_->linear<T>(features, tensor(epi_.project_out), nullptr, ws.projected.data(), tokens, proj, hidden, stream_);
      features = ws.projected.data();
    }
    return features;
  }

  OPTConfig config_;
  Options options_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<gpu::Gemm> gemm_;  // plans are cached state behind const forward functions
  ParamLayout prologue_layout_, block_layout_, epilogue_layout_;
  cuda_detail::Act act_ = cuda_detail::Act::relu;
  PrologueTensors pro_{};
  BlockTensors blk_{};
  EpilogueTensors epi_{};
  std::int64_t qkv_weight_stride_ = 0, qkv_bias_stride_ = 0;
  bool qkv_uniform_ = false;
};

static_assert(LayerStack<OPTCudaModel<float>>);
static_assert(LayerStack<OPTCudaModel<bfloat16>>);
static_assert(LayerStack<OPTCudaModel<float16>>);

}  // namespace zo2::opt
