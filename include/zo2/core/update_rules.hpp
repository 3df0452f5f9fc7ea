// zo2/core/update_rules.hpp -- the element rules of the ZO optimizer family, one definition for
// host and device.
//
// An update rule turns the owed direction d of one element (d = sum over the step's queries of
// c_i z_i, c_i the query's coefficient: g_i / q for ZO-SGD) into a new parameter value, with
// kStateSlots values of per-element optimizer state. Every kernel that applies an update takes
// the rule as a template parameter and calls Rule::apply; adding a rule is one type here (and
// its entry in UpdateRuleList) plus its test, not an edit of each kernel.
//
// The rules, with lambda = weight decay on weights only (0 elsewhere) and the decayed direction
// e = d + lambda theta (torch's SGD and Adam add weight decay to the gradient the same way):
//   SgdRule       theta <- theta - lr e                              (MeZO; also zo-sign, zo-cons)
//   MomentumRule  b <- mu b + e,  theta <- theta - lr b              (b starts at 0: b_1 = e)
//   AdamRule      m <- beta1 m + (1 - beta1) e,  v <- beta2 v + (1 - beta2) e^2,
//                 theta <- theta - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps_hat)
//                 (bias corrections bc_k = 1 - beta_k^t, t the count of updates applied; torch's
//                 Adam computes the step in this order)
// Each product, sum, quotient and root rounds on its own (detail::mul_rn and friends), so the
// host and the device compute the same value for the same inputs, and SgdRule with one query
// is exactly zo_element.hpp's updated_value.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <zo2/core/platform.hpp>
#include <zo2/core/zo_element.hpp>

namespace zo2 {

/// Which element rule an update uses (runtime tag of the rule types below).
enum class RuleId : std::uint32_t { kSgd = 0, kMomentum = 1, kAdam = 2 };

/// The scalars of one update, shared by every element (converted to the compute type by apply).
struct RuleCoeffs {
  double lr = 0;            // learning rate of the step (SGD, momentum)
  double wd = 0;            // lambda where the tensor decays, else 0
  double momentum = 0;      // mu (MomentumRule)
  double beta1 = 0, beta2 = 0;
  double adam_eps = 0;      // eps_hat (AdamRule)
  double step_size = 0;     // lr / bc1 (AdamRule)
  double inv_sqrt_bc2 = 0;  // 1 / sqrt(bc2) (AdamRule)
};

namespace detail {
template <class C>
ZO2_HD ZO2_FORCEINLINE C div_rn(C a, C b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fdiv_rn(a, b);
  else return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
template <class C>
ZO2_HD ZO2_FORCEINLINE C sqrt_rn(C a) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fsqrt_rn(a);
  else return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
/// e = d + wd theta.
template <class C>
ZO2_HD ZO2_FORCEINLINE C decayed(C theta, C d, const RuleCoeffs& r) {
  return add_rn(d, mul_rn(static_cast<C>(r.wd), theta));
}
}  // namespace detail

/// MeZO-SGD: theta - lr (d + wd theta).
struct SgdRule {
  static constexpr RuleId id = RuleId::kSgd;
  static constexpr unsigned kStateSlots = 0;
  template <class C>
  ZO2_HD ZO2_FORCEINLINE static C apply(C theta, C d, const RuleCoeffs& r, C* /*state*/) {
    using detail::add_rn;
    using detail::mul_rn;
    return add_rn(theta, -mul_rn(static_cast<C>(r.lr), detail::decayed(theta, d, r)));
  }
};

/// Heavy-ball momentum: state[0] = b.
struct MomentumRule {
  static constexpr RuleId id = RuleId::kMomentum;
  static constexpr unsigned kStateSlots = 1;
  template <class C>
  ZO2_HD ZO2_FORCEINLINE static C apply(C theta, C d, const RuleCoeffs& r, C* state) {
    using detail::add_rn;
    using detail::mul_rn;
    const C b = add_rn(mul_rn(static_cast<C>(r.momentum), state[0]), detail::decayed(theta, d, r));
    state[0] = b;
    return add_rn(theta, -mul_rn(static_cast<C>(r.lr), b));
  }
};

/// Adam with bias correction: state[0] = m, state[1] = v.
struct AdamRule {
  static constexpr RuleId id = RuleId::kAdam;
  static constexpr unsigned kStateSlots = 2;
  template <class C>
  ZO2_HD ZO2_FORCEINLINE static C apply(C theta, C d, const RuleCoeffs& r, C* state) {
    using detail::add_rn;
    using detail::mul_rn;
    const C e = detail::decayed(theta, d, r);
    const C b1 = static_cast<C>(r.beta1), b2 = static_cast<C>(r.beta2);
    const C m = add_rn(mul_rn(b1, state[0]), mul_rn(static_cast<C>(1.0 - r.beta1), e));
    const C v = add_rn(mul_rn(b2, state[1]), mul_rn(mul_rn(static_cast<C>(1.0 - r.beta2), e), e));
    state[0] = m;
    state[1] = v;
    const C denom = add_rn(mul_rn(detail::sqrt_rn(v), static_cast<C>(r.inv_sqrt_bc2)), static_cast<C>(r.adam_eps));
    return add_rn(theta, -mul_rn(static_cast<C>(r.step_size), detail::div_rn(m, denom)));
  }
};

/// The registered rules, for dispatch from a RuleId.
template <class... Rules>
struct RuleList {};
using UpdateRuleList = RuleList<SgdRule, MomentumRule, AdamRule>;

/// A rule type as a value, for generic lambdas: [&]<class Rule>(RuleTag<Rule>) { ... }.
template <class Rule>
struct RuleTag {
  using type = Rule;
};

namespace detail {
template <class Rule, class F>
decltype(auto) call_with_rule(F&& f) {
  if constexpr (std::is_invocable_v<F, RuleTag<Rule>>) return f(RuleTag<Rule>{});
  else return f.template operator()<Rule>();
}
}  // namespace detail

/// Calls f(RuleTag<Rule>{}) (or f.template operator()<Rule>()) for the rule whose id is `id`;
/// returns its result.
template <class F, class First, class... Rest>
decltype(auto) visit_rule(RuleId id, F&& f, RuleList<First, Rest...>) {
  if constexpr (sizeof...(Rest) == 0) {
    return detail::call_with_rule<First>(f);
  } else {
    if (id == First::id) return detail::call_with_rule<First>(f);
    return visit_rule(id, static_cast<F&&>(f), RuleList<Rest...>{});
  }
}
template <class F>
decltype(auto) visit_rule(RuleId id, F&& f) {
  return visit_rule(id, static_cast<F&&>(f), UpdateRuleList{});
}

/// Per-element state values a rule keeps.
inline unsigned rule_state_slots(RuleId id) {
  return visit_rule(id, []<class Rule>(RuleTag<Rule>) { return Rule::kStateSlots; });
}

}  // namespace zo2
