// zo2/backend/cuda/rmsnorm.cuh -- row-wise RMSNorm as Hugging Face's LlamaRMSNorm computes it:
// y = w * round_T(x / sqrt(mean(x^2) + eps)), the mean in fp32, the normalized value rounded to the
// activations' type before the weight multiplies it (HF casts back to the input dtype first), the
// product rounded once more.
//
// One block per row. Where a row is whole 16-byte vectors at 16-byte aligned addresses (every
// published hidden size) each thread keeps its share in registers and the row is read once
// (rms_norm_rows_kernel); other rows are read twice (sum of squares, output) from L1.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/layernorm.cuh>  // detail::block_sum_to_all

namespace zo2::gpu {

namespace detail {

/// w * round_T(x * rstd), rounded to T (w null: no scale). The products are not contracted into
/// anything: each is rounded as HF's elementwise ops round it.
template <class T>
__device__ __forceinline__ T rms_scaled(float x, float rstd, const T* __restrict__ weight, int i) {
  const float normalized = ld_f32(st_from_f32<T>(__fmul_rn(x, rstd)));
  return weight != nullptr ? st_from_f32<T>(__fmul_rn(ld_f32(weight[i]), normalized)) : st_from_f32<T>(normalized);
}

__device__ __forceinline__ float rms_inverse(float sum_squares, int cols, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(cols) + eps);
}

template <int kThreads, class T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const T* x, const T* __restrict__ weight, T* y, int cols,
                                                            float eps) {
  const std::int64_t row = blockIdx.x;
  const T* in = x + row * cols;
  T* out = y + row * cols;
  float sq = 0.0f;
  for (int i = threadIdx.x; i < cols; i += kThreads) {
    const float v = ld_f32(in[i]);
    sq = fmaf(v, v, sq);
  }
  const float rstd = rms_inverse(block_sum_to_all<kThreads>(sq), cols, eps);
  for (int i = threadIdx.x; i < cols; i += kThreads) out[i] = rms_scaled<T>(ld_f32(in[i]), rstd, weight, i);
}

/// The same with the row in registers: up to kVecs 16-byte vectors a thread, read once. In place
/// (y == x) is safe: a thread writes only what it read, after the reduction.
template <int kThreads, int kVecs, class T>
__global__ void __launch_bounds__(kThreads) rms_norm_rows_kernel(const T* x, const T* __restrict__ weight, T* y,
                                                                 int cols, float eps) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const std::int64_t row = blockIdx.x;
  const T* in = x + row * cols;
  T* out = y + row * cols;
  float v[kVecs][kPer];
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (i * kThreads + static_cast<int>(threadIdx.x)) * kPer;
    if (c < cols) {
      const uint4 raw = *reinterpret_cast<const uint4*>(in + c);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        v[i][k] = ld_f32(e[k]);
        sq = fmaf(v[i][k], v[i][k], sq);
      }
    }
  }
  const float rstd = rms_inverse(block_sum_to_all<kThreads>(sq), cols, eps);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (i * kThreads + static_cast<int>(threadIdx.x)) * kPer;
    if (c < cols) {
      uint4 raw;
      T* o = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) o[k] = rms_scaled<T>(v[i][k], rstd, weight, c + k);
      *reinterpret_cast<uint4*>(out + c) = raw;
    }
  }
}

template <int kThreads, int kVecs, class T>
void launch_rms_norm_rows(const T* x, const T* weight, T* y, std::int64_t rows, int cols, float eps,
                          cudaStream_t stream) {
  rms_norm_rows_kernel<kThreads, kVecs, T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, weight, y, cols,
                                                                                                eps);
}

}  // namespace detail

/// y[r, :] = RMSNorm(x[r, :]) * weight for `rows` contiguous rows of `cols` elements (weight null:
/// no scale). y may equal x.
template <class T>
void rms_norm(const T* x, const T* weight, T* y, std::int64_t rows, std::int64_t cols, float eps,
              cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) throw ShapeError("rms_norm: rows and cols must be > 0");
  if (rows > 0x7fffffff || cols > 0x7fffffff) throw ShapeError("rms_norm: too many rows or columns for one launch");
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const std::int64_t per_vec = 16 / static_cast<std::int64_t>(sizeof(T));
  const std::int64_t vecs = cols / per_vec, per_thread = (vecs + 255) / 256;
  if (cols % per_vec == 0 && per_thread <= 8 && aligned(x) && aligned(y)) {
    const int c = static_cast<int>(cols);
    if (per_thread <= 1) detail::launch_rms_norm_rows<256, 1>(x, weight, y, rows, c, eps, stream);
    else if (per_thread <= 2) detail::launch_rms_norm_rows<256, 2>(x, weight, y, rows, c, eps, stream);
    else if (per_thread <= 4) detail::launch_rms_norm_rows<256, 4>(x, weight, y, rows, c, eps, stream);
    else detail::launch_rms_norm_rows<256, 8>(x, weight, y, rows, c, eps, stream);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::rms_norm_rows_kernel");
    return;
  }
  if (cols <= 1024) {
    detail::rms_norm_kernel<128, T><<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, weight, y,
                                                                                     static_cast<int>(cols), eps);
  } else {
    detail::rms_norm_kernel<256, T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, weight, y,
                                                                                     static_cast<int>(cols), eps);
  }
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::rms_norm_kernel");
}

}  // namespace zo2::gpu
