// zo2/core/half_types.hpp -- 16-bit storage types (bf16, fp16) usable on host and device.
//
// These are storage formats only: arithmetic happens in float. They are plain 2-byte structs
// (trivially copyable, same layout as __nv_bfloat16 / __half) so one buffer can be handed to
// CUDA kernels, safetensors files and the CPU reference without conversion.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <zo2/core/platform.hpp>

namespace zo2 {

namespace detail {
ZO2_HD ZO2_FORCEINLINE std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
ZO2_HD ZO2_FORCEINLINE float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
}  // namespace detail

/// bfloat16: the top 16 bits of an IEEE float.
struct bfloat16 {
  std::uint16_t bits;
};

/// IEEE 754 binary16.
struct float16 {
  std::uint16_t bits;
};

/// Whether X is one of the 16-bit float formats (the storage that rounds updates stochastically).
template <class X>
inline constexpr bool is_half_v = std::is_same_v<X, bfloat16> || std::is_same_v<X, float16>;

ZO2_HD ZO2_FORCEINLINE float to_float(bfloat16 h) {
  return detail::bits_float(static_cast<std::uint32_t>(h.bits) << 16);
}

/// float -> bf16, round to nearest even; NaN stays a (quiet) NaN.
ZO2_HD ZO2_FORCEINLINE bfloat16 to_bfloat16(float f) {
  const std::uint32_t u = detail::float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bfloat16{static_cast<std::uint16_t>((u + rounding) >> 16)};
}

/// float -> bf16 with stochastic rounding: round up with probability equal to the discarded
/// fraction of an ulp, using 16 random bits.
///
/// Why: bf16 keeps 8 significant bits, so a weight of magnitude 0.02 has an ulp of ~1.2e-4.
/// A MeZO update of size 1e-7 is ~1e-3 of that ulp; round-to-nearest returns the old value every
/// time and the update is lost forever, however many steps run. Stochastic rounding moves the
/// weight by one ulp with probability 1e-3, so the expected change equals the update and
/// learning proceeds at the intended rate on average.
ZO2_HD ZO2_FORCEINLINE bfloat16 to_bfloat16_stochastic(float f, std::uint32_t random_bits) {
  const std::uint32_t u = detail::float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return to_bfloat16(f);  // inf / NaN: nothing to dither
  const std::uint32_t dithered = u + (random_bits & 0xffffu);
  // Adding less than one bf16 ulp can carry into the exponent, which is exactly the correct
  // "round up" result; it can overflow to inf only from the largest finite values, as RNE can.
  return bfloat16{static_cast<std::uint16_t>(dithered >> 16)};
}

ZO2_HD inline float to_float(float16 h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu)  // Inf or NaN: keep the payload, so a NaN stays a NaN
    return detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0)  // normal: rebias 15 -> 127
    return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return detail::bits_float(sign);  // +-0
  // Subnormal half = mantissa * 2^-24, a normal float: shift the leading one up to the
  // implicit bit, lowering the exponent as we go.
  std::uint32_t float_exponent = 113;  // 2^-14, the exponent of the smallest normal half
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --float_exponent;
  }
  mantissa &= 0x3ffu;
  return detail::bits_float(sign | (float_exponent << 23) | (mantissa << 13));
}

/// float -> fp16, round to nearest even, with gradual underflow to subnormals and overflow to
/// Inf (65520 and above, as IEEE says); a NaN stays a quiet NaN with its top payload bits.
ZO2_HD inline float16 to_float16(float f) {
  const std::uint32_t bits = detail::float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // Inf or NaN
    const bool is_nan = magnitude > 0x7f800000u;
    return float16{static_cast<std::uint16_t>(
        sign | 0x7c00u | (is_nan ? (0x0200u | ((magnitude >> 13) & 0x3ffu)) : 0u))};
  }
  if (magnitude >= 0x47800000u) return float16{static_cast<std::uint16_t>(sign | 0x7c00u)};  // >= 2^16
  const std::uint32_t float_exponent = magnitude >> 23;
  if (float_exponent >= 113) {  // a normal half (or rounds up to Inf)
    // Rebias and add the rounding bias in one go; a mantissa carry bumps the exponent
    // (and 65520..65535 carry into Inf).
    const std::uint32_t rounded = magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u);
    return float16{static_cast<std::uint16_t>(sign | (rounded >> 13))};
  }
  if (float_exponent == 0) return float16{sign};  // float subnormals are far below 2^-24
  // A half subnormal: value / 2^-24 rounded to an integer is its mantissa;
  // value = significand * 2^(float_exponent - 150), so the quotient is significand >> shift.
  const std::uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - float_exponent;  // >= 14
  if (shift > 24) return float16{sign};                // below half of 2^-24: rounds to zero
  std::uint32_t quotient = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  if (remainder > halfway || (remainder == halfway && (quotient & 1u))) ++quotient;
  return float16{static_cast<std::uint16_t>(sign | quotient)};  // 0x400 is the smallest normal
}

/// float -> fp16 with stochastic rounding (13 random bits dither the discarded mantissa bits);
/// values outside the normal range fall back to round-to-nearest.
ZO2_HD inline float16 to_float16_stochastic(float f, std::uint32_t random_bits) {
  const std::uint32_t u = detail::float_bits(f);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs < 0x38800000u || abs >= 0x477fe000u) return to_float16(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t dithered = abs + (random_bits & 0x1fffu);
  return float16{static_cast<std::uint16_t>(sign | ((dithered - 0x38000000u) >> 13))};
}

/// Uniform conversions so templates can say to_float(x) / from_float<T>(f) for any storage T.
ZO2_HD ZO2_FORCEINLINE float to_float(float x) { return x; }
ZO2_HD ZO2_FORCEINLINE double to_float(double x) { return x; }

template <class T>
ZO2_HD ZO2_FORCEINLINE T from_float(float f) {
  if constexpr (std::is_same_v<T, bfloat16>) return to_bfloat16(f);
  else if constexpr (std::is_same_v<T, float16>) return to_float16(f);
  else return static_cast<T>(f);
}

}  // namespace zo2
