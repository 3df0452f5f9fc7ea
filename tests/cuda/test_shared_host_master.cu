// Several offload engines sharing one pinned host master (SharedHostMaster): two seats (three
// in one case) on one GPU, each with its own streams and its own thread running a ZOOptimizer,
// stand in for GPUs of one process.
// - both seats' losses, encoded masters, decoded parameters (get_group after flush) and rule
//   state are bit-identical to a lone HostOffload's over 12 steps: bf16, int8 rows and packed
//   bf16; write-back every 1 and 4 steps; zo-sgd, zo-mmt and zo-adam q=2 (rule state in the
//   shared master); a follower with other slots and prefetch depth; every streamed block kept
//   in a slot (hits), with seat 0 setting a block and a block's state between steps;
// - the masters are pinned once: the seats allocate no pinned memory, the master holds what a
//   lone engine holds; a follower writes nothing back;
// - a follower cannot set a streamed group, nor read one whose host copy lags; the leader
//   cannot set one that lags; a seat with another plan, layout, seat index or rule state count
//   is refused.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <zo2/zo2.hpp>
#include <zo2/offload/host_offload.cuh>
#include <zo2/offload/shared_host_master.cuh>

#include "../support/dense_tanh_stack.hpp"
#include "../support/device_dense_tanh_stack.cuh"
#include "../support/offload_seat_run.cuh"
#include "../support/offload_snapshot.hpp"
#include "../support/offload_test_inputs.hpp"

using namespace zo2;
using zo2::gpu::HostOffload;
using zo2::gpu::OffloadOptions;
using zo2::gpu::SharedHostMaster;
using zo2::gpu::SharedSeat;
using zo2_test::DenseTanhStack;
using zo2_test::DeviceDenseTanhStack;
using zo2_test::encoded_of;
using zo2_test::escaped_bf16_store;
using zo2_test::offload_test_shape;
using zo2_test::params_of;
using zo2_test::state_of;
using zo2_test::state_slots_for;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_shared_host_master)\n");
  return ok;
}();

ZOConfig config_for(ZOMethod method, unsigned queries = 1) { return zo2_test::seat_test_config(method, queries); }

template <class Codec>
using Policy = HostOffload<Codec, float>;

/// A policy (lone, or a seat), its model and its optimizer, on the policy's stream.
template <class Codec>
using Run = zo2_test::SeatRun<Codec>;

struct Trace {
  std::vector<StepResult> steps;
  std::vector<unsigned char> encoded;
  std::vector<float> state;
  std::vector<float> params;  // get_group of every group, concatenated
};

template <class Codec>
Trace snapshot(const Policy<Codec>& p, std::vector<StepResult> steps) {
  return {std::move(steps), encoded_of(p), state_of(p), params_of<Codec>(p)};
}

/// Runs f(i) for every seat in a thread of its own; the first error is rethrown after all
/// joined. A seat that throws is destroyed in its thread (`drop(i)`), so its partner stops
/// waiting for it.
void on_seats(std::size_t n, const std::function<void(std::size_t)>& f, const std::function<void(std::size_t)>& drop) {
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      try {
        f(i);
      } catch (...) {
        errors[i] = std::current_exception();
        drop(i);
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

/// Seats of one shared master, built on this thread (seat 0 first: it loads the shared masters).
template <class Codec>
struct Seats {
  SharedHostMaster<Codec, float> shared;
  std::vector<std::unique_ptr<Run<Codec>>> runs;
  std::vector<std::vector<StepResult>> steps;

  Seats(const ParameterStore<float>& init, const DenseTanhStack<float>& shape, const ZOConfig& cfg,
        const std::vector<OffloadOptions>& options)
      : shared(ModelLayout::of(shape), options[0], options.size()), steps(options.size()) {
    shared.set_wait_timeout(std::chrono::milliseconds(60'000));
    for (std::size_t i = 0; i < options.size(); ++i)
      runs.push_back(std::make_unique<Run<Codec>>(init, shape, cfg, options[i], shared.seat(i)));
  }
  /// f(run, seat) on every seat, each in its own thread.
  void each(const std::function<void(Run<Codec>&, std::size_t)>& f) {
    on_seats(runs.size(), [&](std::size_t i) { f(*runs[i], i); }, [&](std::size_t i) { runs[i].reset(); });
  }
  void train(const DeviceDenseTanhStack::Batch& batch, int n) {
    each([&](Run<Codec>& r, std::size_t i) {
      for (int s = 0; s < n; ++s) steps[i].push_back(r.opt.step(batch));
    });
  }
  void flush() {
    each([](Run<Codec>& r, std::size_t) { r.opt.flush(); });
  }
};

void check_same(const Trace& a, const Trace& b) {
  REQUIRE(a.steps.size() == b.steps.size());
  for (std::size_t s = 0; s < a.steps.size(); ++s) {
    CAPTURE(s);
    REQUIRE(std::isfinite(a.steps[s].loss_plus));
    CHECK(a.steps[s].loss_plus == b.steps[s].loss_plus);
    CHECK(a.steps[s].loss_minus == b.steps[s].loss_minus);
    CHECK(a.steps[s].projected_grad == b.steps[s].projected_grad);
  }
  CHECK(a.encoded == b.encoded);
  CHECK(a.state == b.state);
  CHECK(a.params == b.params);
}

OffloadOptions with(OffloadOptions o, unsigned every, std::size_t slots = 2, std::size_t depth = 1) {
  o.writeback_every = every;
  o.slots = slots;
  o.prefetch_depth = depth;
  return o;
}

/// Between steps 6 and 7 (every seat flushed), seat 0 -- and the lone run -- set block 1's
/// master to block 0's and halve block 2's rule state: the followers' device copies of them are
/// stale and must be dropped.
template <class Codec>
void set_between(Policy<Codec>& p, const ModelLayout& ml) {
  std::vector<unsigned char> bytes(p.group_encoded_bytes(ml.block(0)));
  p.get_group_encoded(ml.block(0), bytes);
  p.set_group_encoded(ml.block(1), bytes);
  if (p.rule_state_slots()) {
    std::vector<float> st(std::size_t{p.rule_state_slots()} * ml.layout(ml.block(2)).total_elements());
    p.get_rule_state(ml.block(2), st);
    for (float& v : st) v *= 0.5f;
    p.set_rule_state(ml.block(2), st);
  }
}

/// A lone run and seats over 12 steps (6, flush, optionally a set, 6, flush): the same bits.
/// Seat 0 runs with the lone run's options, the followers with theirs.
template <class Codec>
void check_seats(const ZOConfig& cfg, const DenseTanhStack<float>& shape, const OffloadOptions& lone_options,
                 const std::vector<OffloadOptions>& follower_options, bool set_mid) {
  const auto init = escaped_bf16_store(shape, 61);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 19));
  const ModelLayout ml = ModelLayout::of(shape);

  Run<Codec> lone(init, shape, cfg, lone_options);
  std::vector<StepResult> lone_steps;
  for (int s = 0; s < 6; ++s) lone_steps.push_back(lone.opt.step(batch));
  lone.opt.flush();
  if (set_mid) set_between(lone.policy, ml);
  for (int s = 0; s < 6; ++s) lone_steps.push_back(lone.opt.step(batch));
  lone.opt.flush();
  const Trace want = snapshot(lone.policy, lone_steps);

  std::vector<OffloadOptions> options{lone_options};
  options.insert(options.end(), follower_options.begin(), follower_options.end());
  Seats<Codec> seats(init, shape, cfg, options);
  for (std::size_t i = 0; i < options.size(); ++i) CHECK(seats.runs[i]->policy.seat() == static_cast<long>(i));
  seats.train(batch, 6);
  seats.flush();
  if (set_mid) set_between(seats.runs[0]->policy, ml);
  seats.train(batch, 6);
  seats.flush();
  for (std::size_t i = 0; i < options.size(); ++i) {
    CAPTURE(i);
    check_same(want, snapshot(seats.runs[i]->policy, seats.steps[i]));
  }
  // Pinned once: the master holds what the lone engine holds, the seats nothing.
  CHECK(lone.policy.owned_pinned_bytes() == lone.policy.plan().host_pinned_bytes);
  CHECK(seats.shared.pinned_bytes() == lone.policy.owned_pinned_bytes());
  for (const auto& r : seats.runs) CHECK(r->policy.owned_pinned_bytes() == 0);
  // The leader writes back what the lone engine writes back; the followers nothing.
  CHECK(seats.runs[0]->policy.bytes_offloaded() == lone.policy.bytes_offloaded());
  CHECK(seats.runs[0]->policy.updates_replayed() == lone.policy.updates_replayed());
  for (std::size_t i = 1; i < options.size(); ++i) {
    CHECK(seats.runs[i]->policy.bytes_offloaded() == 0);
    CHECK(seats.runs[i]->policy.bytes_uploaded() > 0);
  }
}

template <class Codec>
void check_codec() {
  const DenseTanhStack<float> shape = offload_test_shape();
  for (const ZOConfig& cfg : {config_for(ZOMethod::kSgd), config_for(ZOMethod::kAdam, 2)}) {
    CAPTURE(method_name(cfg.method));
    OffloadOptions base;
    base.rule_state_slots = state_slots_for(cfg);
    for (unsigned k : {1u, 4u}) {
      CAPTURE(k);
      check_seats<Codec>(cfg, shape, with(base, k), {with(base, k)}, false);
    }
    // The follower streams through three slots, two blocks ahead.
    check_seats<Codec>(cfg, shape, with(base, 4), {with(base, 4, 3, 2)}, false);
  }
}

}  // namespace

TEST_CASE("two seats of one host master give a lone engine's bits: bf16" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Bf16Codec>();
}
TEST_CASE("two seats of one host master give a lone engine's bits: int8 rows" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Int8RowCodec>();
}
TEST_CASE("two seats of one host master give a lone engine's bits: packed bf16" * doctest::skip(!kHaveDevice)) {
  check_codec<offload::Bf16PackedCodec>();
}

TEST_CASE("shared rule state (zo-mmt), slot-cache hits, and seat 0 setting blocks between steps" *
          doctest::skip(!kHaveDevice)) {
  const ZOConfig mmt = config_for(ZOMethod::kMomentum);
  OffloadOptions o;
  o.rule_state_slots = 1;
  SUBCASE("8 streamed blocks, K = 4, deep prefetch on the follower") {
    check_seats<offload::Bf16Codec>(mmt, offload_test_shape(), with(o, 4), {with(o, 4, 4, 3)}, true);
  }
  SUBCASE("three seats (two followers), K = 4") {
    check_seats<offload::Int8RowCodec>(mmt, offload_test_shape(), with(o, 4), {with(o, 4, 3, 2), with(o, 4)}, true);
  }
  SUBCASE("3 streamed blocks in 4 slots (hits), K = 1 and 4") {
    for (unsigned k : {1u, 4u}) {
      CAPTURE(k);
      check_seats<offload::Int8RowCodec>(mmt, offload_test_shape(3), with(o, k, 4, 1), {with(o, k, 4, 3)}, true);
      OffloadOptions adam = o;
      adam.rule_state_slots = 2;
      check_seats<offload::Bf16Codec>(config_for(ZOMethod::kAdam, 2), offload_test_shape(3), with(adam, k, 4, 2),
                                       {with(adam, k, 4, 1)}, true);
    }
  }
}

TEST_CASE("a seat's mistakes are refused" * doctest::skip(!kHaveDevice)) {
  using Codec = offload::Bf16Codec;
  const DenseTanhStack<float> shape = offload_test_shape();
  const ModelLayout ml = ModelLayout::of(shape);
  const auto init = escaped_bf16_store(shape, 67);
  const auto batch = zo2_test::to_device(zo2_test::make_regression_batch<float>(32, shape.d_in, 23));
  OffloadOptions o;
  o.writeback_every = 4;

  SUBCASE("plans, layouts and seats that do not match the master") {
    SharedHostMaster<Codec, float> shared(ml, o, 2);
    OffloadOptions other = o;
    other.writeback_every = 2;
    CHECK_THROWS_WITH_AS(Policy<Codec>(ml, other, nullptr, shared.seat(1)), doctest::Contains("writeback_every"),
                         ConfigError);
    other = o;
    other.rule_state_slots = 1;
    CHECK_THROWS_WITH_AS(Policy<Codec>(ml, other, nullptr, shared.seat(1)), doctest::Contains("rule_state_slots"),
                         ConfigError);
    other = o;
    other.gpu_memory_budget = Policy<Codec>::plan_for(ml, o).minimum_bytes +
                              3 * Policy<Codec>::plan_for(ml, o).slot_bytes();  // blocks resident
    CHECK_THROWS_WITH_AS(Policy<Codec>(ml, other, nullptr, shared.seat(1)), doctest::Contains("streamed_blocks"),
                         ConfigError);
    CHECK_THROWS_WITH_AS(Policy<Codec>(ModelLayout::of(offload_test_shape(6)), o, nullptr, shared.seat(1)),
                         doctest::Contains("num_blocks"), ConfigError);
    DenseTanhStack<float> wider = shape;
    wider.d_in += 1;  // the same blocks, another prologue: only the layout's fingerprint differs
    CHECK_THROWS_WITH_AS(Policy<Codec>(ModelLayout::of(wider), o, nullptr, shared.seat(1)), doctest::Contains("layout"),
                         ConfigError);
    CHECK_THROWS_AS(shared.seat(2), ConfigError);
    Policy<Codec> first(ml, o, nullptr, shared.seat(1));
    CHECK_THROWS_WITH_AS(Policy<Codec>(ml, o, nullptr, shared.seat(1)), doctest::Contains("taken"), ConfigError);
    // A seat keeps the master's rule state count.
    CHECK_THROWS_WITH_AS(first.reserve_rule_state(2), doctest::Contains("rule_state_slots"), ConfigError);
    // ... and its write-back interval.
    CHECK_THROWS_WITH_AS(first.set_writeback_every(2), doctest::Contains("writeback_every"), ConfigError);
  }

  SUBCASE("a follower sets no streamed group; nobody reads or sets a lagging one") {
    Seats<Codec> seats(init, shape, config_for(ZOMethod::kSgd), {o, o});
    Policy<Codec>& leader = seats.runs[0]->policy;
    Policy<Codec>& follower = seats.runs[1]->policy;
    std::vector<float> flat(ml.layout(ml.block(0)).total_elements());
    leader.get_group(ml.block(0), flat);
    CHECK_THROWS_WITH_AS(follower.set_group(ml.block(0), flat), doctest::Contains("through seat 0"), ConfigError);
    std::vector<unsigned char> bytes(follower.group_encoded_bytes(ml.block(0)));
    CHECK_THROWS_WITH_AS(follower.set_group_encoded(ml.block(0), bytes), doctest::Contains("through seat 0"),
                         ConfigError);
    std::vector<float> pro(ml.layout(ml.prologue()).total_elements());
    follower.get_group(ml.prologue(), pro);
    follower.set_group(ml.prologue(), pro);  // a device-resident group: its own
    follower.get_group(ml.block(3), flat);   // nothing owed yet: the shared copy
    seats.train(batch, 3);
    REQUIRE(follower.writeback_log().any_lag());
    std::size_t lagging = 0;
    while (follower.writeback_log().lag(lagging) == 0) ++lagging;
    CHECK_THROWS_WITH_AS(follower.get_group(ml.block(lagging), flat), doctest::Contains("flush on every seat"), Error);
    CHECK_THROWS_WITH_AS(leader.set_group(ml.block(lagging), flat), doctest::Contains("flush on every seat"),
                         ConfigError);
    seats.flush();
    follower.get_group(ml.block(lagging), flat);
    std::vector<float> lead(flat.size());
    leader.get_group(ml.block(lagging), lead);
    CHECK(flat == lead);
  }
}
