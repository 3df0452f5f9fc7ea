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
//
// Grouped-query attention (the LLaMA family): grouped_causal_attention takes AttentionDims, with
// kv_heads key/value heads (query head h reads kv head h / (heads / kv_heads), as HF's
// repeat_kv), separate row strides for Q, K/V and the output (Q, K and V may be column slices of
// one fused projection), and a sliding window (query i sees keys j with i - j < window; 0 = none,
// Mistral's and Qwen2's). A row whose window holds no visible key gets the flat average of V over
// all seq keys, as transformers' eager attention gives it (fix_unseen_rows_kernel). With
// kv_heads == heads, no window and dense rows it is exactly causal_attention (the same GEMMs and
// kernels: OPT's path).
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <zo2/backend/cuda/attention_dims.cuh>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>

namespace zo2::gpu {

namespace detail {

/// The first key a query chunk starting at row r0 can see under a sliding window (0 without one),
/// rounded down to a multiple of 8: the chunk's score and P V products start there.
__host__ __device__ inline int chunk_first_key(int r0, int window) {
  return window > 0 && r0 - window + 1 > 0 ? (r0 - window + 1) / 8 * 8 : 0;
}

/// One warp per row r = h * seq + i of one sequence's scores [heads, seq, seq]. probs may be
/// scores (in place): a lane writes only the elements it read, after its last read. Row i is
/// written from its chunk's first key (chunk_first_key) up to the end of its query chunk (the keys
/// that chunk's P V reads); a row with no visible key is written as zeros, and the fix-up
/// (attention_fix_masked_rows, fix_unseen_rows_kernel) gives it HF's flat average. window > 0:
/// only keys j > i - window are visible.
template <class T>
__global__ void __launch_bounds__(256) masked_softmax_kernel(const T* scores, const std::uint8_t* __restrict__ key_mask,
                                                             T* probs, std::int64_t rows, int seq, int chunk_rows,
                                                             int window) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int i = static_cast<int>(row % seq);
  const T* s = scores + row * seq;
  T* p = probs + row * seq;
  constexpr float kLog2e = 1.4426950408889634f;
  const float neg_inf = -INFINITY;
  const int first = window > 0 ? max(0, i - window + 1) : 0;  // the first key inside the window

  // Online max and sum of exp over the visible keys first <= j <= i (in log2 units).
  float m = neg_inf, l = 0.0f;
  for (int j = first + lane; j <= i; j += 32) {
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
  const int chunk0 = i / chunk_rows * chunk_rows;
  const int limit = min(seq, chunk0 + chunk_rows);
  const bool none_visible = m == neg_inf;
  const float inv = none_visible ? 0.0f : 1.0f / l;
  for (int j = chunk_first_key(chunk0, window) + lane; j < limit; j += 32) {
    float v = 0.0f;
    if (!none_visible && j >= first && j <= i && (key_mask == nullptr || key_mask[j] != 0))
      v = exp2f(ld_f32(s[j]) * kLog2e - m) * inv;
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

/// The running maximum of a chunked block scan (the prefix carried from chunk to chunk).
struct RunningMax {
  int value;
  __device__ int operator()(int chunk_max) {
    const int old = value;
    value = max(value, chunk_max);
    return old;
  }
};
struct MaxOp {
  __device__ int operator()(int a, int b) const { return max(a, b); }
};

/// Whether query i sees no key: the last visible key at or before i (-1: none) is missing or
/// outside the window.
__device__ __forceinline__ bool sees_no_key(int i, int last_visible, int window) {
  return last_visible < 0 || (window > 0 && i - last_visible >= window);
}

/// The general fix-up of rows with no visible key (grouped heads, a sliding window, masked keys
/// anywhere): such a row attends uniformly to all seq keys in HF, so for every query head h of kv
/// head c / head_dim, context[i, h D + c % D] = mean_j v[j, c]. Grid (kv column blocks, batch):
/// each block scans its sequence's mask (a running max of the last visible key; cheap next to the
/// sum over V), returns when every row sees a key, else sums its kv columns over the sequence and
/// writes the mean into the rows that see none.
template <class T, int kThreads>
__global__ void __launch_bounds__(kThreads) fix_unseen_rows_kernel(const T* __restrict__ v,
                                                                   const std::uint8_t* __restrict__ key_mask,
                                                                   T* __restrict__ context, int seq, int ld_kv,
                                                                   int ld_out, int kv_width, int head_dim, int group,
                                                                   int window) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ std::uint8_t unseen[kThreads];
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * seq;
  const std::uint8_t* mask = key_mask + row0;
  // One chunk of the scan: whether row start + threadIdx.x sees no key.
  auto scan_chunk = [&](int start, RunningMax& prefix) {
    const int i = start + static_cast<int>(threadIdx.x);
    const int mine = i < seq && mask[i] != 0 ? i : -1;
    int last = -1;
    Scan(temp).InclusiveScan(mine, last, MaxOp{}, prefix);
    __syncthreads();  // temp is reused by the next chunk
    return i < seq && sees_no_key(i, last, window);
  };
  bool any = false;
  {
    RunningMax prefix{-1};
    for (int start = 0; start < seq; start += kThreads) any = scan_chunk(start, prefix) || any;
  }
  if (!__syncthreads_or(any)) return;

  const int c = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  const bool column = c < kv_width;
  float sum = 0.0f;
  if (column)
    for (int j = 0; j < seq; ++j) sum += ld_f32(v[(row0 + j) * ld_kv + c]);
  const T mean = st_from_f32<T>(sum / static_cast<float>(seq));
  const int first_head = column ? c / head_dim * group : 0, d = column ? c % head_dim : 0;
  RunningMax prefix{-1};
  for (int start = 0; start < seq; start += kThreads) {
    unseen[threadIdx.x] = scan_chunk(start, prefix) ? 1 : 0;
    __syncthreads();
    if (column) {
      const int rows = min(kThreads, seq - start);
      for (int r = 0; r < rows; ++r) {
        if (!unseen[r]) continue;
        T* out = context + (row0 + start + r) * ld_out + static_cast<std::int64_t>(first_head) * head_dim + d;
        for (int g = 0; g < group; ++g) out[static_cast<std::int64_t>(g) * head_dim] = mean;
      }
    }
    __syncthreads();  // unseen is rewritten by the next chunk
  }
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
                    std::int64_t chunk_rows, cudaStream_t stream, std::int64_t window = 0) {
  const std::int64_t rows = heads * seq;
  constexpr int kWarps = 8;
  const std::int64_t blocks = (rows + kWarps - 1) / kWarps;
  detail::masked_softmax_kernel<T><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
      scores, key_mask, probs, rows, static_cast<int>(seq), static_cast<int>(chunk_rows), static_cast<int>(window));
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::masked_softmax_kernel");
}

/// For one sequence: context rows before the first unmasked key get the mean of v over all keys
/// (HF's flat attention for rows with nothing visible). Nothing happens without left padding.
template <class T>
void attention_fix_masked_rows(const T* v, const std::uint8_t* key_mask, T* context, std::int64_t seq,
                               std::int64_t hidden, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((hidden + 127) / 128);
  detail::fix_masked_rows_kernel<T><<<blocks, 128, 0, stream>>>(v, key_mask, context, static_cast<int>(seq),
                                                                static_cast<int>(hidden));
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::fix_masked_rows_kernel");
}

/// The fix-up of rows that see no key for any AttentionDims (resolved): OPT's case takes
/// attention_fix_masked_rows per sequence (rows before the first visible key), every other one
/// fix_unseen_rows_kernel (grouped heads, windows, masked keys anywhere). key_mask not null.
template <class T>
void attention_fix_unseen_rows(const T* v, const std::uint8_t* key_mask, T* context, const AttentionDims& d,
                               cudaStream_t stream) {
  if (d.plain()) {
    const std::int64_t hidden = d.heads * d.head_dim;
    for (std::int64_t b = 0; b < d.batch; ++b)
      attention_fix_masked_rows<T>(v + b * d.seq * hidden, key_mask + b * d.seq, context + b * d.seq * hidden, d.seq,
                                   hidden, stream);
    return;
  }
  if (d.batch > 65535) throw ShapeError("attention: batch too large for the fix-up launch");
  constexpr int kThreads = 256;
  const std::int64_t kv_width = d.kv_heads * d.head_dim;
  const dim3 grid(static_cast<unsigned>((kv_width + kThreads - 1) / kThreads), static_cast<unsigned>(d.batch));
  detail::fix_unseen_rows_kernel<T, kThreads><<<grid, kThreads, 0, stream>>>(
      v, key_mask, context, static_cast<int>(d.seq), static_cast<int>(d.ld_kv), static_cast<int>(d.ld_out),
      static_cast<int>(kv_width), static_cast<int>(d.head_dim), static_cast<int>(d.group()),
      static_cast<int>(d.window));
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::fix_unseen_rows_kernel");
}

/// Query rows per chunk of the causal attention: chunk c's queries see only keys before the
/// chunk's end, so its two GEMMs skip the rest (4 chunks: 62.5% of the full products' work).
inline std::int64_t attention_chunk_rows(std::int64_t seq) {
  const std::int64_t quarter = (seq + 3) / 4;
  return std::max<std::int64_t>(64, (quarter + 63) / 64 * 64);
}

/// context = grouped-query causal attention(q, k, v) under key_mask [batch * seq] (null: no
/// padding) and d's sliding window, laid out as AttentionDims says. The scale 1/sqrt(head_dim) is
/// applied here. Per sequence and query chunk: scores of every head by strided-batched GEMMs (one
/// GEMM over all heads when each has its own kv head or all share one, else one per kv head over
/// its group of query heads, sharing K with batch stride 0), the masked softmax in place, P V the
/// same way; the chunk's products start at the first key its window lets it see.
template <class T>
void grouped_causal_attention(Gemm& gemm, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                              T* context, const AttentionDims& dims, AttentionScratch<T>& scratch,
                              cudaStream_t stream) {
  const AttentionDims d = dims.resolved();
  d.validate("causal_attention");
  const std::int64_t seq = d.seq, heads = d.heads, head_dim = d.head_dim, group = d.group();
  scratch.reserve(heads, seq);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const std::int64_t chunk = attention_chunk_rows(seq);
  // Products over heads [h0, h0 + count) that read kv heads h0 / group on (count == heads: all).
  // K/V's batch stride: head_dim when every query head has its own kv head, 0 for one shared.
  const std::int64_t launches = group == 1 || d.kv_heads == 1 ? 1 : d.kv_heads;
  const std::int64_t per_launch = heads / launches;
  const std::int64_t kv_stride = group == 1 ? head_dim : 0;
  for (std::int64_t b = 0; b < d.batch; ++b) {
    const T* qb = q + b * seq * d.ld_q;
    const T* kb = k + b * seq * d.ld_kv;
    const T* vb = v + b * seq * d.ld_kv;
    T* cb = context + b * seq * d.ld_out;
    for (std::int64_t r0 = 0; r0 < seq; r0 += chunk) {
      const std::int64_t rows = std::min(chunk, seq - r0), keys = r0 + rows;
      const std::int64_t first = detail::chunk_first_key(static_cast<int>(r0), static_cast<int>(d.window));
      for (std::int64_t l = 0; l < launches; ++l) {
        const std::int64_t h0 = l * per_launch;
        GemmArgs<T, T> qk;  // scores[h][r0 : r0 + rows, first : keys] = scale * Q_h K_{h / group}^T
        qk.m = rows, qk.n = keys - first, qk.k = head_dim;
        qk.x = qb + r0 * d.ld_q + h0 * head_dim, qk.ldx = d.ld_q, qk.stride_x = head_dim;
        qk.w = kb + first * d.ld_kv + h0 / group * head_dim, qk.ldw = d.ld_kv, qk.stride_w = kv_stride;
        qk.w_transposed = true;
        qk.y = scratch.scores.data() + h0 * seq * seq + r0 * seq + first, qk.ldy = seq, qk.stride_y = seq * seq;
        qk.alpha = scale;
        qk.batch = static_cast<int>(per_launch);
        gemm.run(qk, stream);
      }
    }

    const std::uint8_t* mask = key_mask ? key_mask + b * seq : nullptr;
    masked_softmax<T>(scratch.scores.data(), mask, scratch.scores.data(), heads, seq, chunk, stream, d.window);

    for (std::int64_t r0 = 0; r0 < seq; r0 += chunk) {
      const std::int64_t rows = std::min(chunk, seq - r0), keys = r0 + rows;
      const std::int64_t first = detail::chunk_first_key(static_cast<int>(r0), static_cast<int>(d.window));
      for (std::int64_t l = 0; l < launches; ++l) {
        const std::int64_t h0 = l * per_launch;
        GemmArgs<T, T> pv;  // context_h[r0 : r0 + rows] = P_h[r0 : r0 + rows, first : keys] V_{h / group}[first : keys]
        pv.m = rows, pv.n = head_dim, pv.k = keys - first;
        pv.x = scratch.scores.data() + h0 * seq * seq + r0 * seq + first, pv.ldx = seq, pv.stride_x = seq * seq;
        pv.w = vb + first * d.ld_kv + h0 / group * head_dim, pv.ldw = d.ld_kv, pv.stride_w = kv_stride;
        pv.w_transposed = false;
        pv.y = cb + r0 * d.ld_out + h0 * head_dim, pv.ldy = d.ld_out, pv.stride_y = head_dim;
        pv.batch = static_cast<int>(per_launch);
        gemm.run(pv, stream);
      }
    }
    if (mask && d.plain()) attention_fix_masked_rows<T>(vb, mask, cb, seq, d.ld_q, stream);
  }
  if (key_mask && !d.plain()) attention_fix_unseen_rows<T>(v, key_mask, context, d, stream);
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
  grouped_causal_attention<T>(gemm, q, k, v, key_mask, context, AttentionDims::mha(batch, seq, heads, head_dim),
                              scratch, stream);
}

}  // namespace zo2::gpu
