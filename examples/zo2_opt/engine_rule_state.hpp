// zo2-opt: the rule state and accumulation plumbing both engines share (any policy with
// get_rule_state / set_rule_state, any ZOOptimizer), one parameter group at a time.
#pragma once

#include <span>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#include "engine.hpp"

namespace zo2_opt {

template <class Policy>
concept PolicyWithRuleState = requires(Policy& p, const Policy& cp, std::span<float> out, std::span<const float> in) {
  cp.rule_state_slots();
  cp.get_rule_state(zo2::GroupIndex{0}, out);
  p.set_rule_state(zo2::GroupIndex{0}, in);
};

/// The policy's values per weight of rule state; 0 when the rule (or policy) keeps none.
template <class Policy>
unsigned policy_rule_state_slots(const Policy& policy) {
  if constexpr (PolicyWithRuleState<Policy>)
    return static_cast<unsigned>(policy.rule_state_slots());
  else
    return 0;
}

/// Floats of group g's rule state: slots x the group's flat size.
template <class Policy>
std::size_t policy_rule_state_size(const Policy& policy, zo2::GroupIndex g) {
  return static_cast<std::size_t>(policy_rule_state_slots(policy)) * policy.model_layout().layout(g).total_elements();
}

/// Group g's rule state into `out` (policy_rule_state_size(policy, g) floats).
template <class Policy>
void policy_get_rule_state(const Policy& policy, zo2::GroupIndex g, std::span<float> out) {
  const std::size_t n = policy_rule_state_size(policy, g);
  if (out.size() != n)
    throw zo2::ShapeError("get_rule_state_group: group " + std::to_string(g.value) + " has " + std::to_string(n) +
                          " values of optimizer state, the buffer " + std::to_string(out.size()));
  if constexpr (PolicyWithRuleState<Policy>)
    if (n) policy.get_rule_state(g, out);
}

/// Restores group g's policy_get_rule_state(); its size must match.
template <class Policy>
void policy_set_rule_state(Policy& policy, zo2::GroupIndex g, std::span<const float> in) {
  if constexpr (PolicyWithRuleState<Policy>) {
    const std::size_t n = policy_rule_state_size(policy, g);
    if (in.size() != n)
      throw zo2::Error("the saved optimizer state of group " + std::to_string(g.value) + " has " +
                       std::to_string(in.size()) + " values, this model " + std::to_string(n));
    if (n) policy.set_rule_state(g, in);
  } else {
    (void)policy;
    (void)g;
    (void)in;
    throw zo2::Error("this engine keeps no optimizer state");
  }
}

}  // namespace zo2_opt
