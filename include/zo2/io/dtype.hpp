// zo2/io/dtype.hpp -- element types of stored tensors and fp16/bf16 <-> float conversion.
//
// The conversions are our own, integer-only, so that they give the same bits under any
// floating-point environment (flush-to-zero, -ffast-math) and on any compiler: a checkpoint
// written on one machine must read back identically on another.
#pragma once

#include <zo2/core/half_types.hpp>

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

// ---- 16-bit conversions on raw bits: the core's (core/half_types.hpp), one implementation for
// the file formats, the CPU reference and the CUDA kernels. Round to nearest even, subnormals,
// Inf and NaN handled; integer arithmetic only, so -ffast-math cannot change the bits.

inline float bf16_to_float(std::uint16_t bits) noexcept { return to_float(bfloat16{bits}); }
inline std::uint16_t float_to_bf16(float value) noexcept { return to_bfloat16(value).bits; }
inline float fp16_to_float(std::uint16_t bits) noexcept { return to_float(float16{bits}); }
inline std::uint16_t float_to_fp16(float value) noexcept { return to_float16(value).bits; }

}  // namespace zo2::io
