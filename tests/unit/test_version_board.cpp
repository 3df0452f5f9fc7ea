// zo2/offload/version_board.hpp: the host-side protocol of a shared host master, without a
// device.
// - simulated seats (tests/support/version_board_sim.hpp; one thread each here, one process each
//   in test_version_board_processes.cpp: a leader that writes each block's version into a shared
//   "host copy", followers that only read it) run the offload engine's visit order with a slot
//   cache (LRU, prefetch ahead and across steps), deferred write-back on the WritebackLog's
//   schedule and flushes: every read of a host copy sees exactly the version its seat counts,
//   and nothing deadlocks, for 1-3 followers, K = 1..4, prefetch depth 1..3, slots below and
//   above the streamed blocks (hits);
// - a wait that cannot end throws an Error naming seat, block and versions after the timeout;
// - the leader replacing a block while a follower stands elsewhere is a ConfigError.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/version_board.hpp>

#include "../support/version_board_sim.hpp"

using namespace zo2;
using zo2::offload::VersionBoard;
using zo2_test::Host;
using zo2_test::Seat;
using zo2_test::Shape;

namespace {

void run_shape(const Shape& s) {
  VersionBoard board(s.blocks, 1 + s.followers);
  board.set_timeout(std::chrono::milliseconds(20'000));
  std::vector<std::uint64_t> copies(s.blocks, 0);
  const Host host{copies.data()};
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
  for (std::size_t b = 0; b < s.blocks; ++b) CHECK(board.published(b) == host.get(b));
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
