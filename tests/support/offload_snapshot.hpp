// What an offload policy holds, concatenated over its groups, for tests that compare runs bit
// for bit: every group's master in the codec's format (get_group_encoded) and every group's rule
// state (get_rule_state). Works for any policy with those calls (HostOffload of any codec).
#pragma once

#include <cstddef>
#include <vector>

#include <zo2/optim/parameter_store.hpp>

namespace zo2_test {

/// Every group's master in the codec's format, concatenated.
template <class Policy>
std::vector<unsigned char> encoded_of(const Policy& policy) {
  std::vector<unsigned char> out;
  for (std::size_t g = 0; g < policy.model_layout().num_groups(); ++g) {
    std::vector<unsigned char> v(policy.group_encoded_bytes(zo2::GroupIndex{g}));
    policy.get_group_encoded(zo2::GroupIndex{g}, v);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

/// Every group's rule state, concatenated (empty without state).
template <class Policy>
std::vector<float> state_of(const Policy& policy) {
  std::vector<float> out;
  const zo2::ModelLayout& ml = policy.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    std::vector<float> v(std::size_t{policy.rule_state_slots()} * ml.layout(zo2::GroupIndex{g}).total_elements());
    policy.get_rule_state(zo2::GroupIndex{g}, v);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

}  // namespace zo2_test
