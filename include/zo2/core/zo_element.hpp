// zo2/core/zo_element.hpp -- the per-element arithmetic of MeZO, one definition for host and device.
//
// The CPU perturber and the CUDA kernels both call these, so the two paths cannot drift apart:
// they differ only in how z is computed (host vs device libm, a few ulps) and never in formula,
// rounding or order of operations (no fused multiply-adds: see detail::mul_rn).
#pragma once

#include <cstdint>
#include <type_traits>

#include <zo2/core/half_types.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/platform.hpp>

namespace zo2 {

/// Arithmetic precision for a storage type: double for double, float for everything else.
template <class S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

/// Identifies the noise of one tensor at one step: z_j = normal(seed, step, tensor, j).
struct NoiseId {
  std::uint64_t seed;
  std::uint32_t step;
  std::uint32_t tensor;
  std::uint32_t query = 0;  // which of the step's independent z (q-query estimates)
};

/// The scalars of one MeZO update theta <- theta - lr * (g * z + wd * theta).
/// wd is already zero for tensors without weight decay.
struct UpdateCoeffs {
  double lr;
  double g;
  double wd;
};

/// Rounds a value computed in compute_t<S> to storage S. 16-bit storage of an *update* uses
/// stochastic rounding with the given random word (see half_types.hpp for why); everything
/// else rounds to nearest.
template <class S>
ZO2_HD ZO2_FORCEINLINE S store_rounded(compute_t<S> v, std::uint32_t random_bits, bool stochastic) {
  if constexpr (std::is_same_v<S, bfloat16>)
    return stochastic ? to_bfloat16_stochastic(v, random_bits) : to_bfloat16(v);
  else if constexpr (std::is_same_v<S, float16>)
    return stochastic ? to_float16_stochastic(v, random_bits) : to_float16(v);
  else
    return static_cast<S>(v);
}

template <class S>
ZO2_HD ZO2_FORCEINLINE compute_t<S> load(S s) {
  if constexpr (is_half_v<S>) return to_float(s);
  else return static_cast<compute_t<S>>(s);
}

namespace detail {
// Each product and sum rounded on its own, in every kernel. nvcc contracts a * b + c into one
// fused multiply-add where it sees fit, and not alike in every kernel: where theta + c z and
// theta - c z share the product, it rounds the product; where theta - c z stands alone, it
// fuses it -- so the same value would depend on which kernel computed it. The _rn intrinsics
// are never contracted. On the host, x86-64 code without FMA instructions (GCC's and Clang's
// default target) rounds each operation as written, as these do.
template <class C>
ZO2_HD ZO2_FORCEINLINE C mul_rn(C a, C b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <class C>
ZO2_HD ZO2_FORCEINLINE C add_rn(C a, C b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
}  // namespace detail

/// theta - lr * (g * z + wd * theta), in compute_t<S>.
template <class S>
ZO2_HD ZO2_FORCEINLINE compute_t<S> updated_value(compute_t<S> theta, float z, const UpdateCoeffs& u) {
  using C = compute_t<S>;
  using detail::add_rn;
  using detail::mul_rn;
  const C step = mul_rn(static_cast<C>(u.lr), add_rn(mul_rn(static_cast<C>(u.g), static_cast<C>(z)),
                                                     mul_rn(static_cast<C>(u.wd), theta)));
  return add_rn(theta, -step);
}

/// theta + c * z, in compute_t<S>.
template <class S>
ZO2_HD ZO2_FORCEINLINE compute_t<S> perturbed_value(compute_t<S> theta, float z, double c) {
  using C = compute_t<S>;
  return detail::add_rn(theta, detail::mul_rn(static_cast<C>(c), static_cast<C>(z)));
}

}  // namespace zo2
