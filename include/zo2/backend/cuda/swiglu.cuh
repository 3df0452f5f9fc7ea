// zo2/backend/cuda/swiglu.cuh -- the LLaMA MLP's activation in one pass: gate <- silu(gate) * up,
// in place, on the two halves of one fused [tokens, 2 * intermediate] gate/up projection (or any
// two matrices of one row stride).
//
// As Hugging Face computes act_fn(gate_proj(x)) * up_proj(x): silu(g) = g / (1 + e^-g) in fp32,
// rounded to T, then the product with up rounded to T. 16-bit rows that are whole 16-byte vectors
// go 8 elements a thread with 16-byte loads and stores; other rows one element a thread.
#pragma once

#include <algorithm>
#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>

namespace zo2::gpu {

namespace detail {

template <class T>
__device__ __forceinline__ T swiglu_value(T gate, T up) {
  const float g = ld_f32(gate);
  const float activated = ld_f32(st_from_f32<T>(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))));
  return st_from_f32<T>(__fmul_rn(activated, ld_f32(up)));
}

/// Element e = r * width + c of gate (row stride ld) and up (the same stride).
template <class T>
__global__ void swiglu_kernel(T* __restrict__ gate, const T* __restrict__ up, std::int64_t rows, std::int64_t width,
                              std::int64_t ld) {
  const std::int64_t n = rows * width;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t at = e / width * ld + e % width;
    gate[at] = swiglu_value<T>(gate[at], up[at]);
  }
}

/// 16-byte vectors: vector e of a row of width / kPer.
template <class T>
__global__ void swiglu_vec_kernel(T* __restrict__ gate, const T* __restrict__ up, std::int64_t rows,
                                  std::int64_t vecs_per_row, std::int64_t ld) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const std::int64_t n = rows * vecs_per_row;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t at = e / vecs_per_row * ld + e % vecs_per_row * kPer;
    uint4 g = *reinterpret_cast<const uint4*>(gate + at);
    const uint4 u = *reinterpret_cast<const uint4*>(up + at);
    T* gv = reinterpret_cast<T*>(&g);
    const T* uv = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < kPer; ++k) gv[k] = swiglu_value<T>(gv[k], uv[k]);
    *reinterpret_cast<uint4*>(gate + at) = g;
  }
}

}  // namespace detail

/// gate[r, c] <- round_T(round_T(silu(gate[r, c])) * up[r, c]) for r < rows, c < width; gate and
/// up have row stride ld (>= width).
template <class T>
void swiglu(T* gate, const T* up, std::int64_t rows, std::int64_t width, std::int64_t ld, cudaStream_t stream) {
  if (rows <= 0 || width <= 0 || ld < width) throw ShapeError("swiglu: rows and width must be > 0, ld >= width");
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  constexpr std::int64_t kPer = 16 / static_cast<std::int64_t>(sizeof(T));
  if (width % kPer == 0 && ld % kPer == 0 && aligned(gate) && aligned(up)) {
    const std::int64_t vecs = rows * (width / kPer);
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((vecs + 255) / 256, 8192));
    detail::swiglu_vec_kernel<T><<<blocks, 256, 0, stream>>>(gate, up, rows, width / kPer, ld);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::swiglu_vec_kernel");
    return;
  }
  const std::int64_t n = rows * width;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 8192));
  detail::swiglu_kernel<T><<<blocks, 256, 0, stream>>>(gate, up, rows, width, ld);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::swiglu_kernel");
}

}  // namespace zo2::gpu
