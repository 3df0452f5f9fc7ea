// zo2-opt: the rule state and accumulation plumbing both engines share (any policy with
// get_rule_state / set_rule_state, any ZOOptimizer).
#pragma once

#include <string>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#include "engine.hpp"

namespace zo2_opt {

/// The policy's rule state, one float vector per group (empty when the rule keeps none).
template <class Policy>
RuleState read_rule_state(Policy& policy) {
  RuleState st;
  if constexpr (requires(const Policy& p, std::span<float> out) {
                  p.rule_state_slots();
                  p.get_rule_state(zo2::GroupIndex{0}, out);
                }) {
    st.slots = policy.rule_state_slots();
    if (st.slots == 0) return st;
    const auto& ml = policy.model_layout();
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      std::vector<float> v(static_cast<std::size_t>(st.slots) * ml.layout(zo2::GroupIndex{g}).total_elements());
      policy.get_rule_state(zo2::GroupIndex{g}, v);
      st.groups.push_back(std::move(v));
    }
  }
  return st;
}

/// Restores read_rule_state()'s result; the slot count and group sizes must match.
template <class Policy>
void write_rule_state(Policy& policy, const RuleState& st) {
  if (st.slots == 0) return;
  if constexpr (requires(Policy& p, std::span<const float> in) {
                  p.rule_state_slots();
                  p.set_rule_state(zo2::GroupIndex{0}, in);
                }) {
    const auto& ml = policy.model_layout();
    if (st.slots != policy.rule_state_slots() || st.groups.size() != ml.num_groups())
      throw zo2::Error("the saved optimizer state has " + std::to_string(st.slots) + " values per weight in " +
                       std::to_string(st.groups.size()) + " groups; this run's optimizer keeps " +
                       std::to_string(policy.rule_state_slots()) + " in " + std::to_string(ml.num_groups()) +
                       " (another --optimizer or model?)");
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const std::size_t n = static_cast<std::size_t>(st.slots) * ml.layout(zo2::GroupIndex{g}).total_elements();
      if (st.groups[g].size() != n)
        throw zo2::Error("the saved optimizer state of group " + std::to_string(g) + " has " +
                         std::to_string(st.groups[g].size()) + " values, this model " + std::to_string(n));
      policy.set_rule_state(zo2::GroupIndex{g}, st.groups[g]);
    }
  } else {
    throw zo2::Error("this engine keeps no optimizer state");
  }
}

}  // namespace zo2_opt
