// The protocol of a shared host master (zo2/offload/version_board.hpp) as the offload engine
// runs it, without a device: a seat (a leader that writes each block's version into a shared
// "host copy", or a follower that only reads it) runs the engine's visit order with a slot cache
// (LRU, prefetch ahead and across steps), deferred write-back on the WritebackLog's schedule and
// flushes, and counts the reads of a host copy that see another version than the seat counts.
// Shared by tests/unit/test_version_board.cpp (seats as threads) and
// tests/unit/test_version_board_processes.cpp (seats as processes).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <zo2/offload/version_board.hpp>
#include <zo2/offload/writeback_log.hpp>

namespace zo2_test {

using zo2::PendingUpdate;
using zo2::offload::VersionBoard;
using zo2::offload::WritebackLog;

struct Shape {
  std::size_t blocks, followers, slots, depth;
  unsigned every;
  int steps;
};

/// The shared "host copies": block b's holds the version last written, in memory the caller
/// owns (a vector for threads, shared memory for processes), read and written atomically.
struct Host {
  std::uint64_t* version;
  std::uint64_t get(std::size_t b) const { return std::atomic_ref<std::uint64_t>(version[b]).load(); }
  void set(std::size_t b, std::uint64_t v) const { std::atomic_ref<std::uint64_t>(version[b]).store(v); }
};

/// One seat's engine, as far as the protocol goes.
class Seat {
 public:
  Seat(VersionBoard& board, Host host, const Shape& s, std::size_t seat)
      : board_(board), host_(host), s_(s), seat_(seat), log_(s.blocks, s.every), count_(s.blocks, 0) {
    slots_.reserve(s.slots);  // slots are referred to across ensure()
  }

  void run() {
    for (int step = 0; step < s_.steps; ++step) {
      const bool owed = step > 0;
      PendingUpdate u{static_cast<std::uint32_t>(step - 1), 0.5, 1e-3, 0.0};
      // the prologue: prefetch the first blocks
      prefetch_first();
      for (std::size_t b = 0; b < s_.blocks; ++b) visit(b, owed ? &u : nullptr, false);
      prefetch_first();  // the epilogue's prefetch of the next step's first blocks
      if (step % 5 == 4) {  // a flush: apply_update writes every block back
        PendingUpdate f{static_cast<std::uint32_t>(step), 0.25, 1e-3, 0.0};
        for (std::size_t b = 0; b < s_.blocks; ++b) visit(b, &f, true);
        prefetch_first();
      }
    }
    // settle: every lagging block written back
    for (std::size_t b = 0; b < s_.blocks; ++b)
      if (log_.lag(b)) visit(b, nullptr, true);
  }
  std::size_t reads = 0;
  std::size_t wrong = 0;  // reads of another version than counted (checked after the threads join)

 private:
  struct Slot {
    long block = -1;
    std::uint64_t version = 0;  // the host copy's version it was filled from
    std::uint64_t last_use = 0;
  };

  void visit(std::size_t b, const PendingUpdate* u, bool always) {
    const bool write_back = always || (u && log_.writes_back(b, *u));
    Slot& s = ensure(b, nullptr);
    s.last_use = ++clock_;
    // A slot filled from the host holds the version the seat counts now (the owed updates
    // replay on top of it).
    wrong += s.version != count_[b];
    if (seat_ != 0 && write_back) board_.mark_begun(seat_, b, count_[b] + 1);
    if (write_back) {
      const std::uint64_t n = ++count_[b];
      if (seat_ == 0) {
        board_.await_begun(b, n, [](std::size_t) {});
        host_.set(b, n);
        board_.publish(b, n, [] {});
      } else {
        board_.mark_done(seat_, b, n);
      }
      s.version = n;  // the device copy is current
    }
    if (u) log_.record(b, 0, *u, write_back);
    else if (write_back) log_.settled(b);
    for (std::size_t k = 1; k <= std::min(s_.depth, s_.blocks - 1); ++k) ensure((b + k) % s_.blocks, &s);
  }

  void prefetch_first() {
    for (std::size_t k = 0; k < std::min(s_.depth, s_.blocks); ++k) ensure(k, nullptr);
  }

  Slot& ensure(std::size_t b, const Slot* keep) {
    for (auto& s : slots_)
      if (s.block == static_cast<long>(b)) {
        s.last_use = ++clock_;
        return s;
      }
    if (slots_.size() < s_.slots) slots_.emplace_back();
    Slot* victim = nullptr;
    for (auto& s : slots_)
      if (&s != keep && (!victim || s.last_use < victim->last_use)) victim = &s;
    victim->block = static_cast<long>(b);
    victim->last_use = ++clock_;
    if (seat_ != 0) board_.await_published(seat_, b, count_[b], [] {});
    victim->version = host_.get(b);  // read after the wait, outside the lock
    wrong += victim->version != count_[b];
    ++reads;
    return *victim;
  }

  VersionBoard& board_;
  Host host_;
  Shape s_;
  std::size_t seat_;
  WritebackLog log_;
  std::vector<std::uint64_t> count_;
  std::vector<Slot> slots_;
  std::uint64_t clock_ = 0;
};

}  // namespace zo2_test
