// Inputs shared by the offload engine's GPU tests (deferred write-back, the shared host master):
// initial parameters that exercise every codec, and the rule state a configuration needs.
#pragma once

#include <cstddef>

#include <zo2/core/config.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/optim/parameter_store.hpp>

#include "dense_tanh_stack.hpp"

namespace zo2_test {

/// The stack these tests run: 1640 values per block, several packed chunks and int8 rows per
/// tensor.
inline DenseTanhStack<float> offload_test_shape(std::size_t blocks = 8) {
  DenseTanhStack<float> s;
  s.d_in = 6;
  s.width = 40;
  s.blocks = blocks;
  return s;
}

/// Initial parameters: bf16 values, with one value in 61 of each block ~2^-17 times what it
/// would be, so the packed codec starts with escapes (fewer than its room of 64 per tensor) and
/// the updates move them out of the lists.
inline zo2::ParameterStore<float> escaped_bf16_store(const DenseTanhStack<float>& shape, unsigned seed) {
  using namespace zo2;
  ParameterStore<bfloat16> b(ModelLayout::of(shape));
  init_random(b, seed);
  ParameterStore<float> out(b.model_layout());
  const ModelLayout& ml = b.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const auto a = b.group(GroupIndex{g});
    auto o = out.group(GroupIndex{g});
    const bool block = g >= 1 && g <= ml.num_blocks();
    for (std::size_t j = 0; j < a.layout().total_elements(); ++j) {
      float v = static_cast<float>(load(a.data()[j]));
      if (block && j % 61 == 3) v = static_cast<float>(load(from_float<bfloat16>(v * 7.6e-6f)));
      o.data()[j] = v;
    }
  }
  return out;
}

/// Per-element rule state values a configuration's rule keeps (zo-adam 2, zo-mmt 1, else 0).
inline unsigned state_slots_for(const zo2::ZOConfig& c) {
  return c.method == zo2::ZOMethod::kAdam ? 2 : c.method == zo2::ZOMethod::kMomentum ? 1 : 0;
}

}  // namespace zo2_test
