// Deferred write-back in the offload engine (OffloadOptions::writeback_every, issue 20):
// - K = 2, 3, 4, 8 give K = 1's steps, encoded masters and rule state bit for bit over 12 steps,
//   for every codec (fp32, bf16, fp16, packed bf16 with escapes, int8 rows with sticky scales)
//   and zo-sgd (the default kernels), zo-sgd q=2, zo-sign, zo-cons (a second sweep), zo-mmt,
//   zo-adam q=2 (state) and one-side estimates; two and three slots, blocks partly resident,
//   every streamed block kept in a slot (hits: nothing replayed), accumulation (a second sweep
//   per step);
// - a checkpoint in the middle of a window (get_group_encoded / get_rule_state after flush at
//   step 5 of K = 4) resumes bit-exactly; mid-window, current() and unflushed reads give K = 1's
//   values; set_group_encoded / set_rule_state on lagging blocks;
// - traffic: bytes written back per step drop to 1/K, uploads stay, and the replays are the
//   (K - 1) / 2 per visit the stagger predicts;
// - K changed between steps (set_writeback_every, host copies lagging at the change) gives
//   K = 1's bits; a step recorded in the timeline gives a positive block timing;
// - the plan picks K from a link hint, and refuses a K out of range (no device needed).
// The layer stack is tests/support's device twin of DenseTanhStack: deterministic kernels, so
// equal parameters give equal losses.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>

#include "../support/dense_tanh_stack.hpp"
#include "../support/offload_snapshot.hpp"
#include "../support/offload_test_inputs.hpp"
#include "../support/device_dense_tanh_stack.cuh"

using namespace zo2;
using zo2::gpu::HostOffload;
using zo2::gpu::OffloadOptions;
using zo2_test::DenseTanhStack;
using zo2_test::encoded_of;
using zo2_test::escaped_bf16_store;
using zo2_test::offload_test_shape;
using zo2_test::state_of;
using zo2_test::state_slots_for;
using zo2_test::DeviceDenseTanhStack;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_writeback)\n");
  return ok;
}();

struct Case {
  const char* name;
  ZOMethod method;
  unsigned queries;
  ZOEstimator estimator;
};

const Case kCases[] = {
    {"zo-sgd", ZOMethod::kSgd, 1, ZOEstimator::kTwoSide},
    {"zo-sgd q=2", ZOMethod::kSgd, 2, ZOEstimator::kTwoSide},
    {"zo-sign", ZOMethod::kSign, 1, ZOEstimator::kTwoSide},
    {"zo-cons", ZOMethod::kConservative, 1, ZOEstimator::kTwoSide},
    {"zo-mmt", ZOMethod::kMomentum, 1, ZOEstimator::kTwoSide},
    {"zo-adam q=2", ZOMethod::kAdam, 2, ZOEstimator::kTwoSide},
    {"zo-mmt q=2 one-side", ZOMethod::kMomentum, 2, ZOEstimator::kOneSide},
};

ZOConfig config_for(const Case& c) {
  ZOConfig cfg;
  cfg.method = c.method;
  cfg.queries = c.queries;
  cfg.estimator = c.estimator;
  cfg.lr = c.method == ZOMethod::kAdam ? 1e-3 : 5e-4;  // 5e-3 diverges on this stack within 6 steps
  cfg.eps = 1e-2;
  cfg.weight_decay = c.method == ZOMethod::kConservative ? 0.0 : 0.05;
  cfg.momentum = 0.8;
  cfg.seed = 20261207;
  return cfg;
}

template <class Codec>
using Policy = HostOffload<Codec, float>;

struct Trace {
  std::vector<StepResult> steps;
  std::vector<unsigned char> encoded;
  std::vector<float> state;
  std::size_t replayed = 0;
  bool lagged = false;  // some host copy lagged at some point
};

/// A policy, its model and its optimizer, on the policy's stream.
template <class Codec>
struct Run {
  Policy<Codec> policy;
  DeviceDenseTanhStack model;
  ZOOptimizer<DeviceDenseTanhStack, Policy<Codec>> opt;
  Run(const ParameterStore<float>& init, const DenseTanhStack<float>& shape, const ZOConfig& cfg,
      OffloadOptions options)
      : policy(init, options), model{shape, policy.stream()}, opt(model, policy, cfg) {}
};

OffloadOptions with_every(OffloadOptions o, unsigned k) {
  o.writeback_every = k;
  return o;
}

/// `steps` steps (each over `micro` micro-batches), then flush; the encoded masters and state.
template <class Codec>
Trace run_steps(const ParameterStore<float>& init, const DenseTanhStack<float>& shape, const ZOConfig& cfg,
                const std::vector<DeviceDenseTanhStack::Batch>& micro, int steps, OffloadOptions options) {
  Run<Codec> r(init, shape, cfg, options);
  Trace t;
  for (int s = 0; s < steps; ++s) {
    t.steps.push_back(micro.size() == 1 ? r.opt.step(micro[0])
                                        : r.opt.step_accumulated(std::span<const DeviceDenseTanhStack::Batch>(micro)));
    t.lagged = t.lagged || r.policy.writeback_log().any_lag();
  }
  r.opt.flush();
  CHECK_FALSE(r.policy.writeback_log().any_lag());  // flush wrote every block back
  t.encoded = encoded_of(r.policy);
  t.state = state_of(r.policy);
  t.replayed = r.policy.updates_replayed();
  CHECK(r.policy.escape_overflow() == 0);
  return t;
}

void check_same(const Trace& a, const Trace& b) {
  REQUIRE(a.steps.size() == b.steps.size());
  for (std::size_t s = 0; s < a.steps.size(); ++s) {
    CAPTURE(s);
    REQUIRE(std::isfinite(a.steps[s].loss_plus));  // a diverged run would compare NaN with NaN
    REQUIRE(std::isfinite(a.steps[s].loss_minus));
    CHECK(a.steps[s].loss_plus == b.steps[s].loss_plus);
    CHECK(a.steps[s].loss_minus == b.steps[s].loss_minus);
    CHECK(a.steps[s].projected_grad == b.steps[s].projected_grad);
    CHECK(a.steps[s].skipped == b.steps[s].skipped);
    CHECK(a.steps[s].conservative_choice == b.steps[s].conservative_choice);
  }
  CHECK(a.encoded == b.encoded);
  CHECK(a.state == b.state);
}

/// K = 1 against K = 2, 3, 4, 8 over 12 steps, every rule; placements vary with K.
template <class Codec>
void check_codec() {
  const DenseTanhStack<float> shape = offload_test_shape();
  const auto init = escaped_bf16_store(shape, 61);
  std::vector<DeviceDenseTanhStack::Batch> batch;
  batch.push_back(zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 19)));
  const ModelLayout ml = ModelLayout::of(shape);
  for (const Case& c : kCases) {
    CAPTURE(std::string(c.name));
    const ZOConfig cfg = config_for(c);
    OffloadOptions base;
    base.rule_state_slots = state_slots_for(cfg);
    const auto plan = Policy<Codec>::plan_for(ml, base);
    OffloadOptions three = base;
    three.slots = 3;
    three.prefetch_depth = 2;
    OffloadOptions partly = base;  // a third slot and two resident blocks: six stream
    partly.gpu_memory_budget = plan.minimum_bytes + 3 * plan.slot_bytes();
    const Trace ref = run_steps<Codec>(init, shape, cfg, batch, 12, base);
    CHECK(ref.replayed == 0);
    CHECK_FALSE(ref.lagged);
    struct Variant {
      const char* what;
      OffloadOptions options;
    };
    for (const Variant& v : {Variant{"K=4", with_every(base, 4)}, Variant{"K=2", with_every(base, 2)},
                             Variant{"K=3, 3 slots", with_every(three, 3)},
                             Variant{"K=8, partly resident", with_every(partly, 8)}}) {
      CAPTURE(std::string(v.what));
      const Trace got = run_steps<Codec>(init, shape, cfg, batch, 12, v.options);
      check_same(ref, got);
      CHECK(got.replayed > 0);  // the host copies lagged and were replayed
      CHECK(got.lagged);
    }
  }
  // Accumulation: the second micro-batch's sweep visits every block again with nothing owed,
  // so a block whose write-back was skipped comes back from the host and replays this step's
  // update as well.
  batch.push_back(zo2_test::to_device(zo2_test::make_regression_batch<float>(24, shape.d_in, 23)));
  const ZOConfig adam = config_for(kCases[5]);
  OffloadOptions base;
  base.rule_state_slots = 2;
  check_same(run_steps<Codec>(init, shape, adam, batch, 10, base),
             run_steps<Codec>(init, shape, adam, batch, 10, with_every(base, 4)));
}

}  // namespace

TEST_CASE("write-back every K steps gives K = 1's bits: fp32" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Fp32Codec>();
}
TEST_CASE("write-back every K steps gives K = 1's bits: bf16" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Bf16Codec>();
}
TEST_CASE("write-back every K steps gives K = 1's bits: fp16" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Fp16Codec>();
}
TEST_CASE("write-back every K steps gives K = 1's bits: packed bf16 (escapes)" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Bf16PackedCodec>();
}
TEST_CASE("write-back every K steps gives K = 1's bits: int8 rows (sticky scales)" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Int8RowCodec>();
}

TEST_CASE("every streamed block stays in a slot: the host copies lag, nothing is replayed" *
          doctest::skip(!kHaveDevice)) {
  // Three streamed blocks and four slots: after the first step every visit finds its block in
  // a slot (a budget cannot make this: slots for every streamed block cost more than keeping
  // them resident).
  const DenseTanhStack<float> shape = offload_test_shape(3);
  const auto init = escaped_bf16_store(shape, 67);
  std::vector<DeviceDenseTanhStack::Batch> batch;
  batch.push_back(zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 29)));
  const ZOConfig cfg = config_for(kCases[5]);  // Adam: the state stays in the slot too
  OffloadOptions o;
  o.rule_state_slots = 2;
  o.slots = 4;
  {
    Policy<offload::Bf16PackedCodec> probe(ModelLayout::of(shape), o);
    REQUIRE(probe.streamed_blocks() == 3);
    REQUIRE(probe.plan().slots == 4);
  }
  const Trace ref = run_steps<offload::Bf16PackedCodec>(init, shape, cfg, batch, 10, o);
  const Trace got = run_steps<offload::Bf16PackedCodec>(init, shape, cfg, batch, 10, with_every(o, 4));
  check_same(ref, got);
  CHECK(got.lagged);
  CHECK(got.replayed == 0);  // every visit found its block in its slot
}

namespace {

/// K = 4 against K = 1 in the middle of a window. A checkpoint after flush at step 5 (the
/// encoded masters, the rule state, the optimizer's state) resumed into a fresh K = 4 policy
/// gives ten straight K = 1 steps' bits; later, at step 8, current() of every group and the
/// encoded masters and state read without a flush (the getters bring lagging host copies up to
/// date) are K = 1's; the run then goes on to K = 1's bits at step 10.
template <class Codec>
void check_mid_window(const ZOConfig& cfg) {
  const DenseTanhStack<float> shape = offload_test_shape();
  const auto init = escaped_bf16_store(shape, 71);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 31));
  const ModelLayout ml = ModelLayout::of(shape);
  OffloadOptions o;
  o.rule_state_slots = state_slots_for(cfg);

  Run<Codec> straight(init, shape, cfg, o);  // K = 1, ten steps
  for (int s = 0; s < 10; ++s) straight.opt.step(batch);
  straight.opt.flush();
  const std::vector<unsigned char> want = encoded_of(straight.policy);
  const std::vector<float> want_state = state_of(straight.policy);

  Run<Codec> one(init, shape, cfg, o), four(init, shape, cfg, with_every(o, 4));
  for (int s = 0; s < 5; ++s) {
    const StepResult a = one.opt.step(batch), b = four.opt.step(batch);
    CHECK(a.loss_plus == b.loss_plus);
    CHECK(a.projected_grad == b.projected_grad);
  }
  REQUIRE(four.policy.writeback_log().any_lag());
  one.opt.flush();
  four.opt.flush();
  CHECK_FALSE(four.policy.writeback_log().any_lag());
  const std::vector<unsigned char> saved = encoded_of(four.policy);
  const std::vector<float> saved_state = state_of(four.policy);
  const OptimizerState saved_opt = four.opt.state();
  CHECK(saved == encoded_of(one.policy));
  CHECK(saved_state == state_of(one.policy));

  // Resume into a fresh K = 4 policy: five more steps give the straight run's bits.
  {
    Policy<Codec> resumed(ModelLayout::of(shape), with_every(o, 4));
    std::size_t at = 0, at_state = 0;
    std::vector<std::vector<float>> state_groups;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      const std::size_t n = resumed.group_encoded_bytes(GroupIndex{g});
      resumed.set_group_encoded(GroupIndex{g}, std::span<const unsigned char>(saved).subspan(at, n));
      at += n;
      const std::size_t m = std::size_t{o.rule_state_slots} * ml.layout(GroupIndex{g}).total_elements();
      state_groups.emplace_back(saved_state.begin() + static_cast<std::ptrdiff_t>(at_state),
                                saved_state.begin() + static_cast<std::ptrdiff_t>(at_state + m));
      at_state += m;
    }
    DeviceDenseTanhStack model{shape, resumed.stream()};
    ZOOptimizer<DeviceDenseTanhStack, Policy<Codec>> r(model, resumed, cfg);
    for (std::size_t g = 0; g < ml.num_groups(); ++g) resumed.set_rule_state(GroupIndex{g}, state_groups[g]);
    r.restore(saved_opt);
    for (int s = 0; s < 5; ++s) r.step(batch);
    r.flush();
    CHECK(encoded_of(resumed) == want);
    CHECK(state_of(resumed) == want_state);
  }

  // The interrupted runs go on; at step 8, unflushed, the host copies of K = 4 lag.
  for (int s = 0; s < 3; ++s) CHECK(one.opt.step(batch).loss_minus == four.opt.step(batch).loss_minus);
  REQUIRE(four.policy.writeback_log().any_lag());
  // theta as the model sees it, through current() (a streamed block replays into its slot and
  // is not written back): the owed update is not applied yet, on either.
  const std::size_t lag_before = four.policy.writeback_log().lag(2);
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    CAPTURE(g);
    const std::size_t n = ml.layout(GroupIndex{g}).total_elements();
    std::vector<float> a(n), b(n);
    const auto va = one.policy.current(GroupIndex{g});
    ZO2_CUDA_CHECK(cudaMemcpyAsync(a.data(), va.data(), n * sizeof(float), cudaMemcpyDeviceToHost, one.policy.stream()));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(one.policy.stream()));
    const auto vb = four.policy.current(GroupIndex{g});
    ZO2_CUDA_CHECK(cudaMemcpyAsync(b.data(), vb.data(), n * sizeof(float), cudaMemcpyDeviceToHost, four.policy.stream()));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(four.policy.stream()));
    CHECK(a == b);
  }
  CHECK(four.policy.writeback_log().lag(2) == lag_before);
  // Unflushed reads settle the host copies: the masters before the owed update, as K = 1's.
  CHECK(encoded_of(four.policy) == encoded_of(one.policy));
  CHECK(state_of(four.policy) == state_of(one.policy));
  CHECK_FALSE(four.policy.writeback_log().any_lag());
  for (int s = 0; s < 2; ++s) CHECK(one.opt.step(batch).loss_plus == four.opt.step(batch).loss_plus);
  four.opt.flush();
  CHECK(encoded_of(four.policy) == want);
  CHECK(state_of(four.policy) == want_state);
}

}  // namespace

TEST_CASE("a checkpoint in the middle of a write-back window resumes bit-exactly" * doctest::skip(!kHaveDevice)) {
  SUBCASE("fp32, zo-sgd") { check_mid_window<offload::Fp32Codec>(config_for(kCases[0])); }
  SUBCASE("bf16, zo-adam q=2") { check_mid_window<offload::Bf16Codec>(config_for(kCases[5])); }
  SUBCASE("fp16, zo-mmt") { check_mid_window<offload::Fp16Codec>(config_for(kCases[4])); }
  SUBCASE("bf16p, zo-adam q=2") { check_mid_window<offload::Bf16PackedCodec>(config_for(kCases[5])); }
  SUBCASE("int8, zo-sgd q=2") { check_mid_window<offload::Int8RowCodec>(config_for(kCases[1])); }
}

namespace {

/// Both runs replace a lagging block's master (and its rule state) mid-window; they go on alike.
template <class Codec>
void check_set_mid_window(const ZOConfig& cfg) {
  const DenseTanhStack<float> shape = offload_test_shape();
  const auto init = escaped_bf16_store(shape, 73);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 37));
  const ModelLayout ml = ModelLayout::of(shape);
  OffloadOptions o;
  o.rule_state_slots = state_slots_for(cfg);
  Run<Codec> one(init, shape, cfg, o), four(init, shape, cfg, with_every(o, 4));
  for (int s = 0; s < 3; ++s) {
    one.opt.step(batch);
    four.opt.step(batch);
  }
  // Block 3 (group 4) gets block 0's initial master; block 5's state is scaled.
  REQUIRE(four.policy.writeback_log().any_lag());
  std::vector<unsigned char> bytes(one.policy.group_encoded_bytes(ml.block(0)));
  {
    Policy<Codec> fresh(init, o);
    fresh.get_group_encoded(ml.block(0), bytes);
  }
  one.policy.set_group_encoded(ml.block(3), bytes);
  four.policy.set_group_encoded(ml.block(3), bytes);
  CHECK(four.policy.writeback_log().lag(3) == 0);
  if (o.rule_state_slots) {
    std::vector<float> st(std::size_t{o.rule_state_slots} * ml.layout(ml.block(5)).total_elements());
    one.policy.get_rule_state(ml.block(5), st);
    for (float& v : st) v *= 0.5f;
    one.policy.set_rule_state(ml.block(5), st);
    four.policy.set_rule_state(ml.block(5), st);
  }
  for (int s = 0; s < 5; ++s) CHECK(one.opt.step(batch).loss_plus == four.opt.step(batch).loss_plus);
  one.opt.flush();
  four.opt.flush();
  CHECK(encoded_of(one.policy) == encoded_of(four.policy));
  CHECK(state_of(one.policy) == state_of(four.policy));
}

}  // namespace

TEST_CASE("set_group_encoded and set_rule_state on lagging blocks" * doctest::skip(!kHaveDevice)) {
  SUBCASE("bf16, zo-sgd") { check_set_mid_window<offload::Bf16Codec>(config_for(kCases[0])); }
  SUBCASE("bf16p, zo-adam q=2") { check_set_mid_window<offload::Bf16PackedCodec>(config_for(kCases[5])); }
  SUBCASE("int8, zo-mmt") { check_set_mid_window<offload::Int8RowCodec>(config_for(kCases[4])); }
}

TEST_CASE("bytes written back per step drop to 1/K; uploads stay; replays as the stagger predicts" *
          doctest::skip(!kHaveDevice)) {
  const DenseTanhStack<float> shape = offload_test_shape(8);
  const auto init = escaped_bf16_store(shape, 79);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 41));
  const ModelLayout ml = ModelLayout::of(shape);
  for (const ZOConfig& cfg : {config_for(kCases[0]), config_for(kCases[5])}) {
    CAPTURE(method_name(cfg.method));
    OffloadOptions o;
    o.rule_state_slots = state_slots_for(cfg);
    const auto measure = [&](unsigned k) {
      Run<offload::Bf16Codec> r(init, shape, cfg, with_every(o, k));
      REQUIRE(r.policy.streamed_blocks() == 8);
      REQUIRE(r.policy.writeback_every() == k);
      // Warm-up: the first step owes nothing; then K steps give every block a write-back.
      for (unsigned s = 0; s < 1 + k + 1; ++s) r.opt.step(batch);
      r.policy.synchronize();
      r.policy.reset_traffic();
      const int steps = 8;
      for (int s = 0; s < steps; ++s) r.opt.step(batch);
      r.policy.synchronize();
      struct {
        double up, down, replays;
      } per_step{static_cast<double>(r.policy.bytes_uploaded()) / steps,
                 static_cast<double>(r.policy.bytes_offloaded()) / steps,
                 static_cast<double>(r.policy.updates_replayed()) / steps};
      return per_step;
    };
    const std::size_t moved = Policy<offload::Bf16Codec>(init, o).group_encoded_bytes(ml.block(0)) +
                              std::size_t{o.rule_state_slots} * ml.layout(ml.block(0)).total_elements() * sizeof(float);
    const auto k1 = measure(1);
    CHECK(k1.down == 8.0 * moved);
    CHECK(k1.up == 8.0 * moved);
    CHECK(k1.replays == 0);
    for (unsigned k : {2u, 4u, 8u}) {
      CAPTURE(k);
      const auto got = measure(k);
      MESSAGE("K = " << k << ": " << got.up << " bytes up, " << got.down << " down, " << got.replays
                     << " replays per step");
      CHECK(got.up == k1.up);
      CHECK(got.down == 8.0 * moved / k);  // 8 streamed blocks, 8 / K written back per step
      CHECK(got.replays == 8.0 * (k - 1) / 2);  // lags 0 .. K-1 across each K consecutive blocks
    }
  }
}

namespace {

/// K changed between steps (1 -> 4 -> 2 -> 1 -> 3, the last with host copies lagging when it is
/// changed) against K = 1 throughout; a step recorded in the timeline gives a positive timing.
template <class Codec>
void check_changing_k(const ZOConfig& cfg) {
  const DenseTanhStack<float> shape = offload_test_shape();
  const auto init = escaped_bf16_store(shape, 71);
  std::vector<DeviceDenseTanhStack::Batch> batch;
  batch.push_back(zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 29)));
  OffloadOptions base;
  base.rule_state_slots = state_slots_for(cfg);
  const Trace ref = run_steps<Codec>(init, shape, cfg, batch, 12, base);

  OffloadOptions timed = base;
  timed.record_timeline = true;
  Run<Codec> r(init, shape, cfg, timed);
  Trace got;
  const unsigned schedule[12] = {1, 1, 4, 4, 4, 4, 4, 2, 2, 1, 3, 3};
  bool lagged_at_change = false;
  for (int s = 0; s < 12; ++s) {
    if (s > 0 && schedule[s] != schedule[s - 1]) {
      lagged_at_change = lagged_at_change || r.policy.writeback_log().any_lag();
      r.policy.set_writeback_every(schedule[s]);
      CHECK(r.policy.writeback_every() == schedule[s]);
      CHECK_FALSE(r.policy.writeback_log().any_lag());  // settled before the change
    }
    if (s == 1) r.policy.restart_timeline();
    got.steps.push_back(r.opt.step(batch[0]));
    if (s == 1) {
      r.policy.end_timeline_visit();
      const offload::BlockTiming t = r.policy.block_timing();
      CHECK(t.upload_ms > 0);
      CHECK(t.compute_ms > 0);
      CHECK(t.pass_ms > 0);
      CHECK(t.pass_ms <= t.compute_ms);  // the pass is part of the visit's GPU time
      CHECK(t.period_ms > 0);
      r.policy.timeline().stop();
    }
  }
  CHECK(lagged_at_change);  // the change from K = 4 found host copies lagging
  r.opt.flush();
  got.encoded = encoded_of(r.policy);
  got.state = state_of(r.policy);
  check_same(ref, got);
  CHECK_THROWS_AS(r.policy.set_writeback_every(0), ConfigError);
  CHECK_THROWS_AS(r.policy.set_writeback_every(offload::kMaxWritebackEvery + 1), ConfigError);
}

}  // namespace

TEST_CASE("K changed between steps gives K = 1's bits; a recorded step's block timing" * doctest::skip(!kHaveDevice)) {
  SUBCASE("bf16, zo-sgd") { check_changing_k<offload::Bf16Codec>(config_for(kCases[0])); }
  SUBCASE("int8, zo-mmt") { check_changing_k<offload::Int8RowCodec>(config_for(kCases[4])); }
  SUBCASE("bf16p, zo-adam q=2") { check_changing_k<offload::Bf16PackedCodec>(config_for(kCases[5])); }
}

TEST_CASE("the plan picks K from the link hint and refuses K out of range (no device needed)") {
  using P = Policy<offload::Bf16Codec>;
  const ModelLayout ml = ModelLayout::of(offload_test_shape());
  OffloadOptions o;
  CHECK(P::plan_for(ml, o).writeback_every == 1);  // the default
  o.writeback_every = 0;
  CHECK(P::plan_for(ml, o).writeback_every == 1);  // no link: K = 1
  o.link = {55, 36};
  CHECK(P::plan_for(ml, o).writeback_every == offload::kMaxAutoWritebackEvery);
  o.link = {50, 44};
  CHECK(P::plan_for(ml, o).writeback_every == 3);
  o.link = {52, 51};
  CHECK(P::plan_for(ml, o).writeback_every == 1);
  o.writeback_every = 6;  // an explicit K wins
  CHECK(P::plan_for(ml, o).writeback_every == 6);
  o.gpu_memory_budget = std::size_t{1} << 40;  // all resident: nothing to write back
  CHECK(P::plan_for(ml, o).writeback_every == 1);
  o.gpu_memory_budget = 0;
  o.writeback_every = offload::kMaxWritebackEvery + 1;
  CHECK_THROWS_WITH_AS(P::plan_for(ml, o), doctest::Contains("writeback_every"), ConfigError);
  // Plans are otherwise the same: K moves no byte of device memory.
  OffloadOptions a, b;
  b.writeback_every = 8;
  CHECK(P::plan_for(ml, a).device_bound_bytes == P::plan_for(ml, b).device_bound_bytes);
  CHECK(P::plan_for(ml, a).host_pinned_bytes == P::plan_for(ml, b).host_pinned_bytes);
}
