// zo2/offload/version_board.hpp: the host-side protocol of a shared host master, without a
// device.
// - simulated seats (one thread each: a leader that writes each block's version into a shared
//   "host copy", followers that only read it) run the offload engine's visit order with a slot
//   cache (LRU, prefetch ahead and across steps), deferred write-back on the WritebackLog's
//   schedule and flushes: every read of a host copy sees exactly the version its seat counts,
//   and nothing deadlocks, for 1-3 followers, K = 1..4, prefetch depth 1..3, slots below and
//   above the streamed blocks (hits);
// - a wait that cannot end throws an Error naming seat, block and versions after the timeout;
// - the leader replacing a block while a follower stands elsewhere is a ConfigError.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/version_board.hpp>
#include <zo2/offload/writeback_log.hpp>

using namespace zo2;
using zo2::offload::VersionBoard;
using zo2::offload::WritebackLog;

namespace {

struct Shape {
  std::size_t blocks, followers, slots, depth;
  unsigned every;
  int steps;
};

/// The shared "host copies": block b's holds the version last written.
struct Host {
  explicit Host(std::size_t n) : version(std::make_unique<std::atomic<std::uint64_t>[]>(n)) {
    for (std::size_t b = 0; b < n; ++b) version[b] = 0;
  }
  std::unique_ptr<std::atomic<std::uint64_t>[]> version;
};

/// One seat's engine, as far as the protocol goes.
class Seat {
 public:
  Seat(VersionBoard& board, Host& host, const Shape& s, std::size_t seat)
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
        host_.version[b] = n;
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
    victim->version = host_.version[b];  // read after the wait, outside the lock
    wrong += victim->version != count_[b];
    ++reads;
    return *victim;
  }

  VersionBoard& board_;
  Host& host_;
  Shape s_;
  std::size_t seat_;
  WritebackLog log_;
  std::vector<std::uint64_t> count_;
  std::vector<Slot> slots_;
  std::uint64_t clock_ = 0;
};

void run_shape(const Shape& s) {
  VersionBoard board(s.blocks, 1 + s.followers);
  board.set_timeout(std::chrono::milliseconds(20'000));
  Host host(s.blocks);
  std::vector<std::unique_ptr<Seat>> seats;
  for (std::size_t i = 0; i <= s.followers; ++i) seats.push_back(std::make_unique<Seat>(board, host, s, i));
  std::vector<std::exception_ptr> errors(seats.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < seats.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        seats[i]->run();
      } catch (...) {
        errors[i] = std::current_exception();
        board.leave(i);
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (std::size_t b = 0; b < s.blocks; ++b) CHECK(board.published(b) == host.version[b]);
  for (const auto& seat : seats) {
    CHECK(seat->wrong == 0);
    CHECK(seat->reads > 0);
  }
}

}  // namespace

TEST_CASE("every seat reads the version it counts, and nothing deadlocks") {
  for (std::size_t followers : {1u, 3u})
    for (unsigned every : {1u, 2u, 4u})
      for (std::size_t depth : {1u, 2u, 3u})
        for (std::size_t slots : {depth + 1, std::size_t{7}}) {  // 7 >= 5 blocks: hits
          CAPTURE(followers);
          CAPTURE(every);
          CAPTURE(depth);
          CAPTURE(slots);
          run_shape({5, followers, slots, depth, every, 12});
        }
}

TEST_CASE("a wait that cannot end throws after the timeout, naming seat, block and versions") {
  VersionBoard board(4, 2);
  board.set_timeout(std::chrono::milliseconds(30));
  CHECK_THROWS_WITH_AS(board.await_published(1, 2, 1, [] {}),
                       doctest::Contains("seat 1 waited for streamed block 2's host copy version 1"), Error);
  CHECK_THROWS_WITH_AS(board.await_begun(3, 1, [](std::size_t) {}),
                       doctest::Contains("to begin its visit counting write-back 1 of streamed block 3"), Error);
  // A leader that has gone further than a follower counts: the seats made different calls.
  board.mark_begun(1, 0, 1);
  board.await_begun(0, 1, [](std::size_t) {});
  board.publish(0, 1, [] {});
  CHECK_THROWS_WITH_AS(board.await_published(1, 0, 0, [] {}), doctest::Contains("as version 0"), Error);
  // A gone leader: a follower stops waiting at once.
  board.leave(0);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(board.await_published(1, 1, 1, [] {}), doctest::Contains("is gone"), Error);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(30));
}

TEST_CASE("the leader replaces a host copy only where every follower stands") {
  VersionBoard board(2, 2);
  int ran = 0;
  board.replace(0, 0, [&] { ++ran; });  // nobody has moved
  CHECK(board.generation(0) == 1);
  board.mark_begun(1, 0, 1);  // the follower began a write-back visit the leader has not
  CHECK_THROWS_AS(board.replace(0, 0, [&] { ++ran; }), ConfigError);
  board.mark_done(1, 0, 1);
  board.await_begun(0, 1, [](std::size_t) {});
  board.publish(0, 1, [] {});
  board.replace(0, 1, [&] { ++ran; });
  CHECK(ran == 2);
  CHECK(board.generation(0) == 2);
  CHECK(board.generation(1) == 0);
}
