// zo2/offload/row_kernel.cuh -- the fused update / perturb pass of a row-scaled codec
// (codecs.hpp: Int8RowCodec), one launch per group, as HostOffload runs it on a streamed block.
//
// Why a kernel of its own: a row's scale depends on the whole updated row, so the update can
// only be encoded after a reduction over the row. One CUDA block takes one row (grid-stride over
// rows, blockIdx.y the tensor):
//   1. (owed update only) the row's largest code; when Int8RowCodec::keeps_scale proves from it
//      that the update cannot move the row out of its scale -- nearly every row, every step --
//      the scale stays. Otherwise an exact sweep decodes, applies the update with z of the
//      previous step, takes the absmax and chooses the new scale (Int8RowCodec::rescale).
//   2. decode, apply the update, encode it with stochastic rounding under that scale, decode
//      it again, and write theta + eps z (and theta - eps z) in T.
// So the common row costs about what the 16-bit fused pass costs (two and a half Philox calls
// and two Box-Muller pairs per 4 elements) plus one byte-per-element read for step 1, and gives
// the same bits as always running the exact sweep.
//
// Rows of a multiple of 8 elements (every row of the bundled models) take a vector path: a
// thread owns an octet (two quads) in steps 1 and 2, reads its 8 codes with one load, keeps its
// first octet's codes from step 1 for step 2, and draws one rounding call for both quads (the
// rounding stream is laid out per octet: core/philox.hpp). Other rows take a quad per thread.
// The tensors run longest CUDA block first (RowTable), so a launch does not end on a partial
// wave of an OPT block's fc1 / fc2 blocks, which take 4x a q/k/v/o block's time.
//
// The vector path keeps conversions off the XU pipe (16 lanes an SM, shared with Box-Muller's
// MUFU log/sqrt/sin/cos), which the pass loads about as heavily as it loads instruction issue:
// step 1 takes the row's largest |code| in integers; codes decode through sign-extended ints
// (I2FP on the ALU, not I2F.S8); and the encode is Int8RowCodec::StochasticRowEncoder (one
// reciprocal a row instead of a division an element, the code from the rounded quotient's bits
// instead of F2I, the value from the quotient instead of converting the code back), with
// code() and value() for the rare quad it declines. Same bits (test_codecs.cpp checks the
// encoder against code() and value()); 23 XU instructions a quad, where a division and three
// conversions an element make 40. The default instantiation is held to 40 registers (6 blocks of
// 256 per SM; ptxas would take 46), the family's to 48 (5 blocks).
//
// Noise: z goes through box_muller_fast (backend/cuda/perturb.cuh) under ZO2_CUDA_FAST_NOISE,
// as in the 16-bit passes: the perturbation feeds 16-bit T, the update feeds 8-bit codes, both far
// coarser than fast Box-Muller's error (perturb.cuh). fp32 T keeps the precise transform.
//
// The ZO optimizer family (update_terms.cuh): row_kernel<C, T, Rule, Queries>. The default
// instantiation (SgdRule, one query) is the pass above. With several queries the update is
// d = sum_i c_i z_i per element, and keeps_scale takes sum_i |c_i| for g: the bound still holds,
// since |d| <= sum_i |c_i| |z_i| <= (sum_i |c_i|) kMaxAbsNormal up to the float rounding of the
// q products and q - 1 sums (at most ~q 2^-24 relative to that sum, q <= 16: ~1e-6, inside
// keeps_scale's 1e-5 widening), and SgdRule maps d to theta - lr (d + wd theta), the one-query
// formula with g z replaced by d. A stateful rule (momentum, Adam) moves an element by its
// state, which the codes do not bound: those rows always take the exact sweep, which computes
// the rule on a copy of the state; the encode sweep then computes it again (the same value) and
// writes the state. The perturbation draws z of RowFamilyArgs::query (materialize() of another
// query).
//
// Each element is handled by the thread that owns its Philox quad in every sweep, so in-place
// writes never race reads (the rule state included); the old scale is read by every thread
// before the new one is written (block_max synchronizes).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/update_terms.cuh>

namespace zo2::gpu::offload_detail {

/// One tensor of a group for the row-scaled kernel.
struct RowTensor {
  std::uint64_t offset, numel, rows, row_len, first_row;
  std::uint32_t index, weight_decay;
};

/// A group's row tensors in device memory (its codec's geometry, the tensors' indices and
/// weight-decay flags), and the most rows any of them has: what launch_row_kernel needs.
class RowTable {
 public:
  RowTable() = default;
  template <class C>
  RowTable(const offload::GroupCodec<C>& codec, const ParamLayout& layout) {
    std::vector<RowTensor> host;
    for (std::size_t r = 0; r < codec.num_tensors(); ++r) {
      const auto& t = codec.tensor(r);
      host.push_back({t.offset, t.numel, t.rows, t.row_len, t.first_row, static_cast<std::uint32_t>(r),
                      layout.spec(r).weight_decay ? 1u : 0u});
      if (t.rows > max_rows_) max_rows_ = t.rows;
    }
    // Longest CUDA blocks first (blockIdx.y walks this order): the launch ends on short blocks,
    // not on a last partial wave of the longest (an OPT block's fc1 and fc2 take 4x a q/k/v/o's).
    const std::uint64_t grid_x = launch_rows(max_rows_);
    const auto work = [grid_x](const RowTensor& t) { return (t.rows + grid_x - 1) / grid_x * t.row_len; };
    std::stable_sort(host.begin(), host.end(), [&](const RowTensor& x, const RowTensor& y) { return work(x) > work(y); });
    count_ = static_cast<std::uint32_t>(host.size());
    entries_ = DeviceBuffer<RowTensor>(host.size());
    copy_to_device_blocking(entries_.data(), host.data(), host.size() * sizeof(RowTensor));
  }
  const RowTensor* data() const { return entries_.data(); }
  std::uint32_t size() const { return count_; }
  std::uint64_t max_rows() const { return max_rows_; }
  /// The grid's x extent for a group whose largest tensor has `rows` rows.
  static std::uint64_t launch_rows(std::uint64_t rows) { return rows < 2048 ? (rows > 0 ? rows : 1) : 2048; }

 private:
  DeviceBuffer<RowTensor> entries_;
  std::uint32_t count_ = 0;
  std::uint64_t max_rows_ = 0;
};

struct RowArgs {
  const RowTensor* table;  // set by launch_row_kernel
  std::uint32_t first_tensor_id;
  std::uint64_t seed;
  std::uint32_t step, update_step;
  bool has_update, perturb, convert;
  double eps, lr, g, wd;
};

/// What the family's instantiations (not SgdRule with one query) read besides RowArgs: a
/// parameter of its own, so that the default instantiation's code is the same as without it.
struct RowFamilyArgs {
  std::uint32_t query;  // the perturbation's query
  UpdateTerms terms;    // the update's coefficients, rule scalars and state
};

__device__ ZO2_FORCEINLINE float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float r = shared[0];
  __syncthreads();
  return r;
}

/// Quad q's elements [4q, 4q + 4) of a tensor, as they fall in the row [j0, j1): `whole` when
/// all four do (one 4-byte load or store; tensor offsets are multiples of 32, so it is aligned).
struct QuadSpan {
  std::uint64_t first;
  bool whole;
  __device__ ZO2_FORCEINLINE static QuadSpan of(std::uint64_t q, std::uint64_t j0, std::uint64_t j1) {
    return QuadSpan{4 * q, 4 * q >= j0 && 4 * q + 4 <= j1};
  }
  __device__ ZO2_FORCEINLINE bool has(int k, std::uint64_t j0, std::uint64_t j1) const {
    return whole || (first + k >= j0 && first + k < j1);
  }
};

/// The decoded values of a quad's codes (0 where outside the row).
template <class C>
__device__ ZO2_FORCEINLINE void load_quad(const std::int8_t* codes, QuadSpan s, std::uint64_t j0, std::uint64_t j1,
                                          float scale, float (&out)[4]) {
  if (s.whole) {
    const char4 c = *reinterpret_cast<const char4*>(codes + s.first);
    out[0] = C::value(c.x, scale);
    out[1] = C::value(c.y, scale);
    out[2] = C::value(c.z, scale);
    out[3] = C::value(c.w, scale);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = s.has(k, j0, j1) ? C::value(codes[s.first + k], scale) : 0.0f;
  }
}

template <class T>
__device__ ZO2_FORCEINLINE void store_quad(T* dst, QuadSpan s, std::uint64_t j0, std::uint64_t j1, const float (&v)[4]) {
  T o[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) o[k] = gpu::detail::to_output_device<T>(v[k]);
  if (s.whole) {
    gpu::detail::store_vector(dst + s.first, o);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (s.has(k, j0, j1)) dst[s.first + k] = o[k];
  }
}

/// The updated values of quad q's elements that lie in the row (0 elsewhere) under a family
/// update (not the default one); with Write, their rule state is written back.
template <class Rule, bool Write, bool Fast>
__device__ ZO2_FORCEINLINE void family_update_quad(const RowArgs& a, const RowFamilyArgs& f, const RuleCoeffs& rc, std::uint32_t id,
                                                   std::uint64_t tensor_offset, std::uint64_t q, QuadSpan s,
                                                   std::uint64_t j0, std::uint64_t j1, const float (&th)[4],
                                                   float (&v)[4]) {
  float d[4];
  direction4<Fast>(f.terms, a.seed, a.update_step, id, q, d);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    v[k] = s.has(k, j0, j1) ? apply_rule<Rule, Write>(f.terms, rc, th[k], d[k], tensor_offset + s.first + k) : 0.0f;
}

/// Code k (0..3) of a word of four, sign-extended: converted by __int2float_rn, it takes the
/// ALU's I2FP where an int8 source takes the XU pipe's I2F.S8 (shared with Box-Muller's MUFU).
__device__ ZO2_FORCEINLINE int code_in_word(std::uint32_t word, int k) { return static_cast<int>(word << (24 - 8 * k)) >> 24; }

/// The 8 codes of an aligned octet (one 8-byte load; octets of an aligned row never straddle it).
__device__ ZO2_FORCEINLINE uint2 load_octet(const std::int8_t* codes, std::uint64_t o) {
  return *reinterpret_cast<const uint2*>(codes + 8 * o);
}
template <class C, class T, class Rule = SgdRule, bool Queries = false>
__global__ void __launch_bounds__(256, (is_plain_update_v<Rule, Queries> ? 6 : 5)) row_kernel(unsigned char* __restrict__ block, float* __restrict__ scales,
                                                  T* __restrict__ plus, T* __restrict__ minus, RowArgs a, RowFamilyArgs f) {
  static_assert(C::element_bytes == 1, "row_kernel handles 8-bit codes");
  constexpr bool kPlain = is_plain_update_v<Rule, Queries>;
  constexpr bool kStateful = Rule::kStateSlots > 0;
  __shared__ float reduce[32];
  constexpr bool kFastUpdate = ZO2_CUDA_FAST_NOISE != 0;
  constexpr bool kFastPerturb = gpu::detail::fast_noise_for_v<T>;
  const RowTensor t = a.table[blockIdx.y];
  const std::uint32_t id = a.first_tensor_id + t.index;
  const UpdateCoeffs u{a.lr, a.g, t.weight_decay ? a.wd : 0.0};
  RuleCoeffs rc{};
  std::uint32_t perturb_query = 0;
  if constexpr (!kPlain) {
    rc = tensor_rule(f.terms, t.weight_decay != 0);
    perturb_query = f.query;
  }
  std::int8_t* codes = reinterpret_cast<std::int8_t*>(block) + t.offset;
  T* plus_t = plus + t.offset;
  T* minus_t = minus ? minus + t.offset : nullptr;
  // Rows of a multiple of 8 elements start on an octet (tensor offsets are multiples of 32): their
  // octets are whole, read and written with vector loads and stores.
  const bool aligned = t.row_len % 8 == 0;
  for (std::uint64_t row = blockIdx.x; row < t.rows; row += gridDim.x) {
    const std::uint64_t j0 = row * t.row_len, j1 = j0 + t.row_len;
    const std::uint64_t q_begin = j0 / 4, q_end = (j1 + 3) / 4;
    const std::uint64_t o_begin = j0 / 8, o_end = (j1 + 7) / 8;
    const float old_scale = scales[t.first_row + row];
    float scale = old_scale;
    // The codes of this thread's first octet of the row, kept from the first sweep for the last.
    uint2 first_octet{};
    bool have_first = false;
    if (a.has_update) {
      bool keeps = false;
      if constexpr (!kStateful) {
        float largest = 0.0f;  // the row's largest decoded magnitude
        if (aligned) {
          // the largest |code| times the scale: the largest |value(code, scale)|, since rounding
          // the product is monotonic and odd
          int widest = 0;
          for (std::uint64_t o = o_begin + threadIdx.x; o < o_end; o += blockDim.x) {
            const uint2 w = load_octet(codes, o);
            if (!have_first) {
              first_octet = w;
              have_first = true;
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) widest = max(widest, abs(code_in_word(k < 4 ? w.x : w.y, k % 4)));
          }
          largest = __int2float_rn(widest) * old_scale;
        } else {
          for (std::uint64_t q = q_begin + threadIdx.x; q < q_end; q += blockDim.x) {
            float th[4];
            load_quad<C>(codes, QuadSpan::of(q, j0, j1), j0, j1, old_scale, th);
#pragma unroll
            for (int k = 0; k < 4; ++k) largest = fmaxf(largest, fabsf(th[k]));
          }
        }
        // block_max's __syncthreads also orders every thread's read of old_scale before its write
        if constexpr (kPlain)
          keeps = C::keeps_scale(old_scale, block_max(largest, reduce), u);
        else  // with several queries, g is sum_i |c_i| (see the file comment)
          keeps = C::keeps_scale(old_scale, block_max(largest, reduce), UpdateCoeffs{a.lr, f.terms.coeff_abs_sum, u.wd});
      }
      if (!keeps) {
        float m = 0.0f;
        for (std::uint64_t q = q_begin + threadIdx.x; q < q_end; q += blockDim.x) {
          const QuadSpan s = QuadSpan::of(q, j0, j1);
          float th[4];
          load_quad<C>(codes, s, j0, j1, old_scale, th);
          if constexpr (kPlain) {
            const Normal4 z = gpu::detail::noise4<kFastUpdate>(a.seed, a.update_step, id, q);
#pragma unroll
            for (int k = 0; k < 4; ++k)
              if (s.has(k, j0, j1)) m = fmaxf(m, fabsf(updated_value<float>(th[k], z.z[k], u)));
          } else {
            float v[4];  // the state is left as it is: the encode sweep applies the rule again
            family_update_quad<Rule, false, kFastUpdate>(a, f, rc, id, t.offset, q, s, j0, j1, th, v);
#pragma unroll
            for (int k = 0; k < 4; ++k) m = fmaxf(m, fabsf(v[k]));
          }
        }
        // (also orders the reads of old_scale before the write when the first sweep was skipped)
        scale = C::rescale(old_scale, block_max(m, reduce));
      }
      if (threadIdx.x == 0) scales[t.first_row + row] = scale;
    }
    if (!a.has_update && !a.perturb && !a.convert) continue;
    if (aligned) {
      const typename C::StochasticRowEncoder encoder(scale);
      // The last sweep over whole octets, one per thread: one 8-byte code load (none for the
      // octet kept from the first sweep) and one rounding call for both quads. The quad-wise
      // body repeats the other path's with whole quads: one helper shared by both made ptxas
      // allocate more registers.
      for (std::uint64_t o = o_begin + threadIdx.x; o < o_end; o += blockDim.x) {
        const uint2 w = have_first ? first_octet : load_octet(codes, o);
        have_first = false;
        Philox4x32 bits{};
        if (a.has_update) bits = rounding_words(a.seed, a.update_step, id, o);
#pragma unroll 1
        for (int h = 0; h < 2; ++h) {  // not unrolled: both quads' noise at once costs registers
          const std::uint64_t q = 2 * o + h;
          const std::uint32_t word = h == 0 ? w.x : w.y;
          float th[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) th[k] = __int2float_rn(code_in_word(word, k)) * old_scale;  // C::value
          if (a.has_update) {
            float v[4];
            if constexpr (kPlain) {
              const Normal4 z = gpu::detail::noise4<kFastUpdate>(a.seed, a.update_step, id, q);
#pragma unroll
              for (int k = 0; k < 4; ++k) v[k] = updated_value<float>(th[k], z.z[k], u);
            } else {
              family_update_quad<Rule, true, kFastUpdate>(a, f, rc, id, t.offset, q, QuadSpan{4 * q, true}, j0, j1, th, v);
            }
            // rounding_bits(bits, 4h + k), with selects for h
            const std::uint32_t rw[2] = {h == 0 ? bits.v[0] : bits.v[2], h == 0 ? bits.v[1] : bits.v[3]};
            std::uint32_t rb[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) rb[k] = (rw[k / 2] >> (16 * (k % 2))) & 0xffffu;
            std::int8_t c[4];
            if (encoder.accepts(v[0]) && encoder.accepts(v[1]) && encoder.accepts(v[2]) && encoder.accepts(v[3])) {
#pragma unroll
              for (int k = 0; k < 4; ++k) encoder.encode(v[k], rb[k], c[k], th[k]);
            } else {  // a zero, a row of zeros, ...: the same codes the long way
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                c[k] = C::code(v[k], scale, rb[k], true);
                th[k] = C::value(c[k], scale);
              }
            }
            *reinterpret_cast<char4*>(codes + 4 * q) = make_char4(c[0], c[1], c[2], c[3]);
          }
          if (a.perturb) {
            const Normal4 z = gpu::detail::noise4<kFastPerturb>(a.seed, a.step, id, q, perturb_query);
            float v[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = perturbed_value<float>(th[k], z.z[k], a.eps);
            store_quad(plus_t, QuadSpan{4 * q, true}, j0, j1, v);
            if (minus_t) {
#pragma unroll
              for (int k = 0; k < 4; ++k) v[k] = perturbed_value<float>(th[k], z.z[k], -a.eps);
              store_quad(minus_t, QuadSpan{4 * q, true}, j0, j1, v);
            }
          } else if (a.convert) {
            store_quad(plus_t, QuadSpan{4 * q, true}, j0, j1, th);
          }
        }
      }
    } else {
      for (std::uint64_t q = q_begin + threadIdx.x; q < q_end; q += blockDim.x) {
        const QuadSpan s = QuadSpan::of(q, j0, j1);
        float th[4];
        load_quad<C>(codes, s, j0, j1, old_scale, th);
        if (a.has_update) {
          float v[4];
          if constexpr (kPlain) {
            const Normal4 z = gpu::detail::noise4<kFastUpdate>(a.seed, a.update_step, id, q);
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = updated_value<float>(th[k], z.z[k], u);
          } else {
            family_update_quad<Rule, true, kFastUpdate>(a, f, rc, id, t.offset, q, s, j0, j1, th, v);
          }
          // The octet's words; this thread uses the half of them that is quad q's.
          const Philox4x32 bits = rounding_words(a.seed, a.update_step, id, q / 2);
          std::int8_t c[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            c[k] = C::code(v[k], scale, rounding_bits(bits, static_cast<unsigned>(4 * (q % 2) + k)), true);
            th[k] = C::value(c[k], scale);
          }
          if (s.whole) {
            *reinterpret_cast<char4*>(codes + s.first) = make_char4(c[0], c[1], c[2], c[3]);
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k)
              if (s.has(k, j0, j1)) codes[s.first + k] = c[k];
          }
        }
        if (a.perturb) {
          const Normal4 z = gpu::detail::noise4<kFastPerturb>(a.seed, a.step, id, q, perturb_query);
          float v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) v[k] = perturbed_value<float>(th[k], z.z[k], a.eps);
          store_quad(plus_t, s, j0, j1, v);
          if (minus_t) {
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = perturbed_value<float>(th[k], z.z[k], -a.eps);
            store_quad(minus_t, s, j0, j1, v);
          }
        } else if (a.convert) {
          store_quad(plus_t, s, j0, j1, th);
        }
      }
    }
    __syncthreads();  // the next row's block_max reuses `reduce`
  }
}

/// Launches row_kernel<C, T, Rule, Queries> on one group (a.table is set from `table`). The
/// default instantiation reads a.lr, a.g, a.wd; the others also f.terms and f.query.
template <class C, class T, class Rule = SgdRule, bool Queries = false>
void launch_row_kernel(unsigned char* master, float* scales, T* plus, T* minus, const RowTable& table, RowArgs a,
                       cudaStream_t stream, const RowFamilyArgs& f = {}) {
  static_assert(Rule::kStateSlots == 0 || Queries, "stateful rules use the general (several-query) instantiation");
  if (table.size() == 0) return;
  a.table = table.data();
  const dim3 grid(static_cast<unsigned>(RowTable::launch_rows(table.max_rows())), table.size());
  row_kernel<C, T, Rule, Queries><<<grid, 256, 0, stream>>>(master, scales, plus, minus, a, f);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::row_kernel");
}

}  // namespace zo2::gpu::offload_detail
