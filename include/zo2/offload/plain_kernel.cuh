// zo2/offload/plain_kernel.cuh -- the fused update / perturb pass of the elementwise codecs
// (Fp32Codec, Bf16Codec, Fp16Codec) for the ZO optimizer family: several queries, stateful
// rules (update_terms.cuh). The default update (MeZO-SGD, one query) and the passes without an
// update keep running backend/cuda/perturb.cuh's group kernel; this one runs only where an
// update of the family is owed, or the perturbation draws another query than 0.
//
// The walk is the group kernel's: a thread takes 16 bytes of S (4 fp32 or 8 16-bit elements,
// whole Philox quads and, for 16-bit S, a whole rounding octet), a small device table tells it
// its tensor. Per element, as cpu::Perturber::update_and_perturb_into: d = sum_i c_i z_i of the
// update step (box_muller_fast for 16-bit S, as the group kernel's update), the rule with the
// element's state, rounded to S (stochastically for 16-bit S with the same rounding bits), then
// theta + eps z and theta - eps z of (step, query) in T (box_muller_fast for 16-bit T). So the
// bf16 codec here and the packed codec (packed_kernel.cuh) give the same bits, and with one
// query and SgdRule this kernel gives the group kernel's bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/half_types.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/offload/update_terms.cuh>

namespace zo2::gpu::offload_detail {

struct PlainArgs {
  const TensorEntry* table;  // set by launch_plain_family
  std::uint32_t num_tensors;
  std::uint32_t first_tensor_id;
  std::uint64_t num_vectors;
  std::uint64_t seed;
  std::uint32_t step, query;  // the perturbation's z
  std::uint32_t update_step;
  bool has_update;
  double eps;
  double lr, g, wd;           // set_plain_update's fields (the terms carry what the kernel reads)
  UpdateTerms terms;
};

/// One pass over a group of S: the owed update of rule Rule (if a.has_update), then, if plus is
/// not null, plus = theta + eps z and minus = theta - eps z (minus may be null).
template <class Rule, class S, class T>
__global__ void __launch_bounds__(256) plain_family_kernel(S* __restrict__ theta, T* __restrict__ plus,
                                                           T* __restrict__ minus, PlainArgs a) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));  // elements per vector
  static_assert(kTensorAlignment % V == 0);
  constexpr int Q = V / 4;
  constexpr bool kRounds16 = is_half_v<S>;
  static_assert(!kRounds16 || V % 8 == 0, "a vector of 16-bit storage covers whole rounding octets");

  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  std::uint64_t v = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= a.num_vectors) return;

  std::uint32_t t = 0;
  TensorEntry e = a.table[0];
  std::uint64_t next_begin = a.num_tensors > 1 ? a.table[1].offset / V : a.num_vectors;
  RuleCoeffs rc = tensor_rule(a.terms, e.weight_decay != 0);

  for (; v < a.num_vectors; v += stride) {
    if (v >= next_begin) {
      do {
        ++t;
        next_begin = t + 1 < a.num_tensors ? a.table[t + 1].offset / V : a.num_vectors;
      } while (v >= next_begin);
      e = a.table[t];
      rc = tensor_rule(a.terms, e.weight_decay != 0);
    }
    const std::uint64_t j0 = v * V - e.offset;  // element index within the tensor
    if (j0 >= e.numel) continue;                // all padding
    const std::uint64_t valid = e.numel - j0;
    const std::uint32_t id = a.first_tensor_id + e.index;
    const std::uint64_t q0 = j0 / 4;
    S* th = theta + v * V;

    S s[V];
    detail::load_vector(th, s);
    if (a.has_update) {
      Philox4x32 bits{};  // rounding words of quads q and q + 1, q even
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        float d[4];
        direction4<detail::fast_noise_for_v<S>>(a.terms, a.seed, a.update_step, id, q0 + q, d);
        if constexpr (kRounds16)
          if (q % 2 == 0) bits = rounding_words(a.seed, a.update_step, id, (q0 + q) / 2);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (static_cast<std::uint64_t>(4 * q + k) >= valid) continue;  // padding (and its state) stays
          const float nv = apply_rule<Rule, true>(a.terms, rc, detail::load_device(s[4 * q + k]), d[k],
                                                  v * V + 4 * q + k);
          s[4 * q + k] = store_rounded<S>(nv, kRounds16 ? rounding_bits(bits, 4 * (q % 2) + k) : 0u, true);
        }
      }
      detail::store_masked(th, s, valid);
    }
    if (!plus) continue;
    using C = compute_t<S>;
    C tv[V];
    float zn[V];
#pragma unroll
    for (int k = 0; k < V; ++k) tv[k] = detail::load_device(s[k]);
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const Normal4 z = detail::noise4<detail::fast_noise_for_v<T>>(a.seed, a.step, id, q0 + q, a.query);
#pragma unroll
      for (int k = 0; k < 4; ++k) zn[4 * q + k] = z.z[k];
    }
    T out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = detail::to_output_device<T>(perturbed_value<S>(tv[k], zn[k], a.eps));
    detail::store_masked(plus + v * V, out, valid);
    if (minus) {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = detail::to_output_device<T>(perturbed_value<S>(tv[k], zn[k], -a.eps));
      detail::store_masked(minus + v * V, out, valid);
    }
  }
}

/// Launches plain_family_kernel over one group (a.table, a.num_tensors, a.num_vectors are set
/// from `table`). theta, plus, minus: the group's first element, 16-byte aligned.
template <class Rule, class S, class T>
void launch_plain_family(S* theta, T* plus, T* minus, const GroupTable& table, PlainArgs a, cudaStream_t stream) {
  detail::check_storage_type<S>();
  detail::check_output_type<T>();
  constexpr std::size_t V = 16 / sizeof(S);
  if (table.size() == 0 || table.total_elements() == 0) return;
  detail::check_aligned(theta, "theta");
  if (plus) detail::check_aligned(plus, "the output buffer");
  if (minus) detail::check_aligned(minus, "the minus buffer");
  a.table = table.data();
  a.num_tensors = table.size();
  a.num_vectors = table.total_elements() / V;
  constexpr int kThreads = 256;
  // Blocks that fill the device a few times over, as perturb.cuh's grid_for (per device).
  static thread_local int cached_device = -1;
  static thread_local unsigned cached_blocks = 0;
  int device = 0;
  ZO2_CUDA_CHECK(cudaGetDevice(&device));
  if (device != cached_device) {
    int sms = 0, per_sm = 0;
    ZO2_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    ZO2_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plain_family_kernel<Rule, S, T>, kThreads, 0));
    cached_blocks = static_cast<unsigned>(sms * (per_sm > 0 ? per_sm : 1)) * detail::kGridWaves;
    cached_device = device;
  }
  const std::uint64_t needed = (a.num_vectors + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(needed < cached_blocks ? needed : cached_blocks);
  plain_family_kernel<Rule, S, T><<<blocks, kThreads, 0, stream>>>(theta, plus, minus, a);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::offload_detail::plain_family_kernel");
}

}  // namespace zo2::gpu::offload_detail
