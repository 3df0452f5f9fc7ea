// HostOffload with the rule state in bf16 (OffloadOptions::rule_state_bf16), zo-mmt and zo-adam:
// - the plan holds half the state bytes (host, device, per slot);
// - every stored state value is a bf16 value, and streamed, partly resident and all resident
//   runs give the same bits (the state is rounded wherever it rests, slot or resident buffer);
// - a run resumes bit-exactly through get_rule_state / set_rule_state;
// - the parameters follow the fp32-state run closely (the rule computes in fp32; only the stored
//   state is rounded), and the loss falls as there.
// The layer stack is tests/support's device twin of DenseTanhStack (deterministic kernels).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>

#include "../support/dense_tanh_stack.hpp"
#include "../support/offload_snapshot.hpp"
#include "../support/device_dense_tanh_stack.cuh"

using namespace zo2;
using zo2::gpu::HostOffload;
using zo2::gpu::OffloadOptions;
using zo2_test::DenseTanhStack;
using zo2_test::encoded_of;
using zo2_test::state_of;
using zo2_test::DeviceDenseTanhStack;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_offload_state_bf16)\n");
  return ok;
}();

DenseTanhStack<float> test_shape() {
  DenseTanhStack<float> s;
  s.d_in = 6;
  s.width = 24;
  s.blocks = 6;
  return s;
}

ZOConfig config(ZOMethod method) {
  ZOConfig cfg;
  cfg.method = method;
  cfg.queries = method == ZOMethod::kAdam ? 2 : 1;
  cfg.lr = method == ZOMethod::kAdam ? 1e-3 : 5e-4;
  cfg.eps = 1e-2;
  cfg.weight_decay = 0.05;
  cfg.momentum = 0.9;
  cfg.seed = 20261208;
  return cfg;
}

unsigned slots_of(ZOMethod m) { return m == ZOMethod::kAdam ? 2 : 1; }

template <class Codec>
using Policy = HostOffload<Codec, float>;

template <class Codec>
std::vector<float> theta_of(const Policy<Codec>& p) {
  ParameterStore<float> store(p.model_layout());
  p.store_to(store);
  std::vector<float> out;
  const ModelLayout& ml = store.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const auto v = store.group(GroupIndex{g});
    out.insert(out.end(), v.data(), v.data() + v.layout().total_elements());
  }
  return out;
}

struct Trace {
  std::vector<double> losses;
  std::vector<unsigned char> encoded;
  std::vector<float> state, theta;
};

template <class Codec>
Trace run(const ParameterStore<float>& init, const ZOConfig& cfg, const DeviceDenseTanhStack::Batch& batch,
          int steps, const OffloadOptions& o) {
  Policy<Codec> policy(init, o);
  DeviceDenseTanhStack model{test_shape(), policy.stream()};
  ZOOptimizer<DeviceDenseTanhStack, Policy<Codec>> opt(model, policy, cfg);
  Trace t;
  for (int s = 0; s < steps; ++s) t.losses.push_back(opt.step(batch).loss_plus);
  opt.flush();
  t.encoded = encoded_of(policy);
  t.state = state_of(policy);
  t.theta = theta_of(policy);
  return t;
}

template <class Codec>
void check_codec() {
  const DenseTanhStack<float> shape = test_shape();
  const ModelLayout ml = ModelLayout::of(shape);
  ParameterStore<float> init(ml);
  zo2_test::init_random(init, 53);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 23));
  for (const ZOMethod m : {ZOMethod::kMomentum, ZOMethod::kAdam}) {
    CAPTURE(std::string(method_name(m)));
    const ZOConfig cfg = config(m);
    OffloadOptions f32;
    f32.rule_state_slots = slots_of(m);
    OffloadOptions b16 = f32;
    b16.rule_state_bf16 = true;

    // The plan: half the state.
    const auto pf = Policy<Codec>::plan_for(ml, f32), pb = Policy<Codec>::plan_for(ml, b16);
    CHECK(pb.state_value_bytes == 2);
    CHECK(pb.block_state_bytes * 2 >= pf.block_state_bytes);
    CHECK(pb.block_state_bytes * 2 <= pf.block_state_bytes + 512);
    CHECK(pb.host_state_bytes * 2 <= pf.host_state_bytes + 512 * pb.streamed_blocks);
    CHECK(pb.block_bytes == pf.block_bytes);

    const Trace a = run<Codec>(init, cfg, batch, 8, b16);
    bool nonzero = false;
    std::size_t not_bf16 = 0;
    for (float v : a.state) {
      nonzero = nonzero || v != 0.0f;
      not_bf16 += to_float(to_bfloat16(v)) != v;
    }
    CHECK(nonzero);
    CHECK(not_bf16 == 0);

    // Placements: a third slot and two resident blocks; everything resident.
    OffloadOptions partly = b16;
    partly.gpu_memory_budget = pb.minimum_bytes + 3 * pb.slot_bytes();
    OffloadOptions all = b16;
    all.gpu_memory_budget = std::size_t{1} << 40;
    for (const OffloadOptions& o : {partly, all}) {
      CAPTURE(o.gpu_memory_budget);
      const Trace b = run<Codec>(init, cfg, batch, 8, o);
      CHECK(a.losses == b.losses);
      CHECK(a.encoded == b.encoded);
      CHECK(a.state == b.state);
    }

    // Resume at step 4 into a fresh policy.
    {
      Policy<Codec> first(init, b16);
      DeviceDenseTanhStack model{shape, first.stream()};
      ZOOptimizer<DeviceDenseTanhStack, Policy<Codec>> opt(model, first, cfg);
      for (int s = 0; s < 4; ++s) opt.step(batch);
      opt.flush();
      const OptimizerState saved = opt.state();
      const std::vector<unsigned char> masters = encoded_of(first);
      std::vector<std::vector<float>> states;
      for (std::size_t g = 0; g < ml.num_groups(); ++g) {
        std::vector<float> v(std::size_t{first.rule_state_slots()} * ml.layout(GroupIndex{g}).total_elements());
        first.get_rule_state(GroupIndex{g}, v);
        states.push_back(std::move(v));
      }
      Policy<Codec> resumed(ml, b16);
      std::size_t at = 0;
      for (std::size_t g = 0; g < ml.num_groups(); ++g) {
        const std::size_t n = resumed.group_encoded_bytes(GroupIndex{g});
        resumed.set_group_encoded(GroupIndex{g}, std::span<const unsigned char>(masters).subspan(at, n));
        at += n;
      }
      DeviceDenseTanhStack model_r{shape, resumed.stream()};
      ZOOptimizer<DeviceDenseTanhStack, Policy<Codec>> r(model_r, resumed, cfg);
      for (std::size_t g = 0; g < ml.num_groups(); ++g) resumed.set_rule_state(GroupIndex{g}, states[g]);
      r.restore(saved);
      for (int s = 0; s < 4; ++s) r.step(batch);
      r.flush();
      CHECK(encoded_of(resumed) == a.encoded);
      CHECK(state_of(resumed) == a.state);
    }

    // Against fp32 state: the parameters move alike (mean |difference| a few percent of the
    // mean movement), and the loss falls.
    const Trace f = run<Codec>(init, cfg, batch, 8, f32);
    std::vector<float> theta0;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const auto v = init.group(GroupIndex{g});
      theta0.insert(theta0.end(), v.data(), v.data() + v.layout().total_elements());
    }
    REQUIRE(f.theta.size() == a.theta.size());
    double moved = 0, apart = 0;
    for (std::size_t j = 0; j < f.theta.size(); ++j) {
      moved += std::fabs(static_cast<double>(f.theta[j]) - theta0[j]);
      apart += std::fabs(static_cast<double>(f.theta[j]) - a.theta[j]);
    }
    MESSAGE("bf16 state vs fp32 state: mean |difference| " << apart / f.theta.size() << ", mean movement "
                                                          << moved / f.theta.size());
    CHECK(moved > 0);
    CHECK(apart <= 0.05 * moved);
    CHECK(a.losses.back() < a.losses.front());
  }
}

}  // namespace

TEST_CASE("bf16 rule state: half the bytes, the same bits in every placement, bit-exact resume, fp32-like steps" *
          doctest::skip(!kHaveDevice)) {
  SUBCASE("fp32") { check_codec<offload::Fp32Codec>(); }
  SUBCASE("bf16") { check_codec<offload::Bf16Codec>(); }
  SUBCASE("bf16p") { check_codec<offload::Bf16PackedCodec>(); }
  SUBCASE("int8") { check_codec<offload::Int8RowCodec>(); }
}

TEST_CASE("bf16 rule state: the plan (no device needed)") {
  const ModelLayout ml = ModelLayout::of(test_shape());
  OffloadOptions o;
  o.rule_state_slots = 2;
  const auto f = HostOffload<offload::Bf16Codec, float>::plan_for(ml, o);
  o.rule_state_bf16 = true;
  const auto b = HostOffload<offload::Bf16Codec, float>::plan_for(ml, o);
  CHECK(f.state_value_bytes == 4);
  CHECK(b.state_value_bytes == 2);
  CHECK(b.block_state_bytes < f.block_state_bytes);
  CHECK(b.host_state_bytes < f.host_state_bytes);
  CHECK(b.state_arena_bytes < f.state_arena_bytes);
}
