// zo2/backend/cuda/perturb.cuh -- MeZO's perturbation and update on the device: one launch per
// parameter group, doing exactly what cpu::Perturber does element for element.
//
// Why one launch per group: a group is one flat buffer (param_layout.hpp), so the whole fused
// pass over a transformer block (16 tensors or so) is one kernel, not 16, and the launch cost
// does not grow with the number of tensors. The kernel walks the group in 16-byte vectors of
// the storage type; a small device table of (offset, numel, index, weight-decay flag) tells
// each vector which tensor it belongs to, hence its noise stream and its element index.
//
// Why the results match the CPU: the per-element arithmetic is core/zo_element.hpp's and the
// noise is core/philox.hpp's, the same inline functions the CPU perturber calls. The Philox
// words, hence the stochastic-rounding bits, are bit-identical; z differs from the host's only
// by device libm (logf, sincosf) ulps, and float results by that and FMA contraction. Where the
// noise feeds only 16-bit values (the update of 16-bit storage, 16-bit plus/minus), z comes from
// box_muller_fast below instead (ZO2_CUDA_FAST_NOISE, on by default; 0 restores the precise
// transform): the same words, within ~1.5e-6 r + 3.5e-7 / r of the host's z (r: the pair's radius).
//
// The owed update is any of the family's (optim/step_types.hpp): num_queries terms c_i z_i summed
// in query order, then Rule::apply (core/update_rules.hpp) with Rule::kStateSlots float arrays of
// per-element state. The rule is a template parameter of the kernel, picked at launch from the
// update's RuleId; the SGD kernel of one query is its own instantiation, whose arithmetic is
// exactly updated_value's (SgdRule::apply of d = g z), so the default run is unchanged and the
// multi-query loop and the state arrays compile away from it.
//
// Each thread takes whole 16-byte vectors: 4 elements (one Philox quad) for fp32 storage, 8 (two
// quads) for 16-bit storage, so every Philox call serves 4 elements and no quad is split across
// threads. Tensor offsets are multiples of kTensorAlignment (32), so vectors never straddle two
// tensors; the last vector of a tensor may hang into its padding, and only its in-tensor
// elements are written (the padding of theta, plus and minus is never touched, as on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/optim/step_types.hpp>

/// 1: the 16-bit passes use box_muller_fast and the hardware's float -> bf16 (see
/// fast_noise_for_v below). Verified on an H100 (2026-11-23: every CUDA test passes with it);
/// the bf16 fused pass with an update goes from 0.37 to 0.57 of copy bandwidth
/// (bench/results/h100-perturb-2026-11-23-fast.jsonl). -DZO2_CUDA_FAST_NOISE=0 turns it off.
#ifndef ZO2_CUDA_FAST_NOISE
#define ZO2_CUDA_FAST_NOISE 1
#endif

namespace zo2::gpu {

/// One tensor of a group, as the kernels see it.
struct TensorEntry {
  std::uint64_t offset;        // first element, from the group's start (multiple of kTensorAlignment)
  std::uint64_t numel;         // elements, padding excluded
  std::uint32_t index;         // position in the group: noise stream = first tensor id + index
  std::uint32_t weight_decay;  // 1 where weight decay applies
};

/// A group's optimizer state on the device (momentum, Adam's moments): `slots` arrays of floats,
/// `stride` apart (the group's flat size, padding included), so element e of the group's flat
/// buffer keeps slot k at data[k * stride + e]. Empty for rules without state.
struct DeviceRuleState {
  float* data = nullptr;
  std::size_t stride = 0;
  unsigned slots = 0;
};

/// A group layout's tensor table in device memory. Built once per layout (a model has three:
/// prologue, block, epilogue); the tensor ids are added at launch from the group's first id.
class GroupTable {
 public:
  GroupTable() = default;
  explicit GroupTable(const ParamLayout& layout) : total_(layout.total_elements()) {
    std::vector<TensorEntry> host;
    host.reserve(layout.num_tensors());
    for (std::size_t i = 0; i < layout.num_tensors(); ++i) {
      if (layout.offset(i) % kTensorAlignment != 0)
        throw ShapeError("tensor '" + layout.spec(i).name + "' is not aligned to kTensorAlignment");
      host.push_back(TensorEntry{layout.offset(i), layout.spec(i).numel(), static_cast<std::uint32_t>(i),
                                 layout.spec(i).weight_decay ? 1u : 0u});
    }
    count_ = static_cast<std::uint32_t>(host.size());
    entries_ = DeviceBuffer<TensorEntry>(host.size());
    copy_to_device_blocking(entries_.data(), host.data(), host.size() * sizeof(TensorEntry));
  }

  const TensorEntry* data() const { return entries_.data(); }
  std::uint32_t size() const { return count_; }
  /// Elements of the group's flat buffer, padding included (a multiple of kTensorAlignment).
  std::size_t total_elements() const { return total_; }

 private:
  DeviceBuffer<TensorEntry> entries_;
  std::uint32_t count_ = 0;
  std::size_t total_ = 0;
};

namespace detail {

enum class Op {
  kUpdateAndPerturb,  // theta <- update(theta) if pending; out0 = theta + c z, out1 = theta - c z
  kUpdate,            // theta <- update(theta)
  kPerturbInto,       // out0 = theta + c z
  kPerturbInPlace,    // theta <- theta + c z (round to nearest)
  kConvert,           // out0 = theta
};

struct KernelArgs {
  const TensorEntry* table;
  std::uint32_t num_tensors;
  std::uint32_t first_tensor_id;
  std::uint64_t num_vectors;  // group elements / elements per vector
  std::uint64_t seed;
  std::uint32_t step;         // step of the perturbation z
  std::uint32_t query;        // query of the perturbation z
  std::uint32_t update_step;  // step whose z the update uses
  bool has_update;
  double c;                   // perturbation scale (eps)
  double lr, g, wd;           // the update; wd applies only where the tensor's flag is set
  // The rest of the owed update (zero-initialized KernelArgs: one query of SgdRule, g alone).
  RuleId rule;                // the update's element rule
  std::uint32_t num_queries;  // terms c_i z_i of the update (0 counts as 1: g alone)
  float coeff[kMaxQueries];   // c_i in the compute type (c_0 == float(g))
  double momentum, beta1, beta2, adam_eps, step_size, inv_sqrt_bc2;  // the rule's scalars
  float* state;               // Rule::kStateSlots arrays (DeviceRuleState), or null
  std::uint64_t state_stride;
};

/// Refuses an update that a kernel of one SGD term cannot apply (several queries, another rule).
inline void require_plain_sgd(const PendingUpdate& pending) {
  if (!pending.plain_sgd())
    throw ConfigError("optimizer", "this CUDA pass applies zo-sgd/zo-sign/zo-cons updates of one query only");
}

/// Whether a kernel's argument struct carries the whole owed update (every rule, several
/// queries), named as KernelArgs names it.
template <class Args>
concept CarriesRuleTerms = requires(Args& a) {
  a.rule;
  a.num_queries;
  a.coeff[0];
  a.momentum;
  a.beta1;
  a.beta2;
  a.adam_eps;
  a.step_size;
  a.inv_sqrt_bc2;
};

/// Copies an owed update into a kernel's argument struct (KernelArgs here, the offload engine's
/// RowArgs: they name the fields alike). An Args without the fields of further queries and of
/// the rule (CarriesRuleTerms) takes plain zo-sgd updates only and refuses others.
template <class Args>
void set_owed_update(Args& a, const PendingUpdate& pending) {
  if constexpr (CarriesRuleTerms<Args>) {
    if (pending.num_queries < 1 || pending.num_queries > kMaxQueries)
      throw ConfigError("queries", "an owed update has " + std::to_string(pending.num_queries) +
                                       " queries; 1 to " + std::to_string(kMaxQueries) + " are allowed");
    a.rule = pending.rule;
    a.num_queries = pending.num_queries;
    for (std::uint32_t i = 0; i < pending.num_queries; ++i) a.coeff[i] = static_cast<float>(pending.coeff(i));
    a.momentum = pending.momentum;
    a.beta1 = pending.beta1;
    a.beta2 = pending.beta2;
    a.adam_eps = pending.adam_eps;
    a.step_size = pending.step_size;
    a.inv_sqrt_bc2 = pending.inv_sqrt_bc2;
  } else {
    require_plain_sgd(pending);
  }
  a.has_update = true;
  a.update_step = pending.step;
  a.lr = pending.lr;
  a.g = pending.g;
  a.wd = pending.weight_decay;
}

template <class X>
ZO2_HD ZO2_FORCEINLINE std::uint32_t bits_of(X x) {
  if constexpr (std::is_same_v<X, float>) return zo2::detail::float_bits(x);
  else return x.bits;
}

template <class X>
ZO2_HD ZO2_FORCEINLINE X from_bits(std::uint32_t u) {
  if constexpr (std::is_same_v<X, float>) return zo2::detail::bits_float(u);
  else return X{static_cast<std::uint16_t>(u)};
}

/// A value computed in float, in the model's precision T (round to nearest for 16-bit T).
template <class T, class C>
ZO2_HD ZO2_FORCEINLINE T to_output(C v) {
  if constexpr (is_half_v<T>) return from_float<T>(static_cast<float>(v));
  else return static_cast<T>(v);
}

/// load() and to_output() on the device. fp16 <-> float (and float -> bf16 under
/// ZO2_CUDA_FAST_NOISE) conversions use the hardware's: exact (fp16 -> float) or IEEE
/// round-to-nearest-even (float -> fp16 / bf16), so bit-identical to
/// half_types.hpp's software conversions for every non-NaN value (tests/cuda checks all of them),
/// at a fraction of the instructions. NaN payloads may differ.
template <class X>
__device__ ZO2_FORCEINLINE compute_t<X> load_device(X x) {
  if constexpr (std::is_same_v<X, float16>) return __half2float(__ushort_as_half(x.bits));
  else return load(x);
}
template <class T, class C>
__device__ ZO2_FORCEINLINE T to_output_device(C v) {
  if constexpr (std::is_same_v<T, float16>) return float16{__half_as_ushort(__float2half_rn(static_cast<float>(v)))};
  else if constexpr (std::is_same_v<T, bfloat16> && ZO2_CUDA_FAST_NOISE != 0) return bfloat16{__bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)))};
  else return to_output<T>(v);
}

/// box_muller_fast's special functions are the .ftz forms of the PTX approximations: the plain
/// forms wrap each MUFU op in a test and a rescale for subnormal operands, and no operand here is
/// subnormal (u1 >= 2^-32; y = 0 or >= ~1.7e-7), so the results are those of the plain forms.
__device__ ZO2_FORCEINLINE float lg2_approx_ftz(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ ZO2_FORCEINLINE float sqrt_approx_ftz(float x) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

/// Box-Muller on the special-function unit, for noise that only ever feeds a 16-bit result.
///
/// The words and u1 are exactly box_muller's (core/philox.hpp); log, sqrt, sin and cos are the
/// MUFU approximations (MUFU.LG2, MUFU.SQRT, MUFU.SIN/COS), and the angle 2 pi (u2 - 1/2) is one
/// FFMA of the word (sin.approx wants [-pi, pi); the result is negated back). The precise
/// functions cost about 75 instructions per pair (logf's polynomial, sqrtf's Newton step,
/// sincosf's Cody-Waite reduction with a Payne-Hanek fallback); these cost about 12.
///
/// Accuracy against the host's z (derivation; tests/cuda/test_perturb_kernels.cu measures it):
/// - y = -2 ln u1 = -2 ln 2 log2 u1: lg2.approx's absolute error is about 2^-22, so
///   |y_fast - y| <= ~3.5e-7 absolute (+ float rounding, ~1e-7 relative). The radius r = sqrt(y)
///   is then within ~1e-7 r + 3.5e-7 / r: relatively worst where r is small, i.e. where z is
///   small (P(r < 0.01) = 5e-5, and there |dz| <= ~3.5e-5).
///   (Until 2026-12-02 u1 >= 0.75 took an atanh series instead, exact to ~4e-7 r; on the bf16
///   fused pass the series cost a sixth of the time, 0.76 -> 0.65 ms per OPT-6.7B block on an
///   H200: bench/results/h200-2026-12-02-perturb-variants.jsonl.)
/// - sin/cos: absolute error ~2^-21.4, plus the angle's roundings (<= ~4e-7 rad).
/// So |z_fast - z_host| <= ~1.5e-6 r + 3.5e-7 / r. Against 2^-8 (bf16) or 2^-11 (fp16) of the
/// values this noise reaches (theta +- eps z, theta - lr g z), that is nothing; and each pass
/// uses the same z_fast for a given (step, element) in the perturbation and in the update, so
/// the algorithm is MeZO with these z. Where a float result is written (fp32 storage or
/// outputs) the kernels keep box_muller.
__device__ ZO2_FORCEINLINE void box_muller_fast(std::uint32_t a, std::uint32_t b, float& z0, float& z1) {
  constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32, as box_muller
  constexpr float kTwoPiOver2Pow32 = 1.4629180792671596e-09f;  // 2 pi 2^-32
  constexpr float kPi = 3.14159265358979f;
  const float u1_raw = (static_cast<float>(a) + 1.0f) * kTwoPow32Inv;
  const float u1 = u1_raw < 1.0f ? u1_raw : 1.0f;
  const float r = sqrt_approx_ftz(-1.3862943611198906f * lg2_approx_ftz(u1));  // sqrt(-2 ln u1)
  float sn, cs;
  __sincosf(fmaf(static_cast<float>(b), kTwoPiOver2Pow32, -kPi), &sn, &cs);  // = (-sin, -cos) of 2 pi u2
  z0 = -r * cs;
  z1 = -r * sn;
}

/// The four normals of a quad: box_muller_fast (Fast) or core's normal4.
template <bool Fast>
__device__ ZO2_FORCEINLINE Normal4 noise4(std::uint64_t seed, std::uint32_t step, std::uint32_t tensor,
                                          std::uint64_t quad, std::uint32_t query = 0) {
  if constexpr (Fast) {
    const Philox4x32 w = philox_words(seed, step, tensor, quad, query);
    Normal4 n;
    box_muller_fast(w.v[0], w.v[1], n.z[0], n.z[1]);
    box_muller_fast(w.v[2], w.v[3], n.z[2], n.z[3]);
    return n;
  } else {
    return normal4(seed, step, tensor, quad, query);
  }
}

/// Whether a pass uses box_muller_fast: where its noise is rounded to a 16-bit format before
/// anyone sees it (the update's and the in-place perturbation's when S is 16-bit; plus/minus/into's
/// when T is), and only when ZO2_CUDA_FAST_NOISE is 1, the default (with it, 16-bit outputs also
/// convert through the hardware's float -> bf16): the bf16 fused pass drops from 2560 to 1256
/// SASS instructions; every CUDA test passes with it (H100 2026-11-23, H200 2026-12-01).
template <class X>
inline constexpr bool fast_noise_for_v = ZO2_CUDA_FAST_NOISE != 0 && is_half_v<X>;

/// Loads N values of 2 or 4 bytes from a 16-byte aligned address with 16-byte loads, all issued
/// before any is used.
template <class X, int N>
__device__ ZO2_FORCEINLINE void load_vector(const X* p, X (&out)[N]) {
  constexpr int kChunks = N * static_cast<int>(sizeof(X)) / 16;
  static_assert(kChunks >= 1 && N * sizeof(X) == 16 * kChunks);
  std::uint32_t w[4 * kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
    w[4 * c] = raw.x;
    w[4 * c + 1] = raw.y;
    w[4 * c + 2] = raw.z;
    w[4 * c + 3] = raw.w;
  }
  if constexpr (sizeof(X) == 4) {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = from_bits<X>(w[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = from_bits<X>((w[k / 2] >> (16 * (k % 2))) & 0xffffu);
  }
}

/// Stores N values of 2 or 4 bytes (8 or a multiple of 16 bytes in all) with 8- or 16-byte stores.
template <class X, int N>
__device__ ZO2_FORCEINLINE void store_vector(X* p, const X (&in)[N]) {
  constexpr int kWords = N * static_cast<int>(sizeof(X)) / 4;
  static_assert(kWords == 2 || kWords % 4 == 0);
  std::uint32_t w[kWords];
  if constexpr (sizeof(X) == 4) {
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = bits_of(in[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = bits_of(in[2 * k]) | (bits_of(in[2 * k + 1]) << 16);
  }
  if constexpr (kWords == 2) {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int c = 0; c < kWords / 4; ++c)
      reinterpret_cast<uint4*>(p)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
  }
}

/// Stores in[k] to p[k] for k < valid only (a tensor's last, partial vector).
template <class X, int N>
__device__ ZO2_FORCEINLINE void store_partial(X* p, const X (&in)[N], std::uint64_t valid) {
#pragma unroll
  for (int k = 0; k < N; ++k)
    if (static_cast<std::uint64_t>(k) < valid) p[k] = in[k];
}

template <class X, int N>
__device__ ZO2_FORCEINLINE void store_masked(X* p, const X (&in)[N], std::uint64_t valid) {
  if (valid >= static_cast<std::uint64_t>(N)) store_vector(p, in);
  else store_partial(p, in, valid);
}

/// The perturbation half of a pass over one vector: z of step a.step for quads q0, q0 + 1, ...
template <Op op, class S, class T, int V>
__device__ ZO2_FORCEINLINE void perturb_vector(S* th, T* out0, T* out1, S (&s)[V], const KernelArgs& a,
                                               std::uint32_t id, std::uint64_t q0, std::uint64_t valid) {
  using C = compute_t<S>;
  C tv[V];
  float zn[V];
#pragma unroll
  for (int k = 0; k < V; ++k) tv[k] = load_device(s[k]);
  constexpr bool kFast = op == Op::kPerturbInPlace ? fast_noise_for_v<S> : fast_noise_for_v<T>;
#pragma unroll
  for (int q = 0; q < V / 4; ++q) {
    const Normal4 z = noise4<kFast>(a.seed, a.step, id, q0 + q, a.query);
#pragma unroll
    for (int k = 0; k < 4; ++k) zn[4 * q + k] = z.z[k];
  }
  if constexpr (op == Op::kPerturbInPlace) {
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = store_rounded<S>(perturbed_value<S>(tv[k], zn[k], a.c), 0, false);
    store_masked(th, s, valid);
  } else {
    T plus[V];
#pragma unroll
    for (int k = 0; k < V; ++k) plus[k] = to_output_device<T>(perturbed_value<S>(tv[k], zn[k], a.c));
    store_masked(out0, plus, valid);
    if constexpr (op == Op::kUpdateAndPerturb) {
      if (!out1) return;  // the caller keeps one copy and writes theta - c z later (perturb_into)
      T minus[V];
#pragma unroll
      for (int k = 0; k < V; ++k) minus[k] = to_output_device<T>(perturbed_value<S>(tv[k], zn[k], -a.c));
      store_masked(out1, minus, valid);
    }
  }
}

/// The update half of a pass over one vector (elements s[0, V) of the group's flat vector v):
/// d = sum_i c_i z_i of step a.update_step, then Rule::apply, rounded to S (stochastically for
/// 16-bit S), with Rule::kStateSlots state values per element read from and written back to
/// a.state[slot * a.state_stride + v * V + k]. MultiQuery false: one term, d = g z, the
/// instantiation of the default run (zo-sgd, one query), whose arithmetic is updated_value's.
template <class Rule, bool MultiQuery, class S, int V>
__device__ ZO2_FORCEINLINE void update_vector(S* th, S (&s)[V], const KernelArgs& a, const RuleCoeffs& rc,
                                              std::uint32_t id, std::uint64_t q0, std::uint64_t v,
                                              std::uint64_t valid) {
  using C = compute_t<S>;
  constexpr int Q = V / 4;                   // Philox quads per vector
  constexpr bool kRounds16 = is_half_v<S>;  // stochastic rounding needs its own words
  constexpr unsigned kSlots = Rule::kStateSlots;
  static_assert(MultiQuery || kSlots == 0, "a stateful rule takes the kernel of any number of queries");
  static_assert(std::is_same_v<C, float>, "the device's rule state is float");
  float st[kSlots > 0 ? kSlots : 1][V];
  if constexpr (kSlots > 0) {
#pragma unroll
    for (unsigned k = 0; k < kSlots; ++k) load_vector(a.state + k * a.state_stride + v * V, st[k]);
  }
  Philox4x32 bits{};  // rounding words of quads q and q + 1, q even
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    C d[4];
    if constexpr (MultiQuery) {
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = C(0);
      for (std::uint32_t i = 0; i < a.num_queries; ++i) {  // in query order, as the CPU sums
        const Normal4 z = noise4<fast_noise_for_v<S>>(a.seed, a.update_step, id, q0 + q, i);
        const C c = a.coeff[i];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const C term = zo2::detail::mul_rn(c, static_cast<C>(z.z[k]));
          d[k] = i == 0 ? term : zo2::detail::add_rn(d[k], term);
        }
      }
    } else {
      const Normal4 z = noise4<fast_noise_for_v<S>>(a.seed, a.update_step, id, q0 + q);
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = zo2::detail::mul_rn(static_cast<C>(a.g), static_cast<C>(z.z[k]));
    }
    // One rounding call per 8 elements (core/philox.hpp); q0 is even here (V >= 8 elements).
    if constexpr (kRounds16)
      if (q % 2 == 0) bits = rounding_words(a.seed, a.update_step, id, (q0 + q) / 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      C e[kSlots > 0 ? kSlots : 1];
      if constexpr (kSlots > 0) {
#pragma unroll
        for (unsigned r = 0; r < kSlots; ++r) e[r] = st[r][4 * q + k];
      }
      s[4 * q + k] = store_rounded<S>(Rule::apply(load_device(s[4 * q + k]), d[k], rc, e),
                                      kRounds16 ? rounding_bits(bits, 4 * (q % 2) + k) : 0u, true);
      if constexpr (kSlots > 0) {
#pragma unroll
        for (unsigned r = 0; r < kSlots; ++r) st[r][4 * q + k] = e[r];
      }
    }
  }
  store_masked(th, s, valid);
  if constexpr (kSlots > 0) {
#pragma unroll
    for (unsigned k = 0; k < kSlots; ++k) store_masked(a.state + k * a.state_stride + v * V, st[k], valid);
  }
}

/// One pass of `op` over a group. theta, out0, out1 point at the group's first element and are
/// 16-byte aligned. Grid-stride over vectors of Chunks x 16 bytes of S; a thread's vectors
/// increase, so its tensor index only moves forward. V divides kTensorAlignment, so a vector
/// never straddles two tensors. Rule and MultiQuery choose the update (update_vector); passes
/// without an update take the defaults.
template <Op op, class S, class T, int Chunks, int MinBlocks, class Rule = SgdRule, bool MultiQuery = false>
__global__ void __launch_bounds__(256, MinBlocks) group_kernel(S* __restrict__ theta, T* __restrict__ out0,
                                                    T* __restrict__ out1, KernelArgs a) {
  constexpr int V = Chunks * 16 / static_cast<int>(sizeof(S));  // elements per vector
  static_assert(kTensorAlignment % V == 0);
  static_assert(!is_half_v<S> || V % 8 == 0, "a vector of 16-bit storage covers whole rounding octets");

  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  std::uint64_t v = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= a.num_vectors) return;

  // The tensor holding vector v: [begin, next_begin) in vectors (padding included).
  std::uint32_t t = 0;
  TensorEntry e = a.table[0];
  std::uint64_t next_begin = a.num_tensors > 1 ? a.table[1].offset / V : a.num_vectors;
  RuleCoeffs rc;
  rc.lr = a.lr;
  rc.wd = e.weight_decay ? a.wd : 0.0;
  rc.momentum = a.momentum;
  rc.beta1 = a.beta1;
  rc.beta2 = a.beta2;
  rc.adam_eps = a.adam_eps;
  rc.step_size = a.step_size;
  rc.inv_sqrt_bc2 = a.inv_sqrt_bc2;

  for (; v < a.num_vectors; v += stride) {
    if (v >= next_begin) {
      do {
        ++t;
        next_begin = t + 1 < a.num_tensors ? a.table[t + 1].offset / V : a.num_vectors;
      } while (v >= next_begin);
      e = a.table[t];
      rc.wd = e.weight_decay ? a.wd : 0.0;
    }
    const std::uint64_t j0 = v * V - e.offset;  // element index within the tensor
    if (j0 >= e.numel) continue;                // all padding
    const std::uint64_t valid = e.numel - j0;   // >= V: a whole vector
    const std::uint32_t id = a.first_tensor_id + e.index;
    const std::uint64_t q0 = j0 / 4;
    S* th = theta + v * V;

    S s[V];
    load_vector(th, s);

    if constexpr (op == Op::kConvert) {
      T o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = to_output_device<T>(load_device(s[k]));
      store_masked(out0 + v * V, o, valid);
    } else {
      if (op == Op::kUpdate || (op == Op::kUpdateAndPerturb && a.has_update))
        update_vector<Rule, MultiQuery>(th, s, a, rc, id, q0, v, valid);
      if constexpr (op != Op::kUpdate) perturb_vector<op, S, T>(th, out0 + v * V, out1 ? out1 + v * V : nullptr, s, a, id, q0, valid);
    }
  }
}

template <class S>
constexpr void check_storage_type() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, bfloat16> || std::is_same_v<S, float16>,
                "CUDA perturb kernels support float, zo2::bfloat16 and zo2::float16 storage");
}
template <class T>
constexpr void check_output_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>,
                "CUDA perturb kernels write float, zo2::bfloat16 or zo2::float16");
}

inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0)
    throw Error(std::string("CUDA perturb: ") + what + " is not 16-byte aligned");
}

/// Blocks that fill the device kGridWaves times over (the grid-stride loop does the rest), per
/// kernel, per device. Four waves rather than one: blocks that finish early (their share crosses
/// padding or a tensor end) hand their SM to a waiting block; 3-5% faster on the 16-bit fused
/// pass on an H200 (bench/results/h200-2026-12-02-perturb-variants.jsonl).
inline constexpr unsigned kGridWaves = 4;
template <Op op, class S, class T, int Chunks, int MinBlocks, class Rule = SgdRule, bool MultiQuery = false>
unsigned grid_for(std::uint64_t num_vectors, int threads) {
  static thread_local int cached_device = -1;
  static thread_local unsigned cached_blocks = 0;
  int device = 0;
  ZO2_CUDA_CHECK(cudaGetDevice(&device));
  if (device != cached_device) {
    int sms = 0, per_sm = 0;
    ZO2_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    ZO2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, group_kernel<op, S, T, Chunks, MinBlocks, Rule, MultiQuery>, threads, 0));
    cached_blocks = static_cast<unsigned>(sms * (per_sm > 0 ? per_sm : 1)) * kGridWaves;
    cached_device = device;
  }
  const std::uint64_t needed = (num_vectors + threads - 1) / threads;
  return static_cast<unsigned>(needed < cached_blocks ? needed : cached_blocks);
}

/// 16-byte chunks of S a thread takes per iteration, and the blocks of 256 threads per SM the
/// register allocation must allow (__launch_bounds__); bench/perturb_bandwidth.cu measures both.
inline constexpr int kDefaultChunks = 1;
inline constexpr int kDefaultMinBlocks = 1;

template <Op op, class S, class T, int Chunks, int MinBlocks, class Rule, bool MultiQuery>
void launch_kernel(S* theta, T* out0, T* out1, const KernelArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const unsigned blocks = grid_for<op, S, T, Chunks, MinBlocks, Rule, MultiQuery>(a.num_vectors, kThreads);
  group_kernel<op, S, T, Chunks, MinBlocks, Rule, MultiQuery><<<blocks, kThreads, 0, stream>>>(theta, out0, out1, a);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::group_kernel");
}

/// Launches `op` over a group. A pass that applies an update picks the kernel of a.rule (and of
/// several queries where a.num_queries > 1 or the rule keeps state); a.state must then hold the
/// rule's state arrays (set_rule_state below).
template <Op op, class S, class T, int Chunks = kDefaultChunks, int MinBlocks = kDefaultMinBlocks>
void launch(S* theta, T* out0, T* out1, const GroupTable& table, KernelArgs a, cudaStream_t stream) {
  check_storage_type<S>();
  check_output_type<T>();
  constexpr std::size_t V = Chunks * 16 / sizeof(S);
  if (table.size() == 0 || table.total_elements() == 0) return;
  check_aligned(theta, "theta");
  if (out0) check_aligned(out0, "the output buffer");
  if (out1) check_aligned(out1, "the minus buffer");
  a.table = table.data();
  a.num_tensors = table.size();
  a.num_vectors = table.total_elements() / V;
  if constexpr (op == Op::kUpdate || op == Op::kUpdateAndPerturb) {
    if (op == Op::kUpdate || a.has_update) {
      if (a.num_queries > kMaxQueries)
        throw ConfigError("queries", "an owed update has " + std::to_string(a.num_queries) + " queries; at most " +
                                         std::to_string(kMaxQueries) + " are allowed");
      visit_rule(a.rule, [&]<class Rule>() {
        if constexpr (Rule::kStateSlots > 0) {
          if (!a.state) throw ConfigError("optimizer", "the CUDA pass holds no state for this update rule (reserve_rule_state)");
          check_aligned(a.state, "the rule state");
          if (a.state_stride < table.total_elements() || a.state_stride % 4 != 0)
            throw Error("CUDA perturb: the rule state's stride " + std::to_string(a.state_stride) +
                        " is not a multiple of 4 of at least the group's " + std::to_string(table.total_elements()) +
                        " elements");
        }
        if constexpr (std::is_same_v<Rule, SgdRule>) {
          if (a.num_queries <= 1) {
            launch_kernel<op, S, T, Chunks, MinBlocks, SgdRule, false>(theta, out0, out1, a, stream);
            return;
          }
        }
        launch_kernel<op, S, T, Chunks, MinBlocks, Rule, true>(theta, out0, out1, a, stream);
      });
      return;
    }
  }
  launch_kernel<op, S, T, Chunks, MinBlocks, SgdRule, false>(theta, out0, out1, a, stream);
}

/// Points a kernel's arguments at a group's rule state; refuses one with fewer slots than
/// `rule` keeps.
inline void set_rule_state(KernelArgs& a, RuleId rule, const DeviceRuleState& state) {
  const unsigned needed = rule_state_slots(rule);
  if (needed == 0) return;
  if (!state.data || state.slots < needed)
    throw ConfigError("optimizer", "the CUDA pass holds no state for this update rule (reserve_rule_state)");
  a.state = state.data;
  a.state_stride = state.stride;
}

}  // namespace detail

/// The fused pass of the lazy update over one group (cpu::Perturber::update_and_perturb_into on
/// every tensor): if `pending`, theta <- Rule::apply(theta, sum_i c_i z_i) with pending's rule,
/// coefficients and `state` (the group's DeviceRuleState; none for SgdRule), rounded to S
/// (stochastically for 16-bit S) -- for zo-sgd with one query, theta - lr (g z_prev + wd theta);
/// then plus = theta + eps z_now and minus = theta - eps z_now, converted to T (minus may be
/// null: perturb_into with c = -eps writes the same values later). z_i is the noise of
/// pending->step and query i, z_now that of `step` and `query`; tensor ids are
/// first_tensor_id + index in the group. Asynchronous on `stream`.
template <class S, class T>
void update_and_perturb(S* theta, T* plus, T* minus, const GroupTable& table,
                        std::uint32_t first_tensor_id, std::uint64_t seed, std::uint32_t step,
                        double eps, const PendingUpdate* pending, cudaStream_t stream,
                        const DeviceRuleState& state = {}, std::uint32_t query = 0) {
  detail::KernelArgs a{};
  a.first_tensor_id = first_tensor_id;
  a.seed = seed;
  a.step = step;
  a.query = query;
  a.c = eps;
  if (pending) {
    detail::set_owed_update(a, *pending);
    detail::set_rule_state(a, pending->rule, state);
  }
  detail::launch<detail::Op::kUpdateAndPerturb>(theta, plus, minus, table, a, stream);
}

/// The same, taking the step's noise as the optimizer hands it to a policy (the perturbation
/// draws z of noise.query).
template <class S, class T>
void update_and_perturb(S* theta, T* plus, T* minus, const GroupTable& table,
                        std::uint32_t first_tensor_id, const StepNoise& noise, cudaStream_t stream,
                        const DeviceRuleState& state = {}) {
  update_and_perturb(theta, plus, minus, table, first_tensor_id, noise.seed, noise.step, noise.eps,
                     noise.pending, stream, state, noise.query);
}

/// The update alone (cpu::Perturber::apply<Rule> on every tensor of the group).
template <class S>
void update(S* theta, const GroupTable& table, std::uint32_t first_tensor_id, std::uint64_t seed,
            const PendingUpdate& pending, cudaStream_t stream, const DeviceRuleState& state = {}) {
  detail::KernelArgs a{};
  a.first_tensor_id = first_tensor_id;
  a.seed = seed;
  detail::set_owed_update(a, pending);
  detail::set_rule_state(a, pending.rule, state);
  detail::launch<detail::Op::kUpdate, S, S>(theta, nullptr, nullptr, table, a, stream);
}

/// dst = theta + c z (cpu::Perturber::add_scaled_noise_into), converted to T; z of `query`.
template <class S, class T>
void perturb_into(T* dst, const S* theta, const GroupTable& table, std::uint32_t first_tensor_id,
                  std::uint64_t seed, std::uint32_t step, double c, cudaStream_t stream, std::uint32_t query = 0) {
  detail::KernelArgs a{};
  a.first_tensor_id = first_tensor_id;
  a.seed = seed;
  a.step = step;
  a.query = query;
  a.c = c;
  detail::launch<detail::Op::kPerturbInto, S, T>(const_cast<S*>(theta), dst, nullptr, table, a, stream);
}

/// theta += c z in place, rounded to nearest (cpu::Perturber::add_scaled_noise).
template <class S>
void perturb_in_place(S* theta, const GroupTable& table, std::uint32_t first_tensor_id,
                      std::uint64_t seed, std::uint32_t step, double c, cudaStream_t stream) {
  detail::KernelArgs a{};
  a.first_tensor_id = first_tensor_id;
  a.seed = seed;
  a.step = step;
  a.c = c;
  detail::launch<detail::Op::kPerturbInPlace, S, S>(theta, nullptr, nullptr, table, a, stream);
}

/// dst = theta converted to T (no noise): the current parameters in the model's precision.
template <class S, class T>
void convert(T* dst, const S* theta, const GroupTable& table, cudaStream_t stream) {
  detail::KernelArgs a{};
  detail::launch<detail::Op::kConvert, S, T>(const_cast<S*>(theta), dst, nullptr, table, a, stream);
}

}  // namespace zo2::gpu
