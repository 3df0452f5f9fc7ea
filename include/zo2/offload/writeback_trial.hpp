// zo2/offload/writeback_trial.hpp -- choosing the write-back interval K by timing steps (host
// only, no CUDA).
//
// K changes nothing but speed: the parameters are bit-identical for every K (writeback_log.hpp),
// so a run may simply try a few and keep the fastest. What K is best depends on the link's
// duplex, the GPU's idle time per block (which the replays use) and the slots' coupling, which
// a prediction from one step's timeline missed by 10-16 points on two H100 hosts
// (docs/benchmarks.md); the trial measures instead:
//
//   K = 1, then 2, 4, 8 (up to max_k): at each K, `K` steps to reach its steady state (the
//   stagger spreads write-backs over K steps and the replays start the step after a skipped
//   write-back), then `measure` timed steps; their median is K's time. It doubles K while that
//   time beats the best so far by at least min_gain, and ends on the best K.
//
// So a run spends at most 1+3 + 2+3 + 4+3 + 8+3 = 27 steps (defaults) on the trial, each a real
// training step at some K, and a link where K = 1 is best costs it 4 + 5 steps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/writeback_log.hpp>

namespace zo2::offload {

class WritebackTrial {
 public:
  struct Options {
    unsigned max_k = kMaxAutoWritebackEvery;  // the largest K tried (a power of two or not)
    unsigned measure = 3;                     // timed steps per K, after its settling steps
    double min_gain = 0.02;                   // a larger K must be this much faster to be taken
  };

  WritebackTrial() : WritebackTrial(Options{}) {}
  explicit WritebackTrial(Options o) : o_(o) {
    if (o_.max_k < 1 || o_.max_k > kMaxWritebackEvery)
      throw ConfigError("writeback_every", "the write-back trial's largest K must be in 1.." +
                                               std::to_string(kMaxWritebackEvery) + ", got " + std::to_string(o_.max_k));
    if (o_.measure < 1) throw ConfigError("writeback_every", "the write-back trial needs at least one timed step per K");
    if (!(o_.min_gain >= 0 && o_.min_gain < 1))
      throw ConfigError("writeback_every", "the write-back trial's minimum gain must be in [0, 1)");
    done_ = o_.max_k == 1;
  }

  /// The K the next step runs at (the chosen one once done()).
  unsigned k() const { return done_ ? best_k_ : k_; }
  bool done() const { return done_; }
  /// The step just run at k() took `seconds` (wall or device time, the same kind every step).
  /// A time that is not positive and finite ends the trial on the best K so far.
  void record(double seconds) {
    if (done_) return;
    if (!(std::isfinite(seconds) && seconds > 0)) {
      done_ = true;
      return;
    }
    if (++steps_at_k_ <= k_) return;  // settling
    samples_.push_back(seconds);
    if (samples_.size() < o_.measure) return;
    std::vector<double> s = samples_;
    std::nth_element(s.begin(), s.begin() + s.size() / 2, s.end());
    const double median = s[s.size() / 2];
    tried_.emplace_back(k_, median);
    const bool better = k_ == 1 || median < best_s_ * (1.0 - o_.min_gain);
    if (better) best_k_ = k_, best_s_ = median;
    if (!better || k_ >= o_.max_k) {
      done_ = true;
      return;
    }
    k_ = std::min(2 * k_, o_.max_k);
    steps_at_k_ = 0;
    samples_.clear();
  }
  /// Sets `policy`'s write-back interval to k() where it differs (between steps: see
  /// HostOffload::set_writeback_every).
  template <class Policy>
  void apply_to(Policy& policy) const {
    if (k() != policy.writeback_every()) policy.set_writeback_every(k());
  }
  /// Each K tried, with the median of its timed steps (seconds).
  const std::vector<std::pair<unsigned, double>>& tried() const { return tried_; }
  /// "K = 1 0.2085 s, K = 2 0.1955 s, K = 4 0.1990 s": what the trial measured.
  std::string summary() const {
    std::string s;
    char buf[64];
    for (const auto& [k, t] : tried_) {
      std::snprintf(buf, sizeof buf, "%sK = %u %.4f s", s.empty() ? "" : ", ", k, t);
      s += buf;
    }
    return s;
  }

 private:
  Options o_;
  unsigned k_ = 1, best_k_ = 1, steps_at_k_ = 0;
  double best_s_ = 0;
  bool done_ = false;
  std::vector<double> samples_;
  std::vector<std::pair<unsigned, double>> tried_;
};

}  // namespace zo2::offload
