// zo2/backend/cuda/layernorm.cuh -- row-wise LayerNorm (torch semantics: biased variance, eps
// inside the square root), fp32 statistics, optional affine parameters.
//
// One block per row: OPT rows are 768 to 12288 wide, so a block's threads each touch a handful
// of elements; the row stays in L1 between the three passes (mean, centered variance, output).
// The variance is the two-pass centered sum: one pass (E[x^2] - E[x]^2) cancels badly when the
// mean is large next to the spread, which residual streams often are.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>

namespace zo2::cuda {

namespace detail {

template <int kThreads, class T>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* x, const T* __restrict__ gamma,
                                                              const T* __restrict__ beta, T* y,
                                                              int cols, float eps) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ float shared_mean, shared_rstd;
  const std::int64_t row = blockIdx.x;
  const T* in = x + row * cols;
  T* out = y + row * cols;

  float sum = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) sum += ld_f32(in[i]);
  sum = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) shared_mean = sum / static_cast<float>(cols);
  __syncthreads();
  const float mean = shared_mean;

  float sq = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) {
    const float d = ld_f32(in[i]) - mean;
    sq += d * d;
  }
  sq = Reduce(temp).Sum(sq);
  if (threadIdx.x == 0) shared_rstd = rsqrtf(sq / static_cast<float>(cols) + eps);
  __syncthreads();
  const float rstd = shared_rstd;

  for (int i = threadIdx.x; i < cols; i += kThreads) {
    float v = (ld_f32(in[i]) - mean) * rstd;
    if (gamma != nullptr) v = v * ld_f32(gamma[i]) + ld_f32(beta[i]);
    out[i] = st_from_f32<T>(v);
  }
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
  if (cols <= 1024) {
    detail::layer_norm_kernel<128, T><<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, gamma, beta, y,
                                                                                       static_cast<int>(cols), eps);
  } else {
    detail::layer_norm_kernel<256, T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, gamma, beta, y,
                                                                                       static_cast<int>(cols), eps);
  }
  ZO2_CUDA_CHECK_LAUNCH("zo2::cuda::layer_norm_kernel");
}

}  // namespace zo2::cuda
