// zo2/offload/writeback_trial.hpp: choosing K by timing steps, against scripted step times.
// - the sequence of K it runs (settling steps, then timed ones; doubling while it gains);
// - it keeps K = 1 where larger K are slower or within min_gain, and ends on the best K
//   when a later K is slower (not on the last tried);
// - its limits: max_k, a bad time, bad options.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/writeback_trial.hpp>

using zo2::offload::WritebackTrial;

namespace {

// Runs the trial with step time `time_at(K)` until it is done (or `limit` steps): the K of every step.
std::vector<unsigned> run(WritebackTrial& trial, const std::function<double(unsigned)>& time_at, int limit = 100) {
  std::vector<unsigned> ks;
  for (int i = 0; i < limit && !trial.done(); ++i) {
    ks.push_back(trial.k());
    trial.record(time_at(trial.k()));
  }
  return ks;
}

}  // namespace

TEST_CASE("write-back trial: settles K steps, times `measure`, doubles while it gains") {
  WritebackTrial trial;  // max_k 8, measure 3, min_gain 2%
  // 0.20 s at K = 1, 0.19 at 2, 0.185 at 4 (2.6% better), 0.184 at 8 (0.5%: not taken)
  const auto ks = run(trial, [](unsigned k) { return k == 1 ? 0.20 : k == 2 ? 0.19 : k == 4 ? 0.185 : 0.184; });
  const std::vector<unsigned> want = {1, 1, 1, 1, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8};
  CHECK(ks == want);
  CHECK(trial.done());
  CHECK(trial.k() == 4);
  REQUIRE(trial.tried().size() == 4);
  CHECK(trial.tried()[0].first == 1);
  CHECK(trial.tried()[0].second == doctest::Approx(0.20));
  CHECK(trial.tried()[3].first == 8);
  CHECK(trial.summary() == "K = 1 0.2000 s, K = 2 0.1900 s, K = 4 0.1850 s, K = 8 0.1840 s");
}

TEST_CASE("write-back trial: K = 1 stays where the larger K do not gain enough") {
  WritebackTrial slower;
  run(slower, [](unsigned k) { return k == 1 ? 0.10 : 0.11; });
  CHECK(slower.k() == 1);
  CHECK(slower.tried().size() == 2);  // K = 1 and 2, then stops

  WritebackTrial within;
  run(within, [](unsigned k) { return k == 1 ? 0.100 : 0.099; });  // 1% < min_gain
  CHECK(within.k() == 1);
}

TEST_CASE("write-back trial: the median of the timed steps, and a later slower K") {
  WritebackTrial trial;
  // K = 2's timed steps hold one outlier: the median ignores it
  std::vector<double> script = {0.5, 0.30, 0.30, 0.30,          // K = 1: one settling step, three timed
                                0.4, 0.4, 0.25, 0.9, 0.25,      // K = 2: two settling, timed 0.25 0.9 0.25
                                0.3, 0.3, 0.3, 0.3, 0.27, 0.27, 0.27};  // K = 4: slower than 2
  std::size_t i = 0;
  while (!trial.done() && i < script.size()) trial.record(script[i++]);
  CHECK(trial.done());
  CHECK(i == script.size());
  CHECK(trial.k() == 2);
  REQUIRE(trial.tried().size() == 3);
  CHECK(trial.tried()[1].second == doctest::Approx(0.25));
}

TEST_CASE("write-back trial: limits") {
  WritebackTrial::Options o;
  o.max_k = 3;  // 1, 2, then 3 (capped), then done
  WritebackTrial capped(o);
  const auto ks = run(capped, [](unsigned k) { return 1.0 / k; });
  CHECK(capped.done());
  CHECK(capped.k() == 3);
  CHECK(ks.back() == 3);

  o.max_k = 1;
  WritebackTrial one(o);
  CHECK(one.done());
  CHECK(one.k() == 1);

  WritebackTrial bad_time;
  bad_time.record(0.2);
  bad_time.record(std::numeric_limits<double>::quiet_NaN());
  CHECK(bad_time.done());
  CHECK(bad_time.k() == 1);
  bad_time.record(0.1);  // ignored once done
  CHECK(bad_time.k() == 1);

  WritebackTrial::Options bad;
  bad.max_k = 0;
  CHECK_THROWS_AS(WritebackTrial{bad}, zo2::ConfigError);
  bad.max_k = 2, bad.measure = 0;
  CHECK_THROWS_AS(WritebackTrial{bad}, zo2::ConfigError);
  bad.measure = 1, bad.min_gain = 1.0;
  CHECK_THROWS_AS(WritebackTrial{bad}, zo2::ConfigError);
}

TEST_CASE("write-back trial: apply_to sets a policy's K only where it differs") {
  struct FakePolicy {
    unsigned every = 1, sets = 0;
    unsigned writeback_every() const { return every; }
    void set_writeback_every(unsigned k) { every = k, ++sets; }
  } policy;
  WritebackTrial trial;
  trial.apply_to(policy);  // K = 1 already
  CHECK(policy.sets == 0);
  for (int i = 0; i < 4; ++i) trial.record(0.2);  // K = 1 settled and timed: on to K = 2
  REQUIRE(trial.k() == 2);
  trial.apply_to(policy);
  CHECK(policy.every == 2);
  CHECK(policy.sets == 1);
  trial.apply_to(policy);
  CHECK(policy.sets == 1);
}
