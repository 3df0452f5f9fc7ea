// zo2/offload/update_terms.cuh -- an owed update of the ZO optimizer family as the offload
// engine's kernels take it: the per-query coefficients, the rule's scalars, and where the rule's
// per-element state is on the device.
//
// Every offload kernel (row_kernel.cuh, packed_kernel.cuh, plain_kernel.cuh) is a template on
// the update rule and on whether the update has several queries. Their default instantiation
// (SgdRule, one query) reads only the plain fields of its argument struct (lr, g, wd) and is the
// code of MeZO-SGD; the others read UpdateTerms and compute, per element, exactly what
// cpu::Perturber::update_and_perturb_into does (backend/cpu/perturber.hpp):
//   d = sum_i mul_rn(c_i, z_i) in query order (one query: mul_rn(c_0, z_0)), c_i rounded to float,
//   theta <- Rule::apply(theta, d, the rule's scalars, the element's state),
// z_i drawn by the kernel's noise (box_muller_fast where the value ends in 16 bits or fewer).
//
// The state of element j of a group (j: its index in the group's flat buffer, padding included)
// is state[slot * state_stride + j], slot < Rule::kStateSlots, fp32 or (HostOffload's
// rule_state_bf16) bf16 rounded to nearest when stored: the layout of Resident's
// rule_state(g) and of HostOffload's get_rule_state. Only in-tensor elements are read or written
// (padding state stays zero, as on the host), each by the thread that updates the element.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::gpu::offload_detail {

/// What an update of the family adds to plain MeZO-SGD's (lr, g, wd).
struct UpdateTerms {
  float coeff[kMaxQueries];     // c_i as cpu::Perturber rounds them (to float)
  std::uint32_t num_queries;    // 1..kMaxQueries
  RuleCoeffs rule;              // the rule's scalars; wd is lambda, zeroed per tensor without decay
  double coeff_abs_sum;         // sum_i |c_i| of the float c_i (row_kernel.cuh: the scale proof)
  void* state;                  // Rule::kStateSlots arrays of state_stride values; null for none
  std::uint64_t state_stride;   // elements of the group's flat buffer
  bool state_bf16;              // the values are bf16 (rounded to nearest when stored), not fp32
};

/// The terms of `p`, with the rule state of the group at `state` (null when the rule has none).
inline UpdateTerms update_terms(const PendingUpdate& p, void* state, std::uint64_t state_stride,
                                bool state_bf16 = false) {
  if (p.num_queries < 1 || p.num_queries > kMaxQueries)
    throw ConfigError("queries", "an owed update has " + std::to_string(p.num_queries) + " queries, not 1.." +
                                     std::to_string(kMaxQueries));
  UpdateTerms t{};
  t.num_queries = p.num_queries;
  for (std::uint32_t i = 0; i < p.num_queries; ++i) {
    t.coeff[i] = static_cast<float>(p.coeff(i));
    t.coeff_abs_sum += t.coeff[i] < 0.0f ? -static_cast<double>(t.coeff[i]) : static_cast<double>(t.coeff[i]);
  }
  t.rule = p.rule_coeffs(true);
  t.state = state;
  t.state_stride = state_stride;
  t.state_bf16 = state_bf16;
  return t;
}

/// Copies the owed update's plain fields into a kernel's argument struct (RowArgs, PackedArgs,
/// PlainArgs name them alike): all the default instantiation reads. Unlike perturb.cuh's
/// set_owed_update it accepts every update; the caller picks the instantiation.
template <class Args>
void set_plain_update(Args& a, const PendingUpdate& p) {
  a.has_update = true;
  a.update_step = p.step;
  a.lr = p.lr;
  a.g = p.g;
  a.wd = p.weight_decay;
}

/// The rule's scalars for a tensor that does (or does not) take weight decay.
__device__ ZO2_FORCEINLINE RuleCoeffs tensor_rule(const UpdateTerms& u, bool decays) {
  RuleCoeffs r = u.rule;
  if (!decays) r.wd = 0.0;
  return r;
}

/// d of the four elements of Philox quad `quad`: sum_i c_i z_i over the update's queries, each
/// product and sum rounded on its own, in query order.
template <bool Fast>
__device__ ZO2_FORCEINLINE void direction4(const UpdateTerms& u, std::uint64_t seed, std::uint32_t step,
                                           std::uint32_t id, std::uint64_t quad, float (&d)[4]) {
  using zo2::detail::add_rn;
  using zo2::detail::mul_rn;
  {
    const Normal4 z = detail::noise4<Fast>(seed, step, id, quad, 0);
    const float c = u.coeff[0];
#pragma unroll
    for (int k = 0; k < 4; ++k) d[k] = mul_rn(c, z.z[k]);
  }
  for (std::uint32_t i = 1; i < u.num_queries; ++i) {
    const Normal4 z = detail::noise4<Fast>(seed, step, id, quad, i);
    const float c = u.coeff[i];
#pragma unroll
    for (int k = 0; k < 4; ++k) d[k] = add_rn(d[k], mul_rn(c, z.z[k]));
  }
}

/// Rule::apply on group element `index` (value theta, direction d), its state read from u.state
/// and, if Write, written back.
template <class Rule, bool Write>
__device__ ZO2_FORCEINLINE float apply_rule(const UpdateTerms& u, const RuleCoeffs& r, float theta, float d,
                                            std::uint64_t index) {
  if constexpr (Rule::kStateSlots == 0) {
    return Rule::apply(theta, d, r, static_cast<float*>(nullptr));
  } else {
    float s[Rule::kStateSlots];
    float* const f32 = static_cast<float*>(u.state);
    bfloat16* const b16 = static_cast<bfloat16*>(u.state);
#pragma unroll
    for (unsigned k = 0; k < Rule::kStateSlots; ++k) {
      const std::uint64_t at = k * u.state_stride + index;
      s[k] = u.state_bf16 ? to_float(b16[at]) : f32[at];
    }
    const float v = Rule::apply(theta, d, r, s);
    if constexpr (Write) {
#pragma unroll
      for (unsigned k = 0; k < Rule::kStateSlots; ++k) {
        const std::uint64_t at = k * u.state_stride + index;
        if (u.state_bf16) b16[at] = to_bfloat16(s[k]);
        else f32[at] = s[k];
      }
    }
    return v;
  }
}

/// Whether a kernel instantiation is the default one (MeZO-SGD with one query).
template <class Rule, bool Queries>
inline constexpr bool is_plain_update_v = std::is_same_v<Rule, SgdRule> && !Queries;

}  // namespace zo2::gpu::offload_detail
