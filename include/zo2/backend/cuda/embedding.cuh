// zo2/backend/cuda/embedding.cuh -- OPT's input layer on the device: positions from the
// attention mask, token-embedding gather, learned positions, and a row gather.
//
// Positions as transformers derives them: position = cumsum(mask) * mask - 1, plus OPT's offset
// of 2 (a fairseq legacy), so left padding starts every sequence at table row 2 and padding
// tokens read row 1.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>

namespace zo2::gpu {

namespace detail {

struct RunningPrefix {
  int total;
  __device__ int operator()(int block_sum) {
    const int old = total;
    total += block_sum;
    return old;
  }
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) positions_kernel(const std::uint8_t* __restrict__ mask,
                                                             std::int32_t* __restrict__ positions, int seq,
                                                             int offset) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * seq;
  RunningPrefix prefix{0};
  for (int start = 0; start < seq; start += kThreads) {
    const int s = start + threadIdx.x;
    const int m = s < seq ? (mask ? static_cast<int>(mask[base + s]) : 1) : 0;
    int cumulative = 0;
    Scan(temp).InclusiveSum(m, cumulative, prefix);
    __syncthreads();  // temp is reused by the next chunk
    if (s < seq) positions[base + s] = cumulative * m - 1 + offset;
  }
}

/// out[t, :] = (tokens ? tokens[ids[t], :] : out[t, :]) + (table ? table[positions[t], :] : 0)
template <class T>
__global__ void embedding_kernel(const std::int32_t* __restrict__ ids, const T* __restrict__ tokens,
                                 const std::int32_t* __restrict__ positions, const T* __restrict__ table,
                                 T* __restrict__ out, int width) {
  const std::int64_t t = blockIdx.x;
  const T* tok = tokens ? tokens + static_cast<std::int64_t>(ids[t]) * width : nullptr;
  const T* pos = table ? table + static_cast<std::int64_t>(positions[t]) * width : nullptr;
  T* o = out + t * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = tok ? ld_f32(tok[i]) : ld_f32(o[i]);
    if (pos) v += ld_f32(pos[i]);
    o[i] = st_from_f32<T>(v);
  }
}

template <class T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ rows,
                                   T* __restrict__ dst, int width) {
  const T* s = src + static_cast<std::int64_t>(rows[blockIdx.x]) * width;
  T* d = dst + static_cast<std::int64_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) d[i] = s[i];
}

inline unsigned threads_for(std::int64_t width) { return width >= 1024 ? 256u : 128u; }

}  // namespace detail

/// positions[b * seq + s] for `batch` sequences; mask (1 = token, 0 = padding) null means all ones.
inline void positions_from_mask(const std::uint8_t* mask, std::int32_t* positions, std::int64_t batch,
                                std::int64_t seq, int offset, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0) throw ShapeError("positions_from_mask: batch and seq must be > 0");
  detail::positions_kernel<256><<<static_cast<unsigned>(batch), 256, 0, stream>>>(mask, positions,
                                                                                  static_cast<int>(seq), offset);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::positions_kernel");
}

/// out[t] = token_table[ids[t]] + position_table[positions[t]] for t < tokens (rows of `width`).
/// token_table null: out[t] += position_table[positions[t]] (after a projection);
/// position_table null: the gather alone.
template <class T>
void embed(const std::int32_t* ids, const T* token_table, const std::int32_t* positions, const T* position_table,
           T* out, std::int64_t tokens, std::int64_t width, cudaStream_t stream) {
  if (tokens <= 0 || width <= 0) throw ShapeError("embed: tokens and width must be > 0");
  detail::embedding_kernel<T><<<static_cast<unsigned>(tokens), detail::threads_for(width), 0, stream>>>(
      ids, token_table, positions, position_table, out, static_cast<int>(width));
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::embedding_kernel");
}

/// dst[i] = src[rows[i]] for i < count (rows of `width`).
template <class T>
void gather_rows(const T* src, const std::int32_t* rows, T* dst, std::int64_t count, std::int64_t width,
                 cudaStream_t stream) {
  if (count <= 0) return;
  detail::gather_rows_kernel<T><<<static_cast<unsigned>(count), detail::threads_for(width), 0, stream>>>(
      src, rows, dst, static_cast<int>(width));
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::gather_rows_kernel");
}

}  // namespace zo2::gpu
