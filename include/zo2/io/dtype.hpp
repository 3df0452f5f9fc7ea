// zo2/io/dtype.hpp -- element types of stored tensors and fp16/bf16 <-> float conversion.
//
// The conversions are our own, integer-only, so that they give the same bits under any
// floating-point environment (flush-to-zero, -ffast-math) and on any compiler: a checkpoint
// written on one machine must read back identically on another.
#pragma once

#include <zo2/core/error.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace zo2::io {

/// Element types that safetensors files may hold (the names are those of the format).
enum class Dtype : std::uint8_t {
  BOOL,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64,
};

/// Bytes per element.
constexpr std::size_t dtype_size(Dtype dtype) noexcept {
  switch (dtype) {
    case Dtype::BOOL:
    case Dtype::U8:
    case Dtype::I8:
    case Dtype::F8_E5M2:
    case Dtype::F8_E4M3: return 1;
    case Dtype::I16:
    case Dtype::U16:
    case Dtype::F16:
    case Dtype::BF16: return 2;
    case Dtype::I32:
    case Dtype::U32:
    case Dtype::F32: return 4;
    case Dtype::F64:
    case Dtype::I64:
    case Dtype::U64: return 8;
  }
  return 0;
}

/// The safetensors spelling, e.g. "BF16".
constexpr std::string_view dtype_name(Dtype dtype) noexcept {
  switch (dtype) {
    case Dtype::BOOL: return "BOOL";
    case Dtype::U8: return "U8";
    case Dtype::I8: return "I8";
    case Dtype::F8_E5M2: return "F8_E5M2";
    case Dtype::F8_E4M3: return "F8_E4M3";
    case Dtype::I16: return "I16";
    case Dtype::U16: return "U16";
    case Dtype::F16: return "F16";
    case Dtype::BF16: return "BF16";
    case Dtype::I32: return "I32";
    case Dtype::U32: return "U32";
    case Dtype::F32: return "F32";
    case Dtype::F64: return "F64";
    case Dtype::I64: return "I64";
    case Dtype::U64: return "U64";
  }
  return "?";
}

/// Parses a safetensors dtype name; nullopt when it is not one we know.
inline std::optional<Dtype> parse_dtype(std::string_view name) noexcept {
  constexpr Dtype all[] = {Dtype::BOOL, Dtype::U8,   Dtype::I8,  Dtype::F8_E5M2, Dtype::F8_E4M3,
                           Dtype::I16,  Dtype::U16,  Dtype::F16, Dtype::BF16,    Dtype::I32,
                           Dtype::U32,  Dtype::F32,  Dtype::F64, Dtype::I64,     Dtype::U64};
  for (Dtype dtype : all) {
    if (dtype_name(dtype) == name) return dtype;
  }
  return std::nullopt;
}

// ---- bf16: the top half of an IEEE float32 -------------------------------------------------

constexpr float bf16_to_float(std::uint16_t bits) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

/// Round to nearest, ties to even. bf16 keeps float32's exponent range, so subnormals need no
/// special path; a NaN stays a NaN (quieted, because truncating its payload could make an Inf).
constexpr std::uint16_t float_to_bf16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  }
  const std::uint32_t lsb_of_result = (bits >> 16) & 1u;
  return static_cast<std::uint16_t>((bits + 0x7fffu + lsb_of_result) >> 16);
}

// ---- fp16: IEEE binary16 (1 sign, 5 exponent, 10 mantissa bits) ----------------------------

constexpr float fp16_to_float(std::uint16_t half) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  std::uint32_t mantissa = half & 0x3ffu;

  if (exponent == 0x1f) {  // Inf or NaN: keep the payload, so a NaN stays a NaN
    return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent != 0) {  // normal: rebias 15 -> 127
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  if (mantissa == 0) return std::bit_cast<float>(sign);  // +-0
  // Subnormal half = mantissa * 2^-24; every one of them is a normal float. Shift the mantissa
  // up until its leading one reaches the implicit bit, lowering the exponent as we go.
  std::uint32_t float_exponent = 113;  // 2^-14 is the exponent of the smallest normal half
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --float_exponent;
  }
  mantissa &= 0x3ffu;
  return std::bit_cast<float>(sign | (float_exponent << 23) | (mantissa << 13));
}

/// Round to nearest, ties to even, with gradual underflow to fp16 subnormals and overflow to
/// Inf (65520 and above round to Inf, as IEEE says); NaN becomes a quiet NaN.
constexpr std::uint16_t float_to_fp16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;

  if (magnitude >= 0x7f800000u) {  // Inf or NaN
    const bool is_nan = magnitude > 0x7f800000u;
    return static_cast<std::uint16_t>(sign | 0x7c00u |
                                      (is_nan ? (0x0200u | ((magnitude >> 13) & 0x3ffu)) : 0u));
  }
  if (magnitude >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 2^16

  const std::uint32_t float_exponent = magnitude >> 23;
  if (float_exponent >= 113) {  // the result is a normal half (or rounds up to Inf)
    const std::uint32_t lsb_of_result = (magnitude >> 13) & 1u;
    // Rebias the exponent and add the rounding bias in one go; a mantissa carry correctly
    // bumps the exponent (and 65520..65535 carry into Inf).
    const std::uint32_t rounded = magnitude - (112u << 23) + 0xfffu + lsb_of_result;
    return static_cast<std::uint16_t>(sign | (rounded >> 13));
  }
  if (float_exponent == 0) return sign;  // float subnormals are far below half's 2^-24

  // The result is a half subnormal: value / 2^-24, rounded to an integer, is its mantissa.
  // value = significand * 2^(float_exponent - 150), so the quotient is significand >> shift.
  const std::uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - float_exponent;  // >= 14
  if (shift > 24) return sign;                         // below half of 2^-24: rounds to zero
  std::uint32_t quotient = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  if (remainder > halfway || (remainder == halfway && (quotient & 1u))) ++quotient;
  return static_cast<std::uint16_t>(sign | quotient);  // 0x400 here is the smallest normal
}

}  // namespace zo2::io
