// zo2/backend/cuda/attention.cuh -- causal multi-head self-attention with a padding mask, as
// transformers' eager attention computes it, on activations laid out [tokens, heads * head_dim].
//
// First version (materialized scores): per sequence, strided-batched GEMMs over the heads give
// the scores Q K^T * scale [heads, seq, seq] in T (fp32 accumulation; HF's eager attention also
// materializes them in the model's dtype); a fused masked softmax (fp32 arithmetic) turns each
// row into probabilities in place; strided-batched GEMMs give P V. The queries go in 4 chunks,
// each chunk's products stopping at the chunk's last key, so the GEMMs and the softmax touch
// 62.5% of the full square instead of all of it. At seq 2048 the scores take heads * 8 MiB in
// 16-bit. The fused kernel of flash_attention.cuh skips the scores' round trip and is the
// default for bf16/fp16 at head_dim 64 and 128; this path serves fp32 and other head dims, and
// is the reference the flash kernel is tested against.
//
// Semantics (HF eager): query i of sequence b attends to keys j <= i with mask[b, j] = 1. A
// query with no visible key (a left-padding position that sees only padding) gets a flat
// distribution over all seq keys: there HF adds the dtype's minimum to every score, so the
// softmax is uniform. This is not only about avoiding NaN: the last padding position predicts
// the first real token, and HF's loss counts it when its label is not -100.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>

namespace zo2::cuda {

namespace detail {

/// One warp per row r = h * seq + i of one sequence's scores [heads, seq, seq]. probs may be
/// scores (in place): a lane writes only the elements it read, after its last read. Row i is
/// written up to the end of its query chunk (the keys that chunk's P V reads); a row with no
/// visible key is written as zeros, and attention_fix_masked_rows gives it HF's flat average.
template <class T>
__global__ void __launch_bounds__(256) masked_softmax_kernel(const T* scores, const std::uint8_t* __restrict__ key_mask,
                                                             T* probs, std::int64_t rows, int seq, int chunk_rows) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = static_cast<int>(row % seq);
  const T* s = scores + row * seq;
  T* p = probs + row * seq;
  constexpr float kLog2e = 1.4426950408889634f;
  const float neg_inf = -INFINITY;

  // Online max and sum of exp over the visible keys j <= i (in log2 units).
  float m = neg_inf, l = 0.0f;
  for (int j = lane; j <= i; j += 32) {
    if (key_mask != nullptr && key_mask[j] == 0) continue;
    const float v = ld_f32(s[j]) * kLog2e;
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
  const int limit = min(seq, (i / chunk_rows + 1) * chunk_rows);
  const bool none_visible = m == neg_inf;
  const float inv = none_visible ? 0.0f : 1.0f / l;
  for (int j = lane; j < limit; j += 32) {
    float v = 0.0f;
    if (!none_visible && j <= i && (key_mask == nullptr || key_mask[j] != 0)) v = exp2f(ld_f32(s[j]) * kLog2e - m) * inv;
    p[j] = st_from_f32<T>(v);
  }
}

/// Rows with no visible key (i before the sequence's first unmasked token) attend uniformly to
/// all seq keys in HF: context[i, c] = mean_j v[j, c]. One thread per column c.
template <class T>
__global__ void fix_masked_rows_kernel(const T* __restrict__ v, const std::uint8_t* __restrict__ key_mask,
                                       T* __restrict__ context, int seq, int hidden) {
  __shared__ int first;
  if (threadIdx.x == 0) first = seq;
  __syncthreads();
  for (int j = threadIdx.x; j < seq; j += blockDim.x)
    if (key_mask[j] != 0) atomicMin(&first, j);
  __syncthreads();
  const int rows = first;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (rows == 0 || c >= hidden) return;
  float sum = 0.0f;
  for (int j = 0; j < seq; ++j) sum += ld_f32(v[static_cast<std::int64_t>(j) * hidden + c]);
  const T mean = st_from_f32<T>(sum / static_cast<float>(seq));
  for (int i = 0; i < rows; ++i) context[static_cast<std::int64_t>(i) * hidden + c] = mean;
}

}  // namespace detail

/// Scratch of the materialized attention: one sequence's scores, turned into probabilities in place.
template <class T>
struct AttentionScratch {
  DeviceBuffer<T> scores;
  void reserve(std::int64_t heads, std::int64_t seq) { scores.reserve(static_cast<std::size_t>(heads * seq * seq)); }
};

/// softmax rows of scores [heads, seq, seq] (already scaled) into probs (may be scores), under
/// the causal mask and key_mask[seq] (1 = visible; null = all visible), HF eager semantics.
/// Row i is written up to the end of its chunk of chunk_rows queries; rows with no visible key
/// are zeros (see attention_fix_masked_rows).
template <class T>
void masked_softmax(const T* scores, const std::uint8_t* key_mask, T* probs, std::int64_t heads, std::int64_t seq,
                    std::int64_t chunk_rows, cudaStream_t stream) {
  const std::int64_t rows = heads * seq;
  constexpr int kWarps = 8;
  const std::int64_t blocks = (rows + kWarps - 1) / kWarps;
  detail::masked_softmax_kernel<T><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
      scores, key_mask, probs, rows, static_cast<int>(seq), static_cast<int>(chunk_rows));
  ZO2_CUDA_CHECK_LAUNCH("zo2::cuda::masked_softmax_kernel");
}

/// For one sequence: context rows before the first unmasked key get the mean of v over all keys
/// (HF's flat attention for rows with nothing visible). Nothing happens without left padding.
template <class T>
void attention_fix_masked_rows(const T* v, const std::uint8_t* key_mask, T* context, std::int64_t seq,
                               std::int64_t hidden, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((hidden + 127) / 128);
  detail::fix_masked_rows_kernel<T><<<blocks, 128, 0, stream>>>(v, key_mask, context, static_cast<int>(seq),
                                                                static_cast<int>(hidden));
  ZO2_CUDA_CHECK_LAUNCH("zo2::cuda::fix_masked_rows_kernel");
}

/// Query rows per chunk of the causal attention: chunk c's queries see only keys before the
/// chunk's end, so its two GEMMs skip the rest (4 chunks: 62.5% of the full products' work).
inline std::int64_t attention_chunk_rows(std::int64_t seq) {
  const std::int64_t quarter = (seq + 3) / 4;
  return std::max<std::int64_t>(64, (quarter + 63) / 64 * 64);
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
  const std::int64_t chunk = attention_chunk_rows(seq);
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t row0 = b * seq * hidden;
    for (std::int64_t r0 = 0; r0 < seq; r0 += chunk) {
      const std::int64_t rows = std::min(chunk, seq - r0), keys = r0 + rows;
      GemmArgs<T, T> qk;  // scores[h][r0 : r0 + rows, 0 : keys] = scale * Q_h K_h^T
      qk.m = rows, qk.n = keys, qk.k = head_dim;
      qk.x = q + row0 + r0 * hidden, qk.ldx = hidden, qk.stride_x = head_dim;
      qk.w = k + row0, qk.ldw = hidden, qk.stride_w = head_dim, qk.w_transposed = true;
      qk.y = scratch.scores.data() + r0 * seq, qk.ldy = seq, qk.stride_y = seq * seq;
      qk.alpha = scale;
      qk.batch = static_cast<int>(heads);
      gemm.run(qk, stream);
    }

    const std::uint8_t* mask = key_mask ? key_mask + b * seq : nullptr;
    masked_softmax<T>(scratch.scores.data(), mask, scratch.scores.data(), heads, seq, chunk, stream);

    for (std::int64_t r0 = 0; r0 < seq; r0 += chunk) {
      const std::int64_t rows = std::min(chunk, seq - r0), keys = r0 + rows;
      GemmArgs<T, T> pv;  // context_h[r0 : r0 + rows] = P_h[r0 : r0 + rows, 0 : keys] V_h[0 : keys]
      pv.m = rows, pv.n = head_dim, pv.k = keys;
      pv.x = scratch.scores.data() + r0 * seq, pv.ldx = seq, pv.stride_x = seq * seq;
      pv.w = v + row0, pv.ldw = hidden, pv.stride_w = head_dim, pv.w_transposed = false;
      pv.y = context + row0 + r0 * hidden, pv.ldy = hidden, pv.stride_y = head_dim;
      pv.batch = static_cast<int>(heads);
      gemm.run(pv, stream);
    }
    if (mask) attention_fix_masked_rows<T>(v + row0, mask, context + row0, seq, hidden, stream);
  }
}

}  // namespace zo2::cuda
