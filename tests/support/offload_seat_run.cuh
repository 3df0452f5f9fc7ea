// A HostOffload engine (lone, or a seat of a shared host master), its dense-tanh model and its
// optimizer on the engine's stream, and every group's decoded parameters: what the shared-master
// GPU tests (test_shared_host_master*.cu) run and compare.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/shared_host_master.cuh>

#include "dense_tanh_stack.hpp"
#include "device_dense_tanh_stack.cuh"

namespace zo2_test {

/// The optimizer settings of the shared-master tests (zo-adam gets a larger step).
inline zo2::ZOConfig seat_test_config(zo2::ZOMethod method, unsigned queries = 1) {
  zo2::ZOConfig cfg;
  cfg.method = method;
  cfg.queries = queries;
  cfg.lr = method == zo2::ZOMethod::kAdam ? 1e-3 : 5e-4;
  cfg.eps = 1e-2;
  cfg.weight_decay = 0.05;
  cfg.momentum = 0.8;
  cfg.seed = 20261207;
  return cfg;
}

template <class Codec>
struct SeatRun {
  using Policy = zo2::gpu::HostOffload<Codec, float>;
  Policy policy;
  DeviceDenseTanhStack model;
  zo2::ZOOptimizer<DeviceDenseTanhStack, Policy> opt;
  /// A lone engine.
  SeatRun(const zo2::ParameterStore<float>& init, const DenseTanhStack<float>& shape, const zo2::ZOConfig& cfg,
          zo2::gpu::OffloadOptions options)
      : policy(init, options), model{shape, policy.stream()}, opt(model, policy, cfg) {}
  /// A seat of a shared host master.
  SeatRun(const zo2::ParameterStore<float>& init, const DenseTanhStack<float>& shape, const zo2::ZOConfig& cfg,
          zo2::gpu::OffloadOptions options, zo2::gpu::SharedSeat<Codec, float> seat)
      : policy(init, options, nullptr, std::move(seat)), model{shape, policy.stream()}, opt(model, policy, cfg) {}
};

/// get_group of every group, concatenated.
template <class Codec>
std::vector<float> params_of(const zo2::gpu::HostOffload<Codec, float>& p) {
  std::vector<float> out;
  const zo2::ModelLayout& ml = p.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    std::vector<float> v(ml.layout(zo2::GroupIndex{g}).total_elements());
    p.get_group(zo2::GroupIndex{g}, v);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

}  // namespace zo2_test
