// zo2/backend/cuda/attention.cuh -- causal multi-head self-attention with a padding mask, as
// transformers' eager attention computes it, on activations laid out [tokens, heads * head_dim].
//
// First version (materialized scores): per sequence, one strided-batched GEMM over the heads
// gives the fp32 scores Q K^T * scale [heads, seq, seq]; a fused masked softmax turns each row
// into probabilities in T (causal + padding mask); a second strided-batched GEMM gives P V.
// At seq 2048 the scores take heads * 16 MiB: acceptable, and the two GEMMs run on the tensor
// cores. (A fused flash-style kernel would skip the upper triangle and the scores' round trip.)
//
// Semantics (HF eager): query i of sequence b attends to keys j <= i with mask[b, j] = 1. A
// query with no visible key (a left-padding position that sees only padding) gets a flat
// distribution over all seq keys: there HF adds the dtype's minimum to every score, so the
// softmax is uniform. This is not only about avoiding NaN: the last padding position predicts
// the first real token, and HF's loss counts it when its label is not -100.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>

namespace zo2::cuda {

namespace detail {

/// One warp per row r = h * seq + i of one sequence's scores [heads, seq, seq].
template <class T>
__global__ void __launch_bounds__(256) masked_softmax_kernel(const float* __restrict__ scores,
                                                             const std::uint8_t* __restrict__ key_mask,
                                                             T* __restrict__ probs, std::int64_t rows, int seq) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = static_cast<int>(row % seq);
  const float* s = scores + row * seq;
  T* p = probs + row * seq;
  constexpr float kLog2e = 1.4426950408889634f;
  const float neg_inf = -INFINITY;

  // Online max and sum of exp over the visible keys j <= i (in log2 units).
  float m = neg_inf, l = 0.0f;
  for (int j = lane; j <= i; j += 32) {
    if (key_mask != nullptr && key_mask[j] == 0) continue;
    const float v = s[j] * kLog2e;
    if (v > m) {
      l = l * exp2f(m - v) + 1.0f;
      m = v;
    } else {
      l += exp2f(v - m);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    const float mm = fmaxf(m, m2);
    l = (m == neg_inf ? 0.0f : l * exp2f(m - mm)) + (m2 == neg_inf ? 0.0f : l2 * exp2f(m2 - mm));
    m = mm;
  }
  if (m == neg_inf) {  // nothing visible: HF's flat distribution over every key
    const T flat = st_from_f32<T>(1.0f / static_cast<float>(seq));
    for (int j = lane; j < seq; j += 32) p[j] = flat;
    return;
  }
  const float inv = 1.0f / l;
  for (int j = lane; j < seq; j += 32) {
    float v = 0.0f;
    if (j <= i && (key_mask == nullptr || key_mask[j] != 0)) v = exp2f(s[j] * kLog2e - m) * inv;
    p[j] = st_from_f32<T>(v);
  }
}

}  // namespace detail

/// Scratch of the materialized attention: fp32 scores and T probabilities for one sequence.
template <class T>
struct AttentionScratch {
  DeviceBuffer<float> scores;
  DeviceBuffer<T> probs;
  void reserve(std::int64_t heads, std::int64_t seq) {
    scores.reserve(static_cast<std::size_t>(heads * seq * seq));
    probs.reserve(static_cast<std::size_t>(heads * seq * seq));
  }
};

/// softmax rows of scores [heads, seq, seq] (already scaled) into probs, under the causal mask
/// and key_mask[seq] (1 = visible; null = all visible), HF eager semantics (see above).
template <class T>
void masked_softmax(const float* scores, const std::uint8_t* key_mask, T* probs, std::int64_t heads, std::int64_t seq,
                    cudaStream_t stream) {
  const std::int64_t rows = heads * seq;
  constexpr int kWarps = 8;
  const std::int64_t blocks = (rows + kWarps - 1) / kWarps;
  detail::masked_softmax_kernel<T><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
      scores, key_mask, probs, rows, static_cast<int>(seq));
  ZO2_CUDA_CHECK_LAUNCH("zo2::cuda::masked_softmax_kernel");
}

/// context = attention(q, k, v) for `batch` sequences of `seq` tokens; q, k, v, context are
/// [batch * seq, heads * head_dim] row-major (head h in columns [h * head_dim, (h+1) * head_dim));
/// key_mask [batch * seq] (null: no padding). The scale 1/sqrt(head_dim) is applied here.
template <class T>
void causal_attention(Gemm& gemm, const T* q, const T* k, const T* v, const std::uint8_t* key_mask, T* context,
                      std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim,
                      AttentionScratch<T>& scratch, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0 || heads <= 0 || head_dim <= 0)
    throw ShapeError("causal_attention: batch, seq, heads and head_dim must be > 0");
  scratch.reserve(heads, seq);
  const std::int64_t hidden = heads * head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t row0 = b * seq * hidden;
    GemmArgs<T, float> qk;  // scores[h] = scale * Q_h K_h^T
    qk.m = seq, qk.n = seq, qk.k = head_dim;
    qk.x = q + row0, qk.ldx = hidden, qk.stride_x = head_dim;
    qk.w = k + row0, qk.ldw = hidden, qk.stride_w = head_dim, qk.w_transposed = true;
    qk.y = scratch.scores.data(), qk.ldy = seq, qk.stride_y = seq * seq;
    qk.alpha = scale;
    qk.batch = static_cast<int>(heads);
    gemm.run(qk, stream);

    masked_softmax(scratch.scores.data(), key_mask ? key_mask + b * seq : nullptr, scratch.probs.data(), heads, seq,
                   stream);

    GemmArgs<T, T> pv;  // context_h = P_h V_h
    pv.m = seq, pv.n = head_dim, pv.k = seq;
    pv.x = scratch.probs.data(), pv.ldx = seq, pv.stride_x = seq * seq;
    pv.w = v + row0, pv.ldw = hidden, pv.stride_w = head_dim, pv.w_transposed = false;
    pv.y = context + row0, pv.ldy = hidden, pv.stride_y = head_dim;
    pv.batch = static_cast<int>(heads);
    gemm.run(pv, stream);
  }
}

}  // namespace zo2::cuda
