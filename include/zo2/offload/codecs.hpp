// zo2/offload/codecs.hpp -- what a block's master rests as in host memory and crosses PCIe as.
//
// The offload engine moves each block over PCIe once per step, so the bytes per parameter of the
// resting format set the step's floor (OPT-6.7B: 27 GB in fp32, 13 GB in bf16, 6.7 GB in int8).
// A codec is chosen per run:
//
//   Fp32Codec      4 B/param, exact.
//   Bf16Codec      2 B/param, stochastic rounding (SR) when an update is written.
//   Fp16Codec      2 B/param, SR on write (range +-65504; subnormals round to nearest).
//   Int8RowCodec   1 B/param + one float scale per row, SR on write.
//
// Why SR on every lossy write: a MeZO update (lr * g * z ~ 1e-7) is far below one ulp of any
// 8- or 16-bit format; round-to-nearest would drop it every time. SR keeps E[decoded] equal to
// the exact value, so the expected trajectory is the fp32 one. The SR bits of element j of
// tensor k at step t are core's rounding_bits_at(seed, t, k, j) -- 16 bits, the same the CPU
// perturber uses, so Bf16Codec on the GPU reproduces Resident<bfloat16, float>.
//
// A group's encoded flat buffer (`GroupCodec<C>::bytes()` bytes):
//
//   [0, payload_bytes)          element j of tensor r at byte (layout.offset(r) + j) * C::element_bytes
//                               -- the ParamLayout's offsets, padding included, so one copy moves
//                               a block and kernels index payload exactly as they index floats;
//   [scales_offset, bytes)      row-scaled codecs only: one float per row, tensors in layout
//                               order, tensor r's rows starting at row index first_row(r);
//                               scales_offset = payload rounded up to 16 bytes.
//
// Rows (row-scaled codecs): a tensor of rank >= 2 has shape[0] rows of numel / shape[0]
// elements (the leading dim: one scale per output feature of a Linear weight); a rank-1 tensor
// (bias, LayerNorm gain) is a single row. Code q in [-127, 127]; value = q * scale. A fresh
// encode (GroupCodec::encode) sets scale = absmax(row) / 124, leaving the largest magnitude 3
// codes below the top (Int8RowCodec::kEncodeCode says why); a rewrite after an update keeps the
// old scale while the row fits it (Int8RowCodec::rescale). An all-zero row has scale 0 and
// decodes to exact zeros.
//
// Host functions (GroupCodec) validate their arguments and throw zo2::Error; the ZO2_HD element
// functions (C::load / C::store) trust their caller, as kernels must.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/platform.hpp>

namespace zo2::offload {

namespace detail {
ZO2_HD ZO2_FORCEINLINE float floor_f(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}
ZO2_HD ZO2_FORCEINLINE double abs_d(double x) { return x < 0.0 ? -x : x; }
/// a b + c rounded once (FFMA on the device, fmaf on the host: the same bits).
ZO2_HD ZO2_FORCEINLINE float fma_f(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
/// x rounded to the nearest integer, ties to even (as rintf and std::nearbyint in the default
/// rounding mode; the sign of a zero result may differ, which no int8 code sees). On the host,
/// std::nearbyint is a libm call on baseline x86-64 (about a fifth of an int8 encode's time);
/// adding and subtracting 1.5 * 2^23 rounds the same way in two float adds, for |x| < 2^22.
ZO2_HD ZO2_FORCEINLINE float rint_f(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: the sum's unit in the last place is 1
  constexpr float kLimit = 4194304.0f;   // 2^22: below it the sum stays in [2^23, 2^24)
  if (x > -kLimit && x < kLimit) return (x + kMagic) - kMagic;
  return std::nearbyint(x);  // large, infinite or NaN
#endif
}
/// The low 16 random bits -> u in [0, 1), exactly representable: the rounding bias is at most
/// 2^-16 of a code.
ZO2_HD ZO2_FORCEINLINE float unit_uniform(std::uint32_t bits) {
  return static_cast<float>(bits & 0xffffu) * 1.52587890625e-05f;  // 2^-16
}
}  // namespace detail

/// The elementwise codecs: the payload is an array of S, written with core's rounding
/// (store_rounded in zo_element.hpp: stochastic for 16-bit S when asked, to nearest otherwise;
/// fp32 is exact and ignores the random bits). One definition, so the offload engine rounds
/// exactly as the resident policies do.
template <class S>
struct PlainCodec {
  using storage = S;  // the payload is an array of this type
  static constexpr std::size_t element_bytes = sizeof(S);
  static constexpr bool row_scaled = false;
  ZO2_HD ZO2_FORCEINLINE static float load(const unsigned char* payload, std::size_t j) {
    return zo2::load(reinterpret_cast<const S*>(payload)[j]);
  }
  ZO2_HD ZO2_FORCEINLINE static void store(unsigned char* payload, std::size_t j, float v,
                                           std::uint32_t bits, bool stochastic) {
    reinterpret_cast<S*>(payload)[j] = store_rounded<S>(v, bits, stochastic);
  }
};

/// fp32: the exact format.
struct Fp32Codec : PlainCodec<float> {
  static constexpr const char* name = "fp32";
};
/// bf16: 8 significant bits; SR with 16 random bits (see half_types.hpp).
struct Bf16Codec : PlainCodec<bfloat16> {
  static constexpr const char* name = "bf16";
};
/// fp16: 11 significant bits, range +-65504; SR with 13 random bits in the normal range.
struct Fp16Codec : PlainCodec<float16> {
  static constexpr const char* name = "fp16";
};

/// int8 with one absmax scale per row; SR with 16 random bits: q = floor(v / scale + u).
struct Int8RowCodec {
  static constexpr const char* name = "int8";
  static constexpr std::size_t element_bytes = 1;
  static constexpr bool row_scaled = true;
  static constexpr float kMaxCode = 127.0f;
  /// The code a fresh scale gives the row's largest magnitude: 124, not 127. The 2.4% of
  /// headroom lets keeps_scale() prove, from the row's codes alone, that an update cannot push
  /// the row out of its scale, so the offload kernel skips the exact absmax sweep (which
  /// regenerates z for every element) on nearly every row; at code 127 no proof is possible.
  /// Costs 2.4% of resolution.
  static constexpr float kEncodeCode = 124.0f;
  /// A bound on |z| of core's Box-Muller (and the CUDA fast variant): u1 >= 2^-32, so the radius
  /// is at most sqrt(-2 ln 2^-32) = 6.6604, and |sin|, |cos| <= 1 (+2^-21 for the fast ones).
  static constexpr double kMaxAbsNormal = 6.67;
  /// The largest scale under which every code decodes to a finite float: 127 * kMaxScale is
  /// 0x1.fffffcp+127, just below FLT_MAX (the next float up overflows to inf).
  static constexpr float kMaxScale = 0x1.020406p+121f;

  /// The scale of a row whose largest magnitude is `absmax` (finite, >= 0). Zero rows get 0;
  /// rows so tiny that absmax / 124 underflows keep the smallest positive scale, so they round
  /// (stochastically) to multiples of it instead of dividing by zero; rows within 2.4% of
  /// FLT_MAX get kMaxScale (their largest codes reach up to 127), so no code decodes to inf.
  ZO2_HD ZO2_FORCEINLINE static float scale_for(float absmax) {
    if (!(absmax > 0.0f)) return 0.0f;
    const float s = absmax / kEncodeCode;
    if (s > kMaxScale) return kMaxScale;
    return s > 0.0f ? s : 1.401298464324817e-45f;  // the smallest subnormal
  }
  /// The scale a row keeps when it is rewritten after an update (the kernels' rule). A rewrite
  /// under a new scale puts every element on a new grid and SR then adds variance ~scale^2/6 to
  /// each, every step: a random walk far larger than MeZO's updates. So the scale is sticky: it
  /// is kept while the updated row still fits (absmax <= 127 scale) and still uses at least half
  /// the code range; only then are elements moved by SR alone, with variance |update| * scale.
  ZO2_HD ZO2_FORCEINLINE static float rescale(float old_scale, float new_absmax) {
    if (old_scale > 0.0f && new_absmax <= kMaxCode * old_scale && new_absmax >= 0.5f * kMaxCode * old_scale)
      return old_scale;
    return scale_for(new_absmax);
  }
  /// True when rescale(old_scale, new_absmax) returns old_scale for sure, where new_absmax is the
  /// largest |updated_value| of a row whose decoded values have largest magnitude `absmax`
  /// (exact: max |code| * old_scale), under update u with any z, |z| <= kMaxAbsNormal. Each
  /// updated value lies within absmax (1 +- |lr wd|) +- |lr g| kMaxAbsNormal; the bounds are
  /// widened by 1e-5 relative, far more than the float arithmetic of updated_value can add. So a
  /// kernel may skip the exact sweep when this holds and get the same scale. False for a zero
  /// scale and for non-finite coefficients. An SGD update of q queries (g z replaced by
  /// d = sum_i c_i z_i) passes g = sum_i |c_i|: |d| <= g kMaxAbsNormal up to the ~q 2^-24 relative
  /// rounding of the sum, inside the widening (row_kernel.cuh); a stateful rule has no such bound.
  ZO2_HD ZO2_FORCEINLINE static bool keeps_scale(float old_scale, float absmax, const UpdateCoeffs& u) {
    if (!(old_scale > 0.0f)) return false;
    const double lr = static_cast<float>(u.lr), g = static_cast<float>(u.g), wd = static_cast<float>(u.wd);
    const double shrink = detail::abs_d(lr * wd), noise = detail::abs_d(lr * g) * kMaxAbsNormal;
    const double hi = (static_cast<double>(absmax) * (1.0 + shrink) + noise) * (1.0 + 1e-5);
    const double lo = (static_cast<double>(absmax) * (1.0 - shrink) - noise) * (1.0 - 1e-5);
    // rescale's thresholds, computed as rescale computes them
    const float top = kMaxCode * old_scale, bottom = 0.5f * kMaxCode * old_scale;
    return hi <= static_cast<double>(top) && lo >= static_cast<double>(bottom);  // NaN: false
  }
  /// The code of value v under `scale`: v / scale rounded (stochastically with `bits` when
  /// asked) and clamped to [-127, 127]; 0 for a zero scale.
  ZO2_HD ZO2_FORCEINLINE static std::int8_t code(float v, float scale, std::uint32_t bits, bool stochastic) {
    return static_cast<std::int8_t>(scale > 0.0f ? rounded_code(v / scale, bits, stochastic) : 0.0f);
  }
  /// x = v / scale rounded (stochastically with `bits` when asked) and clamped to [-127, 127]:
  /// the code as a float.
  ZO2_HD ZO2_FORCEINLINE static float rounded_code(float x, std::uint32_t bits, bool stochastic) {
    const float q = stochastic ? detail::floor_f(x + detail::unit_uniform(bits)) : detail::rint_f(x);
    return q > kMaxCode ? kMaxCode : (q < -kMaxCode ? -kMaxCode : q);
  }
  ZO2_HD ZO2_FORCEINLINE static float value(std::int8_t code, float scale) { return static_cast<float>(code) * scale; }
  /// code(v, scale, bits, true) and value() of that code for the elements of one row, with fewer
  /// of the GPU's conversion and special-function instructions (its XU pipe, 16 lanes an SM,
  /// which bounds the int8 pass): v / scale is v times RN(1 / scale), corrected by one FMA --
  /// the correctly rounded quotient (Markstein's theorem; test_codecs.cpp compares the codes and
  /// values with code() and value()) without a reciprocal and a range check per element; the
  /// code q, a float holding an integer in [-127, 127], becomes the int8 by its bits (q + 1.5 *
  /// 2^23 puts it in the low byte) instead of a float-to-int conversion; and its value is q times
  /// the scale, what value(code) computes from the code. `accepts` says where this holds: v and the scale within
  /// [2^-60, 2^60], so that quotient and remainder stay normal. Elsewhere (zeros, all-zero rows,
  /// infinities, NaN) the caller takes code() and value().
  class StochasticRowEncoder {
   public:
    ZO2_HD explicit StochasticRowEncoder(float scale)
        : scale_(scale), usable_(in_range(scale)), reciprocal_(usable_ ? 1.0f / scale : 0.0f) {}
    ZO2_HD ZO2_FORCEINLINE bool accepts(float v) const { return usable_ && in_range(std::fabs(v)); }
    /// For v that accepts(v): code(v, scale, bits, true) and value() of it.
    ZO2_HD ZO2_FORCEINLINE void encode(float v, std::uint32_t bits, std::int8_t& code, float& value) const {
      const float q0 = zo2::detail::mul_rn(v, reciprocal_);
      const float x = detail::fma_f(detail::fma_f(-q0, scale_, v), reciprocal_, q0);  // v / scale
      // never -0: x + the rounding bits is -0 only for x = -0
      const float q = rounded_code(x, bits, true);
      code = static_cast<std::int8_t>(static_cast<std::uint8_t>(zo2::detail::float_bits(q + 12582912.0f) & 0xffu));
      value = zo2::detail::mul_rn(q, scale_);
    }

   private:
    ZO2_HD static bool in_range(float a) { return a >= 0x1p-60f && a <= 0x1p+60f; }
    float scale_;
    bool usable_;
    float reciprocal_;
  };
  ZO2_HD ZO2_FORCEINLINE static float load(const unsigned char* payload, std::size_t j, float scale) {
    return value(reinterpret_cast<const std::int8_t*>(payload)[j], scale);
  }
  ZO2_HD ZO2_FORCEINLINE static void store(unsigned char* payload, std::size_t j, float v, float scale,
                                           std::uint32_t bits, bool stochastic) {
    reinterpret_cast<std::int8_t*>(payload)[j] = code(v, scale, bits, stochastic);
  }
};

template <class C>
concept ElementCodec = requires {
  { C::name } -> std::convertible_to<const char*>;
  { C::element_bytes } -> std::convertible_to<std::size_t>;
  { C::row_scaled } -> std::convertible_to<bool>;
};

/// Where tensor r of a group lives in the encoded buffer: shared by host code and kernels.
struct CodecTensor {
  std::size_t offset;     // first element (the ParamLayout offset)
  std::size_t numel;
  std::size_t rows;       // 1 for rank-1 tensors
  std::size_t row_len;    // numel / rows
  std::size_t first_row;  // index of its first scale (row-scaled codecs)
};

/// Rows of a tensor under the row-scaled codecs (see the header comment).
inline std::size_t codec_rows(const TensorSpec& spec) {
  return spec.shape.size() >= 2 ? static_cast<std::size_t>(spec.shape[0]) : 1;
}

/// The encoded form of one group (a ParamLayout) under codec C: size, geometry, and host
/// encode / decode of one tensor or the whole group.
template <ElementCodec C>
class GroupCodec {
 public:
  GroupCodec() = default;
  explicit GroupCodec(const ParamLayout& layout) : total_(layout.total_elements()) {
    std::size_t row = 0;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const TensorSpec& spec = layout.spec(r);
      const std::size_t rows = codec_rows(spec);
      tensors_.push_back(CodecTensor{layout.offset(r), spec.numel(), rows, spec.numel() / rows, row});
      row += rows;
    }
    rows_ = row;
    scales_offset_ = round16(total_ * C::element_bytes);
    bytes_ = scales_offset_ + (C::row_scaled ? round16(rows_ * sizeof(float)) : 0);
  }

  /// Bytes of one encoded group: what rests in host memory and crosses PCIe.
  std::size_t bytes() const { return bytes_; }
  /// Byte offset of the float scales (row-scaled codecs; equals the payload size otherwise).
  std::size_t scales_offset() const { return scales_offset_; }
  std::size_t total_rows() const { return rows_; }
  std::size_t total_elements() const { return total_; }
  std::size_t num_tensors() const { return tensors_.size(); }
  const CodecTensor& tensor(std::size_t r) const {
    if (r >= tensors_.size())
      throw Error(std::string("codec ") + C::name + ": tensor index " + std::to_string(r) +
                  " out of range (" + std::to_string(tensors_.size()) + " tensors)");
    return tensors_[r];
  }
  const std::vector<CodecTensor>& tensors() const { return tensors_; }

  /// Encodes tensor r from `values` (numel floats). `random_words` is empty (round to nearest)
  /// or numel words (stochastic rounding with the low 16 bits of word j for element j).
  void encode(std::size_t r, std::span<const float> values, std::span<const std::uint32_t> random_words,
              std::span<unsigned char> block) const {
    const CodecTensor& t = tensor(r);
    check_block(block.size(), "encode");
    if (values.size() != t.numel)
      throw Error(std::string("codec ") + C::name + ": encode of tensor " + std::to_string(r) + " got " +
                  std::to_string(values.size()) + " values, expected " + std::to_string(t.numel));
    if (!random_words.empty() && random_words.size() != t.numel)
      throw Error(std::string("codec ") + C::name + ": encode of tensor " + std::to_string(r) + " got " +
                  std::to_string(random_words.size()) + " random words, expected 0 or " +
                  std::to_string(t.numel));
    encode_part(r, 0, t.numel, values.data(), random_words.empty() ? nullptr : random_words.data(), block);
  }

  /// Decodes tensor r into `out` (numel floats).
  void decode(std::size_t r, std::span<const unsigned char> block, std::span<float> out) const {
    const CodecTensor& t = tensor(r);
    check_block(block.size(), "decode");
    if (out.size() != t.numel)
      throw Error(std::string("codec ") + C::name + ": decode of tensor " + std::to_string(r) + " into " +
                  std::to_string(out.size()) + " floats, expected " + std::to_string(t.numel));
    decode_part(r, 0, t.numel, block, out.data());
  }

  /// Whole group from / to a float flat buffer laid out by the same ParamLayout (round to
  /// nearest: this is how initial weights enter and checkpoints leave). Padding encodes as 0.
  /// A large group is spread over all cores in pieces of whole rows (the same bytes as one
  /// core's: each element and each row's scale depends on its row alone).
  void encode_group(std::span<const float> flat, std::span<unsigned char> block) const {
    check_flat(flat.size(), "encode_group");
    check_block(block.size(), "encode_group");
    parallel_fill(block, 0);
    const std::vector<Piece> pieces = group_pieces();
    parallel_for(
        pieces.size(),
        [&](std::size_t i) {
          const Piece& p = pieces[i];
          encode_part(p.item, p.begin, p.end, flat.data() + tensors_[p.item].offset, nullptr, block);
        },
        threads_for(total_));
  }
  void decode_group(std::span<const unsigned char> block, std::span<float> flat) const {
    check_flat(flat.size(), "decode_group");
    check_block(block.size(), "decode_group");
    std::fill(flat.begin(), flat.end(), 0.0f);
    const std::vector<Piece> pieces = group_pieces();
    parallel_for(
        pieces.size(),
        [&](std::size_t i) {
          const Piece& p = pieces[i];
          decode_part(p.item, p.begin, p.end, block, flat.data() + tensors_[p.item].offset);
        },
        threads_for(total_));
  }

 private:
  /// Elements [begin, end) of tensor r (whole rows for row-scaled codecs) from values[begin..end)
  /// (values and random_words index the tensor; random_words null: round to nearest).
  void encode_part(std::size_t r, std::size_t begin, std::size_t end, const float* values,
                   const std::uint32_t* random_words, std::span<unsigned char> block) const {
    const CodecTensor& t = tensors_[r];
    const bool stochastic = random_words != nullptr;
    unsigned char* payload = block.data() + t.offset * C::element_bytes;
    if constexpr (C::row_scaled) {
      float* scales = reinterpret_cast<float*>(block.data() + scales_offset_);
      for (std::size_t row = begin / t.row_len; row < end / t.row_len; ++row) {
        const float absmax = finite_absmax(values + row * t.row_len, t.row_len);
        if (std::isnan(absmax))
          throw Error(std::string("codec ") + C::name + ": tensor " + std::to_string(r) + " row " +
                      std::to_string(row) + " holds a non-finite value, which per-row scales cannot encode");
        const float scale = C::scale_for(absmax);
        scales[t.first_row + row] = scale;
        for (std::size_t k = 0; k < t.row_len; ++k) {
          const std::size_t j = row * t.row_len + k;
          C::store(payload, j, values[j], scale, stochastic ? random_words[j] : 0u, stochastic);
        }
      }
    } else {
      for (std::size_t j = begin; j < end; ++j)
        C::store(payload, j, values[j], stochastic ? random_words[j] : 0u, stochastic);
    }
  }
  /// The largest |v| of n values, or NaN when one of them is infinite or NaN. Eight running
  /// maxima and a running sum of v * 0 (NaN exactly when some v is not finite) keep the loop
  /// free of calls and of one long dependency chain; the maximum is exact in any order.
  static float finite_absmax(const float* v, std::size_t n) {
    constexpr std::size_t kLanes = 8;
    float m[kLanes] = {}, zero[kLanes] = {};
    std::size_t k = 0;
    for (; k + kLanes <= n; k += kLanes)
      for (std::size_t l = 0; l < kLanes; ++l) {
        const float a = std::fabs(v[k + l]);
        m[l] = a > m[l] ? a : m[l];
        zero[l] += v[k + l] * 0.0f;
      }
    for (; k < n; ++k) {
      const float a = std::fabs(v[k]);
      m[0] = a > m[0] ? a : m[0];
      zero[0] += v[k] * 0.0f;
    }
    float absmax = 0.0f, finite = 0.0f;
    for (std::size_t l = 0; l < kLanes; ++l) {
      absmax = m[l] > absmax ? m[l] : absmax;
      finite += zero[l];
    }
    return finite == 0.0f ? absmax : std::numeric_limits<float>::quiet_NaN();
  }
  /// Elements [begin, end) of tensor r (whole rows for row-scaled codecs) into out[begin..end).
  void decode_part(std::size_t r, std::size_t begin, std::size_t end, std::span<const unsigned char> block,
                   float* out) const {
    const CodecTensor& t = tensors_[r];
    const unsigned char* payload = block.data() + t.offset * C::element_bytes;
    if constexpr (C::row_scaled) {
      const float* scales = reinterpret_cast<const float*>(block.data() + scales_offset_);
      for (std::size_t row = begin / t.row_len; row < end / t.row_len; ++row)
        for (std::size_t k = 0; k < t.row_len; ++k)
          out[row * t.row_len + k] = C::load(payload, row * t.row_len + k, scales[t.first_row + row]);
    } else {
      for (std::size_t j = begin; j < end; ++j) out[j] = C::load(payload, j);
    }
  }
  /// The group's tensors in pieces of about 2^20 elements (whole rows for row-scaled codecs).
  std::vector<Piece> group_pieces() const {
    return cut_into_pieces(
        tensors_.size(), [&](std::size_t r) { return tensors_[r].numel; },
        [&](std::size_t r) { return C::row_scaled ? tensors_[r].row_len : std::size_t{1}; }, std::size_t{1} << 20);
  }
  static std::size_t round16(std::size_t n) { return (n + 15) / 16 * 16; }
  void check_block(std::size_t size, const char* what) const {
    if (size != bytes_)
      throw Error(std::string("codec ") + C::name + ": " + what + " got a block buffer of " +
                  std::to_string(size) + " bytes, the layout needs " + std::to_string(bytes_));
  }
  void check_flat(std::size_t size, const char* what) const {
    if (size != total_)
      throw Error(std::string("codec ") + C::name + ": " + what + " got " + std::to_string(size) +
                  " floats, the layout has " + std::to_string(total_) + " elements");
  }

  std::vector<CodecTensor> tensors_;
  std::size_t total_ = 0, rows_ = 0, scales_offset_ = 0, bytes_ = 0;
};

}  // namespace zo2::offload
