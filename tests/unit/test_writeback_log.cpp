// zo2/offload/writeback_log.hpp: deferred write-back's bookkeeping without a device.
// - the stagger: every K consecutive steps write each block back exactly once, ~1/K of the
//   blocks per step; a host copy never lags K updates (skipped steps, flushes, one-block
//   updates and forced write-backs included);
// - a simulated engine (host copies, slots that evict, replays on a miss) keeps every block's
//   device copy equal to "every update applied once, in order" -- what write-back every step
//   gives -- for K = 1..8 over random schedules;
// - the plan's choice of K from the link.
#include <doctest/doctest.h>

#include <cmath>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/writeback_log.hpp>

using namespace zo2;
using zo2::offload::choose_writeback_every;
using zo2::offload::LinkHint;
using zo2::offload::WritebackLog;

namespace {

PendingUpdate update_of(std::uint32_t step, double g = 0.5) {
  PendingUpdate u{step, g, 1e-3, 0.0};
  u.rule = RuleId::kAdam;
  u.num_queries = 2;
  u.more_g[0] = -g;
  u.step_size = 1e-3 * step;
  return u;
}

}  // namespace

TEST_CASE("K = 1 writes back every visit and never lags") {
  WritebackLog log(5, 1);
  CHECK(log.capacity() == 0);
  for (std::uint32_t s = 0; s < 10; ++s)
    for (std::size_t b = 0; b < 5; ++b) {
      CHECK(log.writes_back(b, update_of(s)));
      log.record(b, 7, update_of(s), true);
      CHECK(log.lag(b) == 0);
    }
  CHECK_FALSE(log.any_lag());
  CHECK_THROWS_AS(log.record(0, 7, update_of(11), false), Error);  // no room at K = 1
}

TEST_CASE("the stagger writes each block back once per K steps, 1/K of the blocks per step") {
  for (unsigned k : {2u, 3u, 4u, 8u}) {
    CAPTURE(k);
    const std::size_t blocks = 24;
    WritebackLog log(blocks, k);
    std::vector<int> per_block(blocks, 0);
    for (std::uint32_t s = 0; s < 8 * k; ++s) {
      std::size_t written = 0;
      for (std::size_t b = 0; b < blocks; ++b) {
        const bool wb = log.writes_back(b, update_of(s));
        CHECK(wb == ((s + b) % k == 0));  // never forced on an unbroken run of steps
        log.record(b, 1, update_of(s), wb);
        CHECK(log.lag(b) < k);
        written += wb;
        per_block[b] += wb;
      }
      // blocks / K each step (24 is a multiple of every K here)
      CHECK(written == blocks / k);
    }
    for (int n : per_block) CHECK(n == 8);
  }
}

TEST_CASE("owed updates come back oldest first, with their seeds, and are forgotten on write-back") {
  WritebackLog log(3, 4);
  // block 1 at steps 0..: written back where (s + 1) % 4 == 0, i.e. s = 3, 7, ...
  for (std::uint32_t s = 0; s < 3; ++s) {
    REQUIRE_FALSE(log.writes_back(1, update_of(s)));
    log.record(1, 100 + s, update_of(s, 0.1 * s), false);
  }
  REQUIRE(log.lag(1) == 3);
  const auto owed = log.owed(1);
  REQUIRE(owed.size() == 3);
  for (std::uint32_t s = 0; s < 3; ++s) {
    CHECK(owed[s].seed == 100 + s);
    CHECK(owed[s].update.step == s);
    CHECK(owed[s].update.g == 0.1 * s);
    CHECK(owed[s].update.more_g[0] == -0.1 * s);
    CHECK(owed[s].update.rule == RuleId::kAdam);
  }
  CHECK(log.lag(0) == 0);
  CHECK(log.owed(0).empty());
  CHECK(log.any_lag());
  CHECK(log.writes_back(1, update_of(3)));
  log.record(1, 103, update_of(3), true);
  CHECK(log.lag(1) == 0);
  CHECK_FALSE(log.any_lag());
}

TEST_CASE("a host copy never lags K updates: skipped steps force the write-back") {
  WritebackLog log(1, 4);
  // Steps whose update never meets the stagger's residue (s % 4 == 0 is skipped: a NaN loss).
  std::uint32_t s = 1;
  int forced = 0;
  for (int visit = 0; visit < 20; ++visit, ++s) {
    if (s % 4 == 0) ++s;
    const bool wb = log.writes_back(0, update_of(s));
    forced += wb;
    log.record(0, 1, update_of(s), wb);
    CHECK(log.lag(0) <= 3);
  }
  CHECK(forced == 5);  // every 4th visit
  // A caller that ignores writes_back() is stopped before the room overflows.
  WritebackLog strict(1, 2);
  strict.record(0, 1, update_of(1), false);
  CHECK_THROWS_WITH_AS(strict.record(0, 1, update_of(3), false), doctest::Contains("would lag"), Error);
  CHECK(strict.lag(0) == 1);
}

TEST_CASE("settled() and settle_all() reset the lag; reset() starts over") {
  WritebackLog log(4, 3);
  for (std::size_t b = 0; b < 4; ++b) log.record(b, 1, update_of(1), false);
  log.settled(2);
  CHECK(log.lag(2) == 0);
  CHECK(log.lag(3) == 1);
  log.settle_all();
  CHECK_FALSE(log.any_lag());
  log.record(0, 1, update_of(2), false);
  log.reset(2, 5);
  CHECK(log.blocks() == 2);
  CHECK(log.capacity() == 4);
  CHECK_FALSE(log.any_lag());
  CHECK_THROWS_AS(log.reset(2, 0), ConfigError);
  CHECK_THROWS_AS(log.reset(2, offload::kMaxWritebackEvery + 1), ConfigError);
  CHECK_THROWS_AS(log.lag(2), std::out_of_range);
}

namespace {

/// A block's value in the simulation: the update steps applied to it, in order.
using History = std::vector<std::uint32_t>;

/// The engine's schedule with `slots` slots (LRU, hits keep the device copy) over `blocks`
/// streamed blocks: sweeps with and without an update, flushes, one-block updates, skipped
/// steps, evaluation visits. Each block's device copy after each visit must be `truth`.
void simulate(unsigned k, std::size_t blocks, std::size_t slots, std::uint32_t seed) {
  std::mt19937 rng(seed);
  WritebackLog log(blocks, k);
  std::vector<History> host(blocks), truth(blocks);
  struct Slot {
    long block = -1;
    History data;
    std::uint64_t used = 0;
  };
  std::vector<Slot> slot(slots);
  std::uint64_t clock = 0;
  std::size_t writebacks = 0, updates = 0;

  // The engine's visit of block b: a hit keeps the slot, a miss uploads the host copy and
  // replays what it lacks; then `u` (if any) is applied and written back on the log's schedule.
  const auto visit = [&](std::size_t b, const PendingUpdate* u, bool force_write_back) {
    Slot* s = nullptr;
    for (auto& x : slot)
      if (x.block == static_cast<long>(b)) s = &x;
    if (!s) {
      s = &slot[0];
      for (auto& x : slot)
        if (x.used < s->used) s = &x;
      s->block = static_cast<long>(b);
      s->data = host[b];
      for (const auto& owed : log.owed(b)) s->data.push_back(owed.update.step);
    }
    s->used = ++clock;
    if (u) {
      s->data.push_back(u->step);
      truth[b].push_back(u->step);
      ++updates;
    }
    REQUIRE(s->data == truth[b]);
    const bool wb = force_write_back || (u && log.writes_back(b, *u));
    if (wb) {
      host[b] = s->data;
      ++writebacks;
    }
    if (u && !force_write_back) log.record(b, 9, *u, wb);
    else if (wb) log.settled(b);
    REQUIRE(log.lag(b) < k);
    // The host copy plus what the log says it lacks is the block.
    History rebuilt = host[b];
    for (const auto& owed : log.owed(b)) rebuilt.push_back(owed.update.step);
    REQUIRE(rebuilt == truth[b]);
  };

  std::uint32_t step = 0;
  std::uniform_int_distribution<int> what(0, 19);
  for (int round = 0; round < 200; ++round, ++step) {
    const int w = what(rng);
    if (w < 13) {  // a step: every block visited with the owed update
      const PendingUpdate u = update_of(step);
      for (std::size_t b = 0; b < blocks; ++b) visit(b, &u, false);
    } else if (w < 15) {  // a skipped step, or a sweep with nothing owed (accumulation, zo-cons)
      for (std::size_t b = 0; b < blocks; ++b) visit(b, nullptr, false);
    } else if (w < 17) {  // flush: apply_update writes every block back
      const PendingUpdate u = update_of(step);
      for (std::size_t b = 0; b < blocks; ++b) visit(b, &u, true);
    } else if (w < 18) {  // apply_update of one block alone
      const PendingUpdate u = update_of(step);
      visit(std::uniform_int_distribution<std::size_t>(0, blocks - 1)(rng), &u, true);
    } else {  // evaluation (current()): visits, nothing written back
      for (std::size_t b = 0; b < blocks; ++b) visit(b, nullptr, false);
    }
  }
  // settle(): every lagging block visited and written back.
  for (std::size_t b = 0; b < blocks; ++b)
    if (log.lag(b)) visit(b, nullptr, true);
  for (std::size_t b = 0; b < blocks; ++b) CHECK(host[b] == truth[b]);
  CHECK_FALSE(log.any_lag());
  MESSAGE("K = " << k << ", " << blocks << " blocks, " << slots << " slots: " << updates << " updates, " << writebacks
                 << " write-backs");
  if (k == 1) CHECK(writebacks >= updates);
}

}  // namespace

TEST_CASE("a simulated engine with evicting slots and replays gives every update once, in order") {
  for (unsigned k = 1; k <= 8; ++k)
    for (std::size_t blocks : {std::size_t{1}, std::size_t{2}, std::size_t{7}})
      for (std::size_t slots : {std::size_t{2}, std::size_t{3}}) {
        CAPTURE(k);
        CAPTURE(blocks);
        CAPTURE(slots);
        simulate(k, blocks, slots, 1000 * k + 10 * static_cast<unsigned>(blocks) + static_cast<unsigned>(slots));
      }
}

TEST_CASE("the plan's K from the link") {
  CHECK(choose_writeback_every({}) == 1);                       // unknown
  CHECK(choose_writeback_every({55, 0}) == 1);                  // half known
  CHECK(choose_writeback_every({52, 51}) == 1);                 // duplex ~ one way
  CHECK(choose_writeback_every({50, 48}) == 1);                 // 4% slower: within the target
  CHECK(choose_writeback_every({50, 44}) == 3);                 // r = 1.136: 0.136 / 3 < 5%
  CHECK(choose_writeback_every({55, 44}) == 5);                 // r = 1.25
  CHECK(choose_writeback_every({55, 36}) == offload::kMaxAutoWritebackEvery);  // r = 1.53: 11, capped
  CHECK(choose_writeback_every({55, 55.0 / 1.1}) == 2);         // exactly 10% slower: K = 2
  // A slow update-only pass holds K down: K <= 1 + replay / one_way.
  CHECK(choose_writeback_every({55, 36, 110}) == 3);
  CHECK(choose_writeback_every({55, 36, 20}) == 1);
  for (double d = 10; d <= 60; d += 0.5) {
    const unsigned k = choose_writeback_every({55, d});
    CHECK(k >= 1);
    CHECK(k <= offload::kMaxAutoWritebackEvery);
    if (k > 1 && k < offload::kMaxAutoWritebackEvery) {
      CHECK((55 / d - 1) / k <= offload::kWritebackSlowdownTarget + 1e-12);
      CHECK((55 / d - 1) / (k - 1) > offload::kWritebackSlowdownTarget);
    }
  }
}
