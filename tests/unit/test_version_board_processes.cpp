// zo2/offload/version_board.hpp over POSIX shared memory (zo2/offload/shm_region.hpp): seats
// that are processes, as data-parallel ranks of one host are.
// - a leader and 1-3 followers, fork()ed, run the protocol simulation of test_version_board.cpp
//   (tests/support/version_board_sim.hpp) over a board in a ShmRegion, the "host copies" in the
//   same region after the board: the parent creates the region, the leader lays the board out
//   (create_in), the followers attach (ShmRegion::attach, VersionBoard::attach_to); every read of
//   a host copy sees the version its seat counts (each child's exit code says), for every shape;
// - a follower whose leader is killed (SIGKILL) mid-protocol gets an Error within the timeout;
// - a seat killed while holding a block's lock: the next lock of that block, a waiter's too,
//   throws an Error saying so, and so does every later one; the other blocks work on;
// - attach_to waits for the creator, and refuses a region without a board's magic, of another
//   layout version or size, or too small;
// - ShmRegion: names, a name created twice, attach to a missing name, early unlink, moves; no
//   test leaves a name in /dev/shm.
// Children never return into doctest: each body runs under try/catch and ends in _exit with a
// code (0: as expected). No test here runs threads, so fork() copies a single-threaded process.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <zo2/core/error.hpp>
#include <zo2/offload/shm_region.hpp>
#include <zo2/offload/version_board.hpp>

#include "../support/version_board_sim.hpp"

using namespace zo2;
using namespace std::chrono_literals;
using zo2::offload::ShmRegion;
using zo2::offload::VersionBoard;
using zo2_test::Host;
using zo2_test::Seat;
using zo2_test::Shape;

namespace {

/// Exit codes of a child.
enum : int { kOk = 0, kWrongReads = 1, kNoReads = 2, kFinished = 3, kOtherError = 4, kThrew = 100, kThrewOther = 101 };

std::string prefix() { return "zo2-test-board-" + std::to_string(::getpid()) + "-"; }
/// A name of this process's own ("/zo2-test-board-<pid>-<n>-<what>").
std::string unique_name(const std::string& what) {
  static int n = 0;
  return "/" + prefix() + std::to_string(++n) + "-" + what;
}
bool in_dev_shm(const std::string& name) { return std::filesystem::exists("/dev/shm" + name); }

/// Runs body() in a child process, which ends with _exit(what body returned); an exception
/// leaving body() is reported on stderr and becomes kThrew (zo2::Error) or kThrewOther.
template <class F>
pid_t spawn(F body) {
  std::fflush(nullptr);  // nothing buffered twice
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = kThrewOther;
    try {
      code = body();
    } catch (const Error& e) {
      std::fprintf(stderr, "child %d: %s\n", static_cast<int>(::getpid()), e.what());
      code = kThrew;
    } catch (...) {
      code = kThrewOther;
    }
    ::_exit(code);
  }
  REQUIRE(pid > 0);
  return pid;
}

/// The child's exit code, -signal if a signal ended it, or -1000 if it ran past `limit` (then
/// it is killed).
int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    int st = 0;
    const pid_t r = ::waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? -WTERMSIG(st) : -999;
    if (r < 0) return -998;
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      return -1000;
    }
    std::this_thread::sleep_for(2ms);
  }
}

/// A region with a board of `blocks` blocks and `seats` seats, then the blocks' host copies.
struct Layout {
  std::size_t blocks, seats;
  std::size_t board_bytes() const { return VersionBoard::region_bytes(blocks, seats); }
  std::size_t bytes() const { return board_bytes() + blocks * sizeof(std::uint64_t); }
  Host host(const ShmRegion& r) const {
    return Host{reinterpret_cast<std::uint64_t*>(static_cast<std::byte*>(r.data()) + board_bytes())};
  }
};

/// One seat's process: runs the simulation, reports wrong reads by its exit code.
int run_seat(VersionBoard& board, Host host, const Shape& s, std::size_t seat) {
  Seat me(board, host, s, seat);
  try {
    me.run();
  } catch (...) {
    board.leave(seat);  // as an engine's destructor does: nobody waits for this seat
    throw;
  }
  if (me.wrong) std::fprintf(stderr, "seat %zu: %zu wrong reads of %zu\n", seat, me.wrong, me.reads);
  return me.wrong ? kWrongReads : me.reads ? kOk : kNoReads;
}

void run_processes(const Shape& s) {
  const Layout lay{s.blocks, 1 + s.followers};
  const std::string name = unique_name("sim");
  ShmRegion region = ShmRegion::create(name, lay.bytes());
  std::vector<pid_t> pids;
  for (std::size_t seat = 0; seat < lay.seats; ++seat)
    pids.push_back(spawn([&, seat] {
      // as a rank of its own would: map the region by its name, then lay out or attach to the board
      ShmRegion mine = ShmRegion::attach(name, lay.bytes(), 10s);
      VersionBoard board = seat == 0 ? VersionBoard::create_in(mine.data(), lay.board_bytes(), lay.blocks, lay.seats)
                                     : VersionBoard::attach_to(mine.data(), lay.board_bytes(), 10s);
      if (seat == 0) board.set_timeout(20s);
      return run_seat(board, lay.host(mine), s, seat);
    }));
  for (std::size_t seat = 0; seat < pids.size(); ++seat) {
    CAPTURE(seat);
    CHECK(wait_exit(pids[seat], 60s) == kOk);
  }
  VersionBoard board = VersionBoard::attach_to(region.data(), lay.board_bytes(), 1s);
  CHECK(board.timeout() == 20s);  // the leader's set_timeout, in the shared header
  for (std::size_t b = 0; b < s.blocks; ++b) {
    CHECK(board.published(b) == lay.host(region).get(b));
    CHECK(board.published(b) > 0);
  }
}

/// A 64-byte aligned heap buffer of `bytes` bytes filled with `fill`.
struct Buffer {
  struct alignas(64) Line {
    unsigned char b[64];
  };
  explicit Buffer(std::size_t bytes, unsigned char fill)
      : lines(std::make_unique<Line[]>((bytes + 63) / 64)), size(bytes) {
    std::memset(lines.get(), fill, size);
  }
  void* data() const { return lines.get(); }
  std::unique_ptr<Line[]> lines;
  std::size_t size;
};

}  // namespace

TEST_CASE("seats as processes: every seat reads the version it counts, and nothing deadlocks") {
  for (std::size_t followers : {1u, 2u, 3u})
    for (unsigned every : {1u, 2u, 4u})
      for (std::size_t depth : {1u, 3u})
        for (std::size_t slots : {depth + 1, std::size_t{7}}) {  // 7 >= 5 blocks: hits
          CAPTURE(followers);
          CAPTURE(every);
          CAPTURE(depth);
          CAPTURE(slots);
          run_processes({5, followers, slots, depth, every, 12});
        }
}

TEST_CASE("a follower whose leader is killed mid-protocol gets an Error within the timeout") {
  const Shape s{5, 1, 3, 2, 2, 1'000'000};  // steps enough to outlast the test
  const Layout lay{s.blocks, 2};
  ShmRegion region = ShmRegion::create(unique_name("kill"), lay.bytes());
  VersionBoard board = VersionBoard::create_in(region.data(), lay.board_bytes(), lay.blocks, lay.seats);
  board.set_timeout(500ms);
  // the children use the board and region the fork copies: the same shared mapping
  const pid_t leader = spawn([&] { return run_seat(board, lay.host(region), s, 0); });
  const pid_t follower = spawn([&] {
    try {
      run_seat(board, lay.host(region), s, 1);
      return int{kFinished};
    } catch (const Error& e) {
      const std::string what = e.what();
      const bool expected = what.find("gave up") != std::string::npos || what.find("died") != std::string::npos;
      if (!expected) std::fprintf(stderr, "follower: %s\n", e.what());
      return expected ? int{kOk} : int{kOtherError};
    }
  });
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (board.published(0) < 3 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  CHECK(board.published(0) >= 3);  // mid-protocol
  REQUIRE(::kill(leader, SIGKILL) == 0);
  const auto killed = std::chrono::steady_clock::now();
  CHECK(wait_exit(leader, 10s) == -SIGKILL);
  CHECK(wait_exit(follower, 10s) == kOk);
  CHECK(std::chrono::steady_clock::now() - killed < 500ms + 2s);  // the timeout, and slack for a busy machine
}

TEST_CASE("a seat killed while holding a block's lock: every later lock of the block throws, saying so") {
  const Layout lay{3, 2};
  ShmRegion region = ShmRegion::create(unique_name("dead"), lay.bytes());
  VersionBoard board = VersionBoard::create_in(region.data(), lay.board_bytes(), lay.blocks, lay.seats);
  board.set_timeout(500ms);
  // a waiter (here: this process, seat 1 sleeping on block 1) whose partner dies holding the lock
  const pid_t dies = spawn([&] {
    std::this_thread::sleep_for(100ms);  // the waiter sleeps by now
    board.locked(1, [] { ::raise(SIGKILL); });
    return int{kFinished};
  });
  CHECK_THROWS_WITH_AS(board.await_published(1, 1, 1, [] {}),
                       doctest::Contains("a seat died while holding streamed block 1's lock"), Error);
  CHECK(wait_exit(dies, 10s) == -SIGKILL);
  // every later lock of the block, in any process
  CHECK_THROWS_WITH_AS(board.published(1), doctest::Contains("a seat died while holding streamed block 1's lock"),
                       Error);
  const pid_t other = spawn([&] {
    try {
      board.mark_begun(1, 1, 1);
      return int{kFinished};
    } catch (const Error& e) {
      return std::string(e.what()).find("died") != std::string::npos ? int{kOk} : int{kOtherError};
    }
  });
  CHECK(wait_exit(other, 10s) == kOk);
  // the other blocks work on, and leaving takes every lock without throwing
  board.mark_begun(1, 0, 1);
  board.await_begun(0, 1, [](std::size_t) {});
  board.publish(0, 1, [] {});
  CHECK(board.published(0) == 1);
  board.leave(1);
  board.leave(0);
}

TEST_CASE("attach_to waits for the creator and checks what it finds") {
  const Layout lay{4, 3};
  SUBCASE("a board laid out later") {
    ShmRegion region = ShmRegion::create(unique_name("late"), lay.bytes());
    const pid_t creator = spawn([&] {
      std::this_thread::sleep_for(100ms);
      VersionBoard board = VersionBoard::create_in(region.data(), lay.board_bytes(), lay.blocks, lay.seats);
      board.set_timeout(1234ms);
      board.mark_begun(2, 3, 7);
      return int{kOk};
    });
    VersionBoard board = VersionBoard::attach_to(region.data(), lay.board_bytes(), 10s);
    CHECK(wait_exit(creator, 10s) == kOk);
    CHECK(board.blocks() == 4);
    CHECK(board.seats() == 3);
    CHECK(board.timeout() == 1234ms);
    board.set_timeout(100ms);
    CHECK_THROWS_WITH_AS(board.await_begun(3, 7, [](std::size_t) {}),
                         doctest::Contains("seat 0 waited for seat 1 to begin"), Error);  // seat 2 has begun 7
    CHECK_THROWS_WITH_AS(VersionBoard::create_in(region.data(), lay.board_bytes(), lay.blocks, lay.seats),
                         doctest::Contains("already holds a board"), Error);
    VersionBoard moved = std::move(board);  // a board is movable; the moved-to one works
    CHECK(moved.published(3) == 0);
    board = std::move(moved);
    CHECK(board.generation(3) == 0);
  }
  SUBCASE("a region never laid out") {
    Buffer zeros(lay.board_bytes(), 0);
    CHECK_THROWS_WITH_AS(VersionBoard::attach_to(zeros.data(), zeros.size, 50ms),
                         doctest::Contains("to be initialised"), Error);
  }
  SUBCASE("garbage") {
    Buffer garbage(lay.board_bytes(), 0xab);
    CHECK_THROWS_WITH_AS(VersionBoard::attach_to(garbage.data(), garbage.size, 50ms),
                         doctest::Contains("holds no version board (magic 0xabababababababab"), Error);
  }
  SUBCASE("a region too small") {
    Buffer buf(lay.board_bytes(), 0);
    CHECK_THROWS_AS(VersionBoard::create_in(buf.data(), lay.board_bytes() - 64, lay.blocks, lay.seats), ConfigError);
    VersionBoard::create_in(buf.data(), buf.size, lay.blocks, lay.seats);
    CHECK_THROWS_WITH_AS(VersionBoard::attach_to(buf.data(), buf.size - 64, 50ms),
                         doctest::Contains("the region has"), Error);
    CHECK_THROWS_AS(VersionBoard::create_in(buf.data(), buf.size, lay.blocks, 0), ConfigError);
  }
  SUBCASE("another layout version, another size") {  // the header: magic, u32 layout, u32, blocks, seats, bytes
    Buffer buf(lay.board_bytes(), 0);
    VersionBoard::create_in(buf.data(), buf.size, lay.blocks, lay.seats);
    auto* header = static_cast<unsigned char*>(buf.data());
    const std::uint32_t layout = 99;
    std::memcpy(header + 8, &layout, sizeof layout);
    CHECK_THROWS_WITH_AS(VersionBoard::attach_to(buf.data(), buf.size, 50ms),
                         doctest::Contains("has layout version 99, this build reads version 1"), Error);
    const std::uint32_t one = 1;
    std::memcpy(header + 8, &one, sizeof one);
    const std::uint64_t bytes = 12345;
    std::memcpy(header + 32, &bytes, sizeof bytes);
    CHECK_THROWS_WITH_AS(VersionBoard::attach_to(buf.data(), buf.size, 50ms),
                         doctest::Contains("of 4 blocks and 3 seats says it takes 12345 bytes"), Error);
  }
}

TEST_CASE("ShmRegion: names, a name taken, a name missing, unlink, moves") {
  CHECK_THROWS_AS(ShmRegion::create("zo2-no-slash", 64), ConfigError);
  CHECK_THROWS_AS(ShmRegion::create("/zo2/two-slashes", 64), ConfigError);
  CHECK_THROWS_AS(ShmRegion::create("/", 64), ConfigError);
  CHECK_THROWS_AS(ShmRegion::attach("zo2-no-slash", 64, 10ms), ConfigError);
  {
    // More than /dev/shm holds: an Error at create (its pages are reserved), not a SIGBUS later,
    // and the name is not left behind.
    const std::string huge = unique_name("huge");
    CHECK_THROWS_WITH_AS(ShmRegion::create(huge, std::size_t{1} << 50), doctest::Contains(huge.c_str()), Error);
    CHECK_FALSE(in_dev_shm(huge));
  }

  const std::string name = unique_name("region");
  {
    ShmRegion r = ShmRegion::create(name, 4096);
    CHECK(in_dev_shm(name));
    CHECK(r.size() == 4096);
    CHECK(r.name() == name);
    CHECK(static_cast<unsigned char*>(r.data())[4095] == 0);  // the kernel's zeros
    CHECK_THROWS_WITH_AS(ShmRegion::create(name, 4096), doctest::Contains((name + "': shm_open").c_str()), Error);
    CHECK_THROWS_WITH_AS(ShmRegion::attach(name, 8192, 30ms), doctest::Contains("it has 4096 bytes"), Error);
    ShmRegion a = ShmRegion::attach(name, 4096, 1s);
    ShmRegion any = ShmRegion::attach(name, 0, 1s);  // 0: whatever size its creator gave it
    CHECK(any.size() == 4096);
    static_cast<char*>(r.data())[17] = 42;
    CHECK(static_cast<char*>(any.data())[17] == 42);
    CHECK(static_cast<char*>(a.data())[17] == 42);  // one memory
    ShmRegion moved = std::move(r);  // the name goes with the move, and is unlinked once
    CHECK(moved.data() != nullptr);
    CHECK(r.data() == nullptr);
  }
  CHECK_FALSE(in_dev_shm(name));
  const std::string missing = "'" + name + "': waited 30 ms for it to exist with 4096 bytes; it does not exist";
  CHECK_THROWS_WITH_AS(ShmRegion::attach(name, 4096, 30ms), doctest::Contains(missing.c_str()), Error);
  CHECK_THROWS_WITH_AS(ShmRegion::attach(name, 0, 30ms), doctest::Contains("to exist with a size; it does not exist"),
                       Error);
  {
    ShmRegion r = ShmRegion::create(name, 64);
    r.unlink();  // early: the mapping lives on
    CHECK_FALSE(in_dev_shm(name));
    static_cast<char*>(r.data())[3] = 1;
    ShmRegion again = ShmRegion::create(name, 64);  // the name is free again
    CHECK(static_cast<char*>(again.data())[3] == 0);
  }
  CHECK_FALSE(in_dev_shm(name));
}

TEST_CASE("nothing is left in /dev/shm") {
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
    CAPTURE(e.path().string());
    CHECK(e.path().filename().string().rfind(prefix(), 0) != 0);
  }
}
