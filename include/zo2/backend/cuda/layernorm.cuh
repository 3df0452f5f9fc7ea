// zo2/backend/cuda/layernorm.cuh -- row-wise LayerNorm (torch semantics: biased variance, eps
// inside the square root), fp32 statistics, optional affine parameters.
//
// One block per row: OPT rows are 768 to 12288 wide, so a block's threads each touch a handful
// of elements. Where a row is whole 16-byte vectors (every OPT width) each thread keeps its
// share in registers: the row is read once, with 16-byte loads (layer_norm_rows_kernel). Other
// rows take three passes (mean, centered variance, output) over a row that stays in L1.
// The variance is the two-pass centered sum: one pass (E[x^2] - E[x]^2) cancels badly when the
// mean is large next to the spread, which residual streams often are.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>

namespace zo2::gpu {

namespace detail {

/// The sum over the block of each thread's `v`, returned to every thread. The shared storage
/// is reused by the next call, after the closing barrier.
template <int kThreads>
__device__ __forceinline__ float block_sum_to_all(float v) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ float total;
  v = Reduce(temp).Sum(v);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  const float result = total;
  __syncthreads();
  return result;
}

template <int kThreads, class T>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* x, const T* __restrict__ gamma,
                                                              const T* __restrict__ beta, T* y,
                                                              int cols, float eps) {
  const std::int64_t row = blockIdx.x;
  const T* in = x + row * cols;
  T* out = y + row * cols;

  float sum = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) sum += ld_f32(in[i]);
  const float mean = block_sum_to_all<kThreads>(sum) / static_cast<float>(cols);

  float sq = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) {
    const float d = ld_f32(in[i]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum_to_all<kThreads>(sq) / static_cast<float>(cols) + eps);

  for (int i = threadIdx.x; i < cols; i += kThreads) {
    float v = (ld_f32(in[i]) - mean) * rstd;
    if (gamma != nullptr) v = v * ld_f32(gamma[i]) + ld_f32(beta[i]);
    out[i] = st_from_f32<T>(v);
  }
}

/// The same LayerNorm with the row held in registers: each thread loads up to kVecs 16-byte
/// vectors once (one read of the row from memory, not three), both reductions run on registers,
/// and the output goes out as 16-byte stores. For rows of a multiple of 16 bytes at 16-byte
/// aligned addresses; layer_norm picks it where it applies. Same two-pass centered statistics.
/// In place (y == x) is safe: a thread writes only the elements it read, after the reductions.
template <int kThreads, int kVecs, class T>
__global__ void __launch_bounds__(kThreads) layer_norm_rows_kernel(const T* x, const T* __restrict__ gamma,
                                                                   const T* __restrict__ beta, T* y, int cols,
                                                                   float eps) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // elements per vector
  const std::int64_t row = blockIdx.x;
  const T* in = x + row * cols;
  T* out = y + row * cols;
  float v[kVecs][kPer];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (i * kThreads + static_cast<int>(threadIdx.x)) * kPer;
    if (c < cols) {
      const uint4 raw = *reinterpret_cast<const uint4*>(in + c);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        v[i][k] = ld_f32(e[k]);
        sum += v[i][k];
      }
    }
  }
  const float mean = block_sum_to_all<kThreads>(sum) / static_cast<float>(cols);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (i * kThreads + static_cast<int>(threadIdx.x)) * kPer;
    if (c < cols) {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const float d = v[i][k] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum_to_all<kThreads>(sq) / static_cast<float>(cols) + eps);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (i * kThreads + static_cast<int>(threadIdx.x)) * kPer;
    if (c < cols) {
      uint4 raw;
      T* o = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        float r = (v[i][k] - mean) * rstd;
        if (gamma != nullptr) r = r * ld_f32(gamma[c + k]) + ld_f32(beta[c + k]);
        o[k] = st_from_f32<T>(r);
      }
      *reinterpret_cast<uint4*>(out + c) = raw;
    }
  }
}

template <int kThreads, int kVecs, class T>
void launch_layer_norm_rows(const T* x, const T* gamma, const T* beta, T* y, std::int64_t rows, int cols, float eps,
                            cudaStream_t stream) {
  layer_norm_rows_kernel<kThreads, kVecs, T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, gamma, beta, y,
                                                                                                 cols, eps);
}
}  // namespace detail

/// y[r, :] = LayerNorm(x[r, :]) for `rows` contiguous rows of `cols` elements; gamma and beta
/// both null (no affine) or both set. y may equal x.
template <class T>
void layer_norm(const T* x, const T* gamma, const T* beta, T* y, std::int64_t rows, std::int64_t cols, float eps,
                cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) throw ShapeError("layer_norm: rows and cols must be > 0");
  if ((gamma == nullptr) != (beta == nullptr)) throw ShapeError("layer_norm: gamma and beta must be both set or both null");
  if (rows > 0x7fffffff) throw ShapeError("layer_norm: too many rows for one launch");
  // Rows in registers where rows are whole 16-byte vectors at 16-byte aligned addresses (OPT's
  // widths all are): vectors per thread at 256 threads, up to 8 (bf16 rows to 16384 wide).
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const std::int64_t per_vec = 16 / static_cast<std::int64_t>(sizeof(T));
  const std::int64_t vecs = cols / per_vec, per_thread = (vecs + 255) / 256;
  if (cols % per_vec == 0 && per_thread <= 8 && aligned(x) && aligned(y) && aligned(gamma) && aligned(beta)) {
    const int c = static_cast<int>(cols);
    if (per_thread <= 1) detail::launch_layer_norm_rows<256, 1>(x, gamma, beta, y, rows, c, eps, stream);
    else if (per_thread <= 2) detail::launch_layer_norm_rows<256, 2>(x, gamma, beta, y, rows, c, eps, stream);
    else if (per_thread <= 4) detail::launch_layer_norm_rows<256, 4>(x, gamma, beta, y, rows, c, eps, stream);
    else detail::launch_layer_norm_rows<256, 8>(x, gamma, beta, y, rows, c, eps, stream);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::layer_norm_rows_kernel");
    return;
  }
  if (cols <= 1024) {
    detail::layer_norm_kernel<128, T><<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, gamma, beta, y,
                                                                                       static_cast<int>(cols), eps);
  } else {
    detail::layer_norm_kernel<256, T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, gamma, beta, y,
                                                                                       static_cast<int>(cols), eps);
  }
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::layer_norm_kernel");
}

}  // namespace zo2::gpu
