// zo2/offload/writeback_log.hpp -- deferred write-back's bookkeeping (host only, no CUDA): which
// owed updates the host copy of each streamed block lacks, when a visit must write its block
// back, and how many steps apart write-backs may be for a given PCIe link.
//
// With write-back every K (OffloadOptions::writeback_every), a visit that applies an update to a
// streamed block writes the block back only every K-th time; in between, the pinned host copy
// lags the block by the updates applied since its last write-back. The offload engine keeps
// those updates here, per block, and when the block next comes back from the host into a slot
// (a slot-cache miss), it replays them in order with the update-only pass before the visit's own
// pass. Replayed or fused, each update runs the same element arithmetic on the same encoded
// input, so the parameters (and the rule state that travels with the block) stay bit-identical
// to write-back every step.
//
// Per block, not one shared ring: the engine's public apply_update() may give one group an
// update the others never see, so the lagging updates of two blocks need not be the same
// sequence. A block holds at most K - 1 of them (a PendingUpdate and its seed, ~240 bytes):
// writes_back() forces the write-back of the visit that would make it K, so the room can never
// overflow (record() refuses, as a logic error, an update that would).
//
// Which visits write back (the stagger): a visit of streamed block b applying the update of step
// s writes back when (s + b) % K == 0, so each step writes back about 1/K of the blocks and the
// device-to-host traffic is spread evenly over the steps instead of every K-th step writing
// everything (a step that writes back every block runs at the duplex link's speed, which is
// what deferring avoids; the replays spread evenly too, about (K - 1) / 2 per visit).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::offload {

/// An update a block's host copy lacks: the PendingUpdate and the seed of the step's noise.
struct OwedUpdate {
  std::uint64_t seed = 0;
  PendingUpdate update{};
};

/// The most steps between two write-backs of a block that a plan or a caller may choose.
inline constexpr unsigned kMaxWritebackEvery = 64;
/// The most the plan picks from the link alone (each step beyond costs replays, see below).
inline constexpr unsigned kMaxAutoWritebackEvery = 8;
/// The plan's target: the write-back's slowdown of the uploads at most this share of a block's
/// upload time.
inline constexpr double kWritebackSlowdownTarget = 0.05;

/// Pinned host <-> device bandwidths of the link, GB/s (1e9 B/s), as zo2_bench measures them
/// (measure_pinned_bandwidth; offload/link_probe.cuh for programs): one_way_gbps, host-to-device
/// alone; duplex_gbps, host-to-device while a device-to-host copy runs. replay_gbps (optional):
/// encoded bytes per second the device's update-only pass covers (0: unknown).
struct LinkHint {
  double one_way_gbps = 0;
  double duplex_gbps = 0;
  double replay_gbps = 0;
};

/// The write-back interval K the plan picks for a link (OffloadOptions::writeback_every = 0).
///
/// Every step uploads each streamed block (B bytes, B / one_way seconds alone) and writes back
/// B / K of it on average. While a write-back runs, the upload slows to the duplex rate, so a
/// block costs about (B / K)(1 / duplex - 1 / one_way) more than its upload alone: a share
/// (one_way / duplex - 1) / K of it. The plan takes the smallest K that brings that share to
/// kWritebackSlowdownTarget (5%): K = 1 where the link's duplex is as fast as one way (the
/// write-back rides the idle direction for free), K = ceil((r - 1) / 0.05) for r = one_way /
/// duplex, at most kMaxAutoWritebackEvery. E.g. 55 GB/s one-way, 36 in duplex (r = 1.53): 8;
/// 50 and 44 (r = 1.14): 3; 52 and 51: 1.
///
/// What a larger K costs is GPU time: a visit replays (K - 1) / 2 updates on average, each a pass
/// over the block. Where the update-only pass's rate is known (replay_gbps), K is held to where
/// that mean replay time stays within half the block's upload time: (K - 1) / 2 * B / replay <=
/// B / (2 one_way), i.e. K <= 1 + replay_gbps / one_way_gbps. An unknown link (zero or negative
/// rates) gets K = 1.
inline unsigned choose_writeback_every(const LinkHint& link) {
  if (!(link.one_way_gbps > 0) || !(link.duplex_gbps > 0)) return 1;
  const double r = link.one_way_gbps / link.duplex_gbps;
  const double excess = r - 1.0;
  if (excess <= kWritebackSlowdownTarget) return 1;
  double k = std::ceil(excess / kWritebackSlowdownTarget - 1e-9);
  k = std::min(k, static_cast<double>(kMaxAutoWritebackEvery));
  if (link.replay_gbps > 0) k = std::min(k, std::floor(1.0 + link.replay_gbps / link.one_way_gbps));
  return static_cast<unsigned>(std::max(k, 1.0));
}

/// What one visit of a streamed block costs on the GPU and the link, measured over a step
/// (HostOffload::block_timing(): medians over the step's streamed visits), in ms: what zo2-opt
/// reports beside the K its trial chose (writeback_trial.hpp).
struct BlockTiming {
  double upload_ms = 0;   // the block's upload, beside the write-backs (so at about the duplex rate)
  double compute_ms = 0;  // the GPU's work of the visit: its pass, then the model's forwards
  double pass_ms = 0;     // the visit's pass alone (update and perturbation): a replay costs at most this
  double period_ms = 0;   // from one streamed visit's start to the next's: what a visit really took
                          // (0: not measured)
};

/// Throws ConfigError unless 1 <= every <= kMaxWritebackEvery (0 is resolved by the plan).
inline void validate_writeback_every(unsigned every) {
  if (every < 1 || every > kMaxWritebackEvery)
    throw ConfigError("writeback_every", "write-back every K steps needs 1 <= K <= " +
                                             std::to_string(kMaxWritebackEvery) + " (0: the plan picks from the link), got " +
                                             std::to_string(every));
}

/// The owed updates each streamed block's host copy lacks (see the file comment).
class WritebackLog {
 public:
  WritebackLog() = default;
  /// `blocks` streamed blocks, written back every `every` visits that update them (>= 1).
  WritebackLog(std::size_t blocks, unsigned every) { reset(blocks, every); }

  /// Starts over with every host copy current.
  void reset(std::size_t blocks, unsigned every) {
    validate_writeback_every(every);
    every_ = every;
    lag_.assign(blocks, 0);
    room_.assign(blocks * (every - 1), OwedUpdate{});
  }

  std::size_t blocks() const { return lag_.size(); }
  unsigned every() const { return every_; }
  /// The most updates a host copy can lack: every() - 1.
  std::size_t capacity() const { return every_ - 1; }

  /// Updates block b's host copy lacks.
  std::size_t lag(std::size_t b) const { return lag_.at(b); }
  /// Those updates, oldest first (replay them in this order).
  std::span<const OwedUpdate> owed(std::size_t b) const {
    return std::span<const OwedUpdate>(room_).subspan(b * capacity(), lag_.at(b));
  }
  /// Whether any host copy lags.
  bool any_lag() const {
    return std::any_of(lag_.begin(), lag_.end(), [](std::size_t n) { return n != 0; });
  }

  /// Whether the visit of block b that applies `u` writes the block back: every visit for
  /// K = 1; else the stagger's visits ((u.step + b) % K == 0) and any visit that would leave the
  /// host copy K updates behind.
  bool writes_back(std::size_t b, const PendingUpdate& u) const {
    if (every_ == 1) return true;
    return (static_cast<std::uint64_t>(u.step) + b) % every_ == 0 || lag(b) + 1 >= every_;
  }

  /// A visit applied `u` (with `seed`) to block b's device copy and `written_back` says whether
  /// it then wrote the block back: if so the host copy is current, else it lacks `u` too.
  void record(std::size_t b, std::uint64_t seed, const PendingUpdate& u, bool written_back) {
    if (written_back) {
      lag_.at(b) = 0;
      return;
    }
    if (lag(b) >= capacity())
      throw Error("WritebackLog: block " + std::to_string(b) + " would lag " + std::to_string(lag(b) + 1) +
                  " updates with write-back every " + std::to_string(every_) +
                  " (a visit skipped a write-back writes_back() asked for)");
    room_[b * capacity() + lag_[b]] = OwedUpdate{seed, u};
    ++lag_[b];
  }
  /// Block b's host copy is current (written back, or set from outside).
  void settled(std::size_t b) { lag_.at(b) = 0; }
  void settle_all() { std::fill(lag_.begin(), lag_.end(), std::size_t{0}); }

 private:
  unsigned every_ = 1;
  std::vector<std::size_t> lag_;
  std::vector<OwedUpdate> room_;  // block b's owed updates at [b * capacity(), b * capacity() + lag(b))
};

}  // namespace zo2::offload
