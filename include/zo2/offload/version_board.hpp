// zo2/offload/version_board.hpp -- the host-side bookkeeping of a pinned host master shared by
// several seats (offload engines driving one GPU each, one thread each, in one process; see
// shared_host_master.cuh): which version of each streamed block the host copy holds, and the
// waits that keep every seat's copies of the block ordered against it. Host only, no CUDA: the
// caller passes what to do under the block's lock (wait on or record a CUDA event).
//
// Versions: block b's host copy starts at version 0 and seat 0 (the leader), the only seat that
// writes it, moves it to version n with its n-th write-back of b. Every other seat (a follower)
// counts the same write-backs in its own visits (it makes the same calls, so its log asks for a
// write-back at the same visits) without writing anything: its count is the version its next
// read of the host copy must see.
//   await_published  a follower about to read b expecting version n waits until the leader has
//                    published n (never more: see await_begun);
//   mark_begun       a follower has begun its visit that counts write-back n of b (every read it
//                    needs for that visit is issued);
//   await_begun      the leader's write-back n of b waits until every follower has marked it
//                    begun, so no follower still needs version n - 1;
//   publish          the leader has issued write-back n.
// Every wait has a timeout (a seat that stopped making the same calls would otherwise hang its
// partners) and throws an Error naming the seat, the block and the versions.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <zo2/core/error.hpp>

namespace zo2::offload {

class VersionBoard {
 public:
  /// `blocks` streamed blocks shared by `seats` seats (seat 0 the leader).
  VersionBoard(std::size_t blocks, std::size_t seats)
      : seats_(seats), blocks_(blocks), gone_(std::make_unique<std::atomic<bool>[]>(seats)) {
    if (seats < 1) throw ConfigError("seats", "a shared host master needs at least one seat");
    for (auto& b : blocks_) b.begun.assign(seats, 0), b.done.assign(seats, 0);
    for (std::size_t s = 0; s < seats; ++s) gone_[s] = false;
  }

  std::size_t blocks() const { return blocks_.size(); }
  std::size_t seats() const { return seats_; }
  /// How long a seat waits for another before it gives up with an Error (default 300 s).
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  /// Follower `seat` is about to read block b's host copy as version n: waits until the leader
  /// has published n, then runs then() under the block's lock (before any later write-back).
  /// Returns the block's generation (see generation()).
  template <class F>
  std::uint64_t await_published(std::size_t seat, std::size_t b, std::uint64_t n, F&& then) {
    Block& k = blocks_.at(b);
    std::unique_lock lock(k.m);
    wait(lock, k, [&] { return k.published >= n || gone_[0]; }, [&] {
      return "seat " + std::to_string(seat) + " waited for streamed block " + std::to_string(b) +
             "'s host copy version " + std::to_string(n) + "; seat 0 has written back " + std::to_string(k.published);
    });
    if (k.published != n)
      throw Error("SharedHostMaster: seat " + std::to_string(seat) + " reads streamed block " + std::to_string(b) +
                  " as version " + std::to_string(n) + " but seat 0 has written back " + std::to_string(k.published) +
                  (gone_[0] ? " and is gone" : "") + " (do all seats make the same calls?)");
    then();
    return k.generation;
  }

  /// Follower `seat` has begun the visit that counts write-back n of block b.
  void mark_begun(std::size_t seat, std::size_t b, std::uint64_t n) {
    Block& k = blocks_.at(b);
    {
      std::lock_guard lock(k.m);
      k.begun.at(seat) = n;
    }
    k.cv.notify_all();
  }
  /// Follower `seat` has counted write-back n of block b (its visit ended).
  void mark_done(std::size_t seat, std::size_t b, std::uint64_t n) {
    Block& k = blocks_.at(b);
    std::lock_guard lock(k.m);
    k.begun.at(seat) = std::max(k.begun.at(seat), n);
    k.done.at(seat) = n;
  }

  /// The leader is about to perform write-back n of block b: waits until every follower still
  /// present has begun its visit counting it, then runs then(seat) under the block's lock for
  /// each of them (before that follower can read version n).
  template <class F>
  void await_begun(std::size_t b, std::uint64_t n, F&& then) {
    Block& k = blocks_.at(b);
    std::unique_lock lock(k.m);
    for (std::size_t s = 1; s < seats_; ++s) {
      wait(lock, k, [&] { return k.begun[s] >= n || gone_[s]; }, [&] {
        return "seat 0 waited for seat " + std::to_string(s) + " to begin its visit counting write-back " +
               std::to_string(n) + " of streamed block " + std::to_string(b) + "; it has begun " +
               std::to_string(k.begun[s]);
      });
      if (!gone_[s]) then(s);
    }
  }

  /// The leader has issued write-back n of block b: record() under the block's lock (the event
  /// a reader waits on), then the version is published.
  template <class F>
  void publish(std::size_t b, std::uint64_t n, F&& record) {
    Block& k = blocks_.at(b);
    {
      std::lock_guard lock(k.m);
      record();
      k.published = n;
    }
    k.cv.notify_all();
  }

  /// Runs f() under block b's lock.
  template <class F>
  decltype(auto) locked(std::size_t b, F&& f) {
    std::lock_guard lock(blocks_.at(b).m);
    return f();
  }

  /// Versions the leader has published for block b.
  std::uint64_t published(std::size_t b) {
    return locked(b, [&] { return blocks_[b].published; });
  }
  /// How many times the leader replaced block b's host copy outside the write-backs (set_group
  /// and the like): a follower's device copy uploaded under another generation is stale.
  std::uint64_t generation(std::size_t b) {
    return locked(b, [&] { return blocks_[b].generation; });
  }

  /// Before the leader replaces block b's host copy outside the write-backs: every follower
  /// present must have counted exactly the leader's `n` write-backs of b (done, not begun
  /// another), or a ConfigError says the seats are not between the same calls; then() runs
  /// under the lock (once). The generation moves on.
  template <class F>
  void replace(std::size_t b, std::uint64_t n, F&& then) {
    Block& k = blocks_.at(b);
    std::lock_guard lock(k.m);
    for (std::size_t s = 1; s < seats_; ++s)
      if (!gone_[s] && (k.done[s] != n || k.begun[s] != n))
        throw ConfigError("seat", "seat 0 sets streamed block " + std::to_string(b) +
                                      " while seat " + std::to_string(s) + " has counted " +
                                      std::to_string(k.done[s]) + " of its " + std::to_string(n) +
                                      " write-backs: set streamed blocks only while every seat stands "
                                      "between the same calls with nothing owed (e.g. after flush on all)");
    then();
    ++k.generation;
  }

  /// Seat `seat` is gone (its engine was destroyed): nobody waits for it any more.
  void leave(std::size_t seat) {
    gone_[seat] = true;
    for (auto& k : blocks_) {
      std::lock_guard lock(k.m);  // a waiter checks between its predicate and its sleep
      k.cv.notify_all();
    }
  }

 private:
  struct Block {
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t published = 0, generation = 0;
    std::vector<std::uint64_t> begun, done;  // per seat (followers'; entry 0 unused)
  };

  template <class Pred, class Say>
  void wait(std::unique_lock<std::mutex>& lock, Block& k, Pred pred, Say say) {
    if (!k.cv.wait_for(lock, timeout_, pred))
      throw Error("SharedHostMaster: " + say() + " for " + std::to_string(timeout_.count()) +
                  " ms and gave up (do all seats make the same calls?)");
  }

  std::size_t seats_;
  std::vector<Block> blocks_;
  std::unique_ptr<std::atomic<bool>[]> gone_;
  std::chrono::milliseconds timeout_{300'000};
};

}  // namespace zo2::offload
