// zo2/backend/cuda/rope.cuh -- rotary position embeddings (Hugging Face's rotate_half convention)
// applied in place to the heads of a projection, optionally after a per-head RMSNorm (Qwen3's
// q_norm / k_norm, fused: one read and one write of q and k).
//
// The table: cos and sin of position p times each inverse frequency, [positions, head_dim / 2]
// floats, as transformers computes them: the angle is the fp32 product p * inv_freq[i], its cosine
// and sine are taken in double and rounded to float (the host's rope_table does the same, so both
// paths read the same table).
//
// The rotation of dimension i (< half = head_dim / 2) with i + half, each product rounded to T as
// torch's elementwise ops round them (cos and sin cast to T first, as HF casts them to q's dtype):
//   out_i = x_i cos_i - x_{i+half} sin_i,   out_{i+half} = x_{i+half} cos_i + x_i sin_i.
#pragma once

#include <algorithm>
#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/rmsnorm.cuh>  // detail::rms_scaled, rms_inverse

namespace zo2::gpu {

namespace detail {

// A template (of nothing) so that every translation unit including this header may define it.
template <int = 0>
__global__ void rope_table_kernel(const float* __restrict__ inv_freq, int half, std::int64_t entries,
                                  float attention_scaling, float* __restrict__ cos_out, float* __restrict__ sin_out) {
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t p = e / half;
    const int i = static_cast<int>(e % half);
    const float angle = __fmul_rn(static_cast<float>(p), inv_freq[i]);
    double s = 0, c = 0;
    sincos(static_cast<double>(angle), &s, &c);
    cos_out[e] = __fmul_rn(static_cast<float>(c), attention_scaling);
    sin_out[e] = __fmul_rn(static_cast<float>(s), attention_scaling);
  }
}

/// One warp per (token, head) row of x: [tokens, ld], head h in columns [h D, (h + 1) D).
/// kNorm: RMSNorm of the row (weight [D]) first.
template <class T, bool kNorm>
__global__ void __launch_bounds__(256) rope_kernel(T* __restrict__ x, std::int64_t ld, std::int64_t rows, int heads,
                                                   int head_dim, const std::int32_t* __restrict__ positions,
                                                   const float* __restrict__ cos_table,
                                                   const float* __restrict__ sin_table, const T* __restrict__ norm,
                                                   float eps) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const std::int64_t token = r / heads;
  const int half = head_dim / 2;
  T* v = x + token * ld + (r % heads) * head_dim;
  float rstd = 1.0f;
  if constexpr (kNorm) {
    float sq = 0.0f;
    for (int i = lane; i < head_dim; i += 32) {
      const float a = ld_f32(v[i]);
      sq = fmaf(a, a, sq);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
    rstd = rms_inverse(sq, head_dim, eps);
  }
  const std::int64_t row = static_cast<std::int64_t>(positions[token]) * half;
  for (int i = lane; i < half; i += 32) {
    float a = ld_f32(v[i]), b = ld_f32(v[i + half]);
    if constexpr (kNorm) {
      a = ld_f32(rms_scaled<T>(a, rstd, norm, i));
      b = ld_f32(rms_scaled<T>(b, rstd, norm, i + half));
    }
    const float c = ld_f32(st_from_f32<T>(cos_table[row + i])), s = ld_f32(st_from_f32<T>(sin_table[row + i]));
    const float a_cos = ld_f32(st_from_f32<T>(__fmul_rn(a, c))), b_sin = ld_f32(st_from_f32<T>(__fmul_rn(b, s)));
    const float b_cos = ld_f32(st_from_f32<T>(__fmul_rn(b, c))), a_sin = ld_f32(st_from_f32<T>(__fmul_rn(a, s)));
    v[i] = st_from_f32<T>(__fsub_rn(a_cos, b_sin));
    v[i + half] = st_from_f32<T>(__fadd_rn(b_cos, a_sin));
  }
}

}  // namespace detail

/// cos and sin [positions, half] (row p: position p) of the inverse frequencies inv_freq [half]
/// (device memory), scaled by attention_scaling.
inline void rope_table(const float* inv_freq, std::int64_t half, std::int64_t positions, float attention_scaling,
                       float* cos, float* sin, cudaStream_t stream) {
  if (half <= 0 || positions <= 0) throw ShapeError("rope_table: half and positions must be > 0");
  const std::int64_t entries = half * positions;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((entries + 255) / 256, 4096));
  detail::rope_table_kernel<><<<blocks, 256, 0, stream>>>(inv_freq, static_cast<int>(half), entries, attention_scaling,
                                                        cos, sin);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::rope_table_kernel");
}

/// Rotary embedding in place of `heads` heads of head_dim columns at x (row stride ld) for
/// `tokens` rows; token t at position positions[t], whose row of the tables (rope_table) it
/// reads. norm_weight [head_dim] not null: each head's row is RMSNorm-ed with it first (eps).
template <class T>
void apply_rope(T* x, std::int64_t ld, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                const std::int32_t* positions, const float* cos, const float* sin, const T* norm_weight, float eps,
                cudaStream_t stream) {
  if (tokens <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0)
    throw ShapeError("apply_rope: tokens and heads must be > 0 and head_dim even and > 0");
  if (ld < heads * head_dim) throw ShapeError("apply_rope: the row stride is smaller than the heads");
  const std::int64_t rows = tokens * heads;
  constexpr int kWarps = 8;
  const std::int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) throw ShapeError("apply_rope: too many rows for one launch");
  if (norm_weight != nullptr)
    detail::rope_kernel<T, true><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        x, ld, rows, static_cast<int>(heads), static_cast<int>(head_dim), positions, cos, sin, norm_weight, eps);
  else
    detail::rope_kernel<T, false><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        x, ld, rows, static_cast<int>(heads), static_cast<int>(head_dim), positions, cos, sin, nullptr, eps);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::rope_kernel");
}

}  // namespace zo2::gpu
