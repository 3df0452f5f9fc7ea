// zo2/core/philox.hpp -- counter-based randomness shared bit-for-bit by host and device.
//
// Why counter-based: MeZO never stores z. Element j of tensor k at step t is regenerated from
// Philox4x32-10(key = seed, counter = (j/4, tensor k, step t)), a pure function, so any block can
// be regenerated in any order on any device, the CPU and CUDA paths see the same 32-bit words,
// and a run resumes bit-exactly from (theta, t, seed) with no RNG state to save.
//
// Counter layout (documented because checkpoints depend on it):
//   c0 = low 32 bits of (j / 4), c1 = bits 32..47 of (j / 4) | query << 16, c2 = stream word,
//   c3 = step t.
//   The stream word is the tensor id for the perturbation z, and tensor id | kRoundingStream
//   for the random bits of stochastic rounding, so the two never share words. The query index
//   (q-query estimates draw q independent z per step) sits in the top half of c1, which no
//   tensor of fewer than 2^50 elements reaches: query 0 draws exactly the words of a build
//   without queries. Rounding bits always come from query 0.
//   key = {low 32 bits of seed, high 32 bits of seed}.
//
// Stochastic rounding takes 16 random bits per element (all that rounding float to bf16 can use:
// it drops 16 mantissa bits; fp16 drops 13, the int8 codec's uniform has 16-bit resolution), so
// one call covers 8 elements: element j takes the low (j even) or high (j odd) half of word
// (j / 2) % 4 of the rounding stream's words at counter j / 8 (rounding_bits below). The fused
// 16-bit pass makes 2.5 Philox calls per quad instead of 3; on an H200 the bf16 pass ran 1.23x
// faster (fewer instructions, and 72 instead of 86 registers: three blocks per SM, not two).
#pragma once

#include <cmath>
#include <cstdint>

#include <zo2/core/platform.hpp>

namespace zo2 {

struct Philox4x32 {
  std::uint32_t v[4];
};

namespace detail {
ZO2_HD ZO2_FORCEINLINE void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                      std::uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // __umulhi and a 32-bit multiply: ptxas fuses them into one IMAD.WIDE.U32. The 64-bit product
  // below compiles on sm_90 to IMAD.WIDE.U32 plus an add of a zero high word per multiply (two
  // wasted instructions per Philox round).
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
#endif
}
}  // namespace detail

/// Philox4x32 with 10 rounds (Salmon et al., SC'11), as Random123 defines it.
ZO2_HD ZO2_FORCEINLINE Philox4x32 philox4x32_10(Philox4x32 ctr, std::uint32_t k0,
                                                std::uint32_t k1) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(M0, ctr.v[0], hi0, lo0);
    detail::mulhilo32(M1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

/// Stream word flag for the random bits of stochastic rounding (see the layout above).
inline constexpr std::uint32_t kRoundingStream = 0x80000000u;

/// Which values this build draws, for checkpoints: a run resumed from a checkpoint written under
/// another scheme continues correctly but does not repeat an uninterrupted run bit for bit.
///   1: rounding bits one 32-bit word per element (counter j / 4); the GPU's fast Box-Muller with
///      an atanh series near u1 = 1.
///   2 (2026-12-02): 16 rounding bits per element (counter j / 8, rounding_bits); fast
///      Box-Muller on MUFU.LG2 alone (backend/cuda/perturb.cuh). z on the host is unchanged.
inline constexpr int kNoiseScheme = 2;

/// Queries a step may draw (the query index has 16 bits of the counter).
inline constexpr std::uint32_t kMaxNoiseQueries = 1u << 16;

/// The four 32-bit words that cover elements [4q, 4q + 4) of one stream at one step and query.
ZO2_HD ZO2_FORCEINLINE Philox4x32 philox_words(std::uint64_t seed, std::uint32_t step,
                                               std::uint32_t stream, std::uint64_t quad,
                                               std::uint32_t query = 0) {
  const Philox4x32 ctr{{static_cast<std::uint32_t>(quad),
                        static_cast<std::uint32_t>(quad >> 32) | (query << 16), stream, step}};
  return philox4x32_10(ctr, static_cast<std::uint32_t>(seed),
                       static_cast<std::uint32_t>(seed >> 32));
}

/// The rounding stream's words for elements [8 * octet, 8 * octet + 8) of `tensor` at `step`.
ZO2_HD ZO2_FORCEINLINE Philox4x32 rounding_words(std::uint64_t seed, std::uint32_t step, std::uint32_t tensor,
                                                 std::uint64_t octet) {
  return philox_words(seed, step, tensor | kRoundingStream, octet);
}

/// The 16 rounding bits (in the low half) of element 8 * octet + k, k < 8, from that octet's words.
ZO2_HD ZO2_FORCEINLINE std::uint32_t rounding_bits(const Philox4x32& words, unsigned k) {
  return (words.v[(k / 2) % 4] >> (16 * (k % 2))) & 0xffffu;
}

/// The rounding bits of element j alone: for tests and scalar code (computes 8 elements' worth).
ZO2_HD inline std::uint32_t rounding_bits_at(std::uint64_t seed, std::uint32_t step, std::uint32_t tensor,
                                             std::uint64_t element) {
  return rounding_bits(rounding_words(seed, step, tensor, element / 8), static_cast<unsigned>(element % 8));
}

/// Box-Muller: two 32-bit words -> two independent N(0,1) floats.
///
/// u1 = (a + 1) * 2^-32 lies in (0, 1], so log(u1) is finite; u2 = b * 2^-32 in [0, 1).
/// The arithmetic is float, the same expression on host and device; host and device libm differ
/// by at most a few ulps in log/sin/cos, which is the only host/device difference in z.
ZO2_HD ZO2_FORCEINLINE void box_muller(std::uint32_t a, std::uint32_t b, float& z0, float& z1) {
  constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32
  constexpr float kTwoPi = 6.283185307179586f;
  const float u1 = (static_cast<float>(a) + 1.0f) * kTwoPow32Inv;
  const float u2 = static_cast<float>(b) * kTwoPow32Inv;
  // float(a) rounds up to 2^32 for a near 2^32-1; clamp so u1 <= 1 and the radius stays real.
  const float r = sqrtf(-2.0f * logf(u1 < 1.0f ? u1 : 1.0f));
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(kTwoPi * u2, &s, &c);
#else
  s = std::sin(kTwoPi * u2);
  c = std::cos(kTwoPi * u2);
#endif
  z0 = r * c;
  z1 = r * s;
}

/// Four normals for elements [4q, 4q + 4) of tensor `tensor` at step `step`.
struct Normal4 {
  float z[4];
};
ZO2_HD ZO2_FORCEINLINE Normal4 normal4(std::uint64_t seed, std::uint32_t step,
                                       std::uint32_t tensor, std::uint64_t quad,
                                       std::uint32_t query = 0) {
  const Philox4x32 w = philox_words(seed, step, tensor, quad, query);
  Normal4 n;
  box_muller(w.v[0], w.v[1], n.z[0], n.z[1]);
  box_muller(w.v[2], w.v[3], n.z[2], n.z[3]);
  return n;
}

/// z for a single element: a convenience for tests and scalar code (wasteful: 3 of 4 unused).
ZO2_HD inline float normal_at(std::uint64_t seed, std::uint32_t step, std::uint32_t tensor,
                              std::uint64_t element, std::uint32_t query = 0) {
  return normal4(seed, step, tensor, element / 4, query).z[element % 4];
}

}  // namespace zo2
