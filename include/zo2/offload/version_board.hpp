// zo2/offload/version_board.hpp -- the host-side bookkeeping of a pinned host master shared by
// several seats (offload engines driving one GPU each: one thread each in one process, see
// shared_host_master.cuh, or one process each on one host): which version of each streamed
// block the host copy holds, and the waits that keep every seat's copies of the block ordered
// against it. Host only, no CUDA: the caller passes what to do under the block's lock (wait on
// or record a CUDA event).
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
//
// Where the board lives. VersionBoard(blocks, seats) keeps it in this process's heap, for seats
// that are threads of one process. For seats that are processes (data-parallel ranks of one host,
// one GPU each, sharing one host master in POSIX shared memory), one process lays the board out
// in a region every process maps (create_in, e.g. over a ShmRegion: shm_region.hpp) and the others
// attach to it (attach_to); a board over a region does not own it, and the region's owner must
// outlive it. The region holds everything the seats share, in a fixed layout: a header (magic,
// layout version, blocks, seats, the region's size, the wait timeout in ms, and an `initialised`
// flag the creator writes last, with release semantics, and attach_to waits for), then per block
// a mutex, a condition variable (both process-shared; the condition's clock is CLOCK_MONOTONIC),
// its published version, its generation and the followers' begun and done counts, then one
// `gone` flag per seat. The timeout lives in the header: set_timeout by any process sets it for
// all. Both modes run the same code (the heap board's mutexes are process-shared too).
// The mutexes are robust: when a process dies holding a block's lock (killed inside a call),
// the next seat to take it gets an Error saying so (the lock itself is made consistent and works
// again, but the dead seat's counts of that block may be half-written). A seat that dies
// elsewhere just stops counting: its partners' waits for it end with the timeout's Error, as for
// a seat that stopped making the same calls. A seat that leaves cleanly calls leave().
#pragma once

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include <zo2/core/error.hpp>

namespace zo2::offload {

/// The versions and waits of a shared host master's streamed blocks (see the file comment), in
/// this process's heap or in a region shared by processes.
class VersionBoard {
 public:
  /// `blocks` streamed blocks shared by `seats` seats (seat 0 the leader), in this process's heap.
  VersionBoard(std::size_t blocks, std::size_t seats) {
    check_seats(seats);
    const std::size_t bytes = region_bytes(blocks, seats);
    own_ = std::make_unique<Line[]>(bytes / sizeof(Line));
    init(own_.get(), bytes, blocks, seats);
  }

  /// Bytes of a region holding a board of `blocks` blocks and `seats` seats (a multiple of 64).
  static std::size_t region_bytes(std::size_t blocks, std::size_t seats) {
    if (blocks > kMaxBlocks || seats > kMaxSeats)
      throw ConfigError(blocks > kMaxBlocks ? "blocks" : "seats",
                        "a version board of " + std::to_string(blocks) + " blocks and " + std::to_string(seats) +
                            " seats is past its limits (" + std::to_string(kMaxBlocks) + " blocks, " +
                            std::to_string(kMaxSeats) + " seats)");
    return sizeof(Header) + blocks * block_stride(seats) + round_up(seats * sizeof(std::atomic<std::uint8_t>));
  }

  /// Lays out a board of `blocks` blocks and `seats` seats in `region` (`bytes` bytes, at least
  /// region_bytes(), 64-byte aligned: e.g. a ShmRegion's data()) for every process that maps
  /// it; the others attach_to it. The board does not own the region, which must outlive it. A
  /// region that already holds a board is an Error (create once, attach elsewhere).
  static VersionBoard create_in(void* region, std::size_t bytes, std::size_t blocks, std::size_t seats) {
    check_seats(seats);
    VersionBoard v;
    v.init(region, bytes, blocks, seats);
    return v;
  }

  /// The board another process lays out in `region` (`bytes` bytes, mapped here): waits up to
  /// `wait` until its creator has initialised it, then checks its magic, layout version and size
  /// (an Error names what differs). The board does not own the region, which must outlive it.
  static VersionBoard attach_to(void* region, std::size_t bytes, std::chrono::milliseconds wait) {
    check_region(region, bytes);
    auto* h = static_cast<Header*>(region);
    const auto deadline = std::chrono::steady_clock::now() + wait;
    auto pause = std::chrono::milliseconds(1);
    while (h->initialised.load(std::memory_order_acquire) == 0) {
      if (std::chrono::steady_clock::now() >= deadline)
        throw Error("VersionBoard: waited " + std::to_string(wait.count()) +
                    " ms for the region's board to be initialised (has its creator called create_in?)");
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::milliseconds(20));
    }
    if (h->magic != kMagic)
      throw Error("VersionBoard: the region holds no version board (magic " + hex(h->magic) + ", a board's is " +
                  hex(kMagic) + ")");
    if (h->layout != kLayout)
      throw Error("VersionBoard: the region's board has layout version " + std::to_string(h->layout) +
                  ", this build reads version " + std::to_string(kLayout));
    const bool fits = h->seats >= 1 && h->blocks <= kMaxBlocks && h->seats <= kMaxSeats;
    if (!fits || h->bytes != region_bytes(h->blocks, h->seats))
      throw Error("VersionBoard: the region's board of " + std::to_string(h->blocks) + " blocks and " +
                  std::to_string(h->seats) + " seats says it takes " + std::to_string(h->bytes) +
                  " bytes, where this build lays it out in " +
                  (fits ? std::to_string(region_bytes(h->blocks, h->seats)) + " (built with another pthread ABI?)"
                        : std::string("none (past its limits)")));
    if (bytes < h->bytes)
      throw Error("VersionBoard: the region's board takes " + std::to_string(h->bytes) + " bytes, the region has " +
                  std::to_string(bytes));
    VersionBoard v;
    v.view(region);
    return v;
  }

  /// Movable (create_in and attach_to return by value), not copyable; a moved-from board may only
  /// be destroyed or assigned to. A heap board's memory moves with it; a region's stays put.
  VersionBoard(VersionBoard&& o) noexcept { take(o); }
  VersionBoard& operator=(VersionBoard&& o) noexcept {
    if (this != &o) {
      release();
      take(o);
    }
    return *this;
  }
  VersionBoard(const VersionBoard&) = delete;
  VersionBoard& operator=(const VersionBoard&) = delete;
  ~VersionBoard() { release(); }

  std::size_t blocks() const { return blocks_; }
  std::size_t seats() const { return seats_; }
  /// How long a seat waits for another before it gives up with an Error (default 300 s). Kept in
  /// the board: over a shared region, any process's set_timeout sets it for every process.
  void set_timeout(std::chrono::milliseconds t) { h_->timeout_ms.store(t.count()); }
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(h_->timeout_ms.load()); }

  /// Follower `seat` is about to read block b's host copy as version n: waits until the leader
  /// has published n, then runs then() under the block's lock (before any later write-back).
  /// Returns the block's generation (see generation()).
  template <class F>
  std::uint64_t await_published(std::size_t seat, std::size_t b, std::uint64_t n, F&& then) {
    Block& k = block(b);
    Lock lock(k, b);
    wait(lock, k, b, [&] { return k.published >= n || gone(0); }, [&] {
      return "seat " + std::to_string(seat) + " waited for streamed block " + std::to_string(b) +
             "'s host copy version " + std::to_string(n) + "; seat 0 has written back " + std::to_string(k.published);
    });
    if (k.published != n)
      throw Error("SharedHostMaster: seat " + std::to_string(seat) + " reads streamed block " + std::to_string(b) +
                  " as version " + std::to_string(n) + " but seat 0 has written back " + std::to_string(k.published) +
                  (gone(0) ? " and is gone" : "") + " (do all seats make the same calls?)");
    then();
    return k.generation;
  }

  /// Follower `seat` has begun the visit that counts write-back n of block b.
  void mark_begun(std::size_t seat, std::size_t b, std::uint64_t n) {
    Block& k = block(b);
    {
      Lock lock(k, b);
      begun(k)[check_seat(seat)] = n;
    }
    broadcast(k);
  }
  /// Follower `seat` has counted write-back n of block b (its visit ended).
  void mark_done(std::size_t seat, std::size_t b, std::uint64_t n) {
    Block& k = block(b);
    Lock lock(k, b);
    std::uint64_t& bg = begun(k)[check_seat(seat)];
    bg = std::max(bg, n);
    done(k)[seat] = n;
  }

  /// The leader is about to perform write-back n of block b: waits until every follower still
  /// present has begun its visit counting it, then runs then(seat) under the block's lock for
  /// each of them (before that follower can read version n).
  template <class F>
  void await_begun(std::size_t b, std::uint64_t n, F&& then) {
    Block& k = block(b);
    Lock lock(k, b);
    for (std::size_t s = 1; s < seats_; ++s) {
      wait(lock, k, b, [&] { return begun(k)[s] >= n || gone(s); }, [&] {
        return "seat 0 waited for seat " + std::to_string(s) + " to begin its visit counting write-back " +
               std::to_string(n) + " of streamed block " + std::to_string(b) + "; it has begun " +
               std::to_string(begun(k)[s]);
      });
      if (!gone(s)) then(s);
    }
  }

  /// The leader has issued write-back n of block b: record() under the block's lock (the event
  /// a reader waits on), then the version is published.
  template <class F>
  void publish(std::size_t b, std::uint64_t n, F&& record) {
    Block& k = block(b);
    {
      Lock lock(k, b);
      record();
      k.published = n;
    }
    broadcast(k);
  }

  /// Runs f() under block b's lock.
  template <class F>
  decltype(auto) locked(std::size_t b, F&& f) {
    Block& k = block(b);
    Lock lock(k, b);
    return f();
  }

  /// Versions the leader has published for block b.
  std::uint64_t published(std::size_t b) {
    return locked(b, [&] { return block(b).published; });
  }
  /// How many times the leader replaced block b's host copy outside the write-backs (set_group
  /// and the like): a follower's device copy uploaded under another generation is stale.
  std::uint64_t generation(std::size_t b) {
    return locked(b, [&] { return block(b).generation; });
  }

  /// Before the leader replaces block b's host copy outside the write-backs: every follower
  /// present must have counted exactly the leader's `n` write-backs of b (done, not begun
  /// another), or a ConfigError says the seats are not between the same calls; then() runs
  /// under the lock (once). The generation moves on.
  template <class F>
  void replace(std::size_t b, std::uint64_t n, F&& then) {
    Block& k = block(b);
    Lock lock(k, b);
    for (std::size_t s = 1; s < seats_; ++s)
      if (!gone(s) && (done(k)[s] != n || begun(k)[s] != n))
        throw ConfigError("seat", "seat 0 sets streamed block " + std::to_string(b) +
                                      " while seat " + std::to_string(s) + " has counted " +
                                      std::to_string(done(k)[s]) + " of its " + std::to_string(n) +
                                      " write-backs: set streamed blocks only while every seat stands "
                                      "between the same calls with nothing owed (e.g. after flush on all)");
    then();
    ++k.generation;
  }

  /// Seat `seat` is gone (its engine was destroyed): nobody waits for it any more. Takes every
  /// block's lock (a waiter checks between its predicate and its sleep), a dead seat's too.
  void leave(std::size_t seat) {
    gone_[check_seat(seat)].store(1);
    for (std::size_t b = 0; b < blocks_; ++b) {
      Block& k = block(b);
      const int rc = pthread_mutex_lock(&k.m);
      std::string trouble;
      if (rc == EOWNERDEAD) trouble = heal(k);  // leaving anyway: the partners still learn of it
      else if (rc != 0) throw Error(failed("pthread_mutex_lock", rc));
      if (const int r = pthread_cond_broadcast(&k.cv); r != 0 && trouble.empty())
        trouble = failed("pthread_cond_broadcast", r);
      if (const int r = pthread_mutex_unlock(&k.m); r != 0 && trouble.empty())
        trouble = failed("pthread_mutex_unlock", r);
      if (!trouble.empty()) throw Error(trouble);
    }
  }

 private:
  static constexpr std::uint64_t kMagic = 0x5a4f32424f415244;  // "ZO2BOARD"
  static constexpr std::uint32_t kLayout = 1;
  static constexpr std::size_t kMaxBlocks = std::size_t{1} << 32, kMaxSeats = std::size_t{1} << 16;

  static_assert(std::atomic<std::uint8_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free &&
                    std::atomic<std::int64_t>::is_always_lock_free,
                "a version board shared by processes needs lock-free atomics");

  /// The region's header; the creator stores `initialised` last (release), attach_to waits for it.
  struct alignas(64) Header {
    std::uint64_t magic;
    std::uint32_t layout;
    std::uint32_t reserved;
    std::uint64_t blocks, seats, bytes;
    std::atomic<std::int64_t> timeout_ms;
    std::atomic<std::uint32_t> initialised;
  };
  /// A block's shared state, followed in the region by its followers' begun[seats] and
  /// done[seats] counts (std::uint64_t; entry 0 unused).
  struct alignas(64) Block {
    pthread_mutex_t m;   // process-shared, robust
    pthread_cond_t cv;   // process-shared, CLOCK_MONOTONIC
    std::uint64_t published, generation;
    std::uint32_t dead;  // a seat died holding m: every later lock of the block throws
  };
  struct alignas(64) Line {
    std::byte bytes[64];
  };

  static constexpr std::size_t round_up(std::size_t n) { return (n + 63) / 64 * 64; }
  static constexpr std::size_t block_stride(std::size_t seats) {
    return round_up(sizeof(Block) + 2 * seats * sizeof(std::uint64_t));
  }

  /// Block b's lock, held until destroyed (exceptions never leave it locked). A block whose
  /// lock a dead seat held throws instead (see died()).
  class Lock {
   public:
    Lock(Block& k, std::size_t b) : k_(k) {
      const int rc = pthread_mutex_lock(&k.m);
      if (rc == EOWNERDEAD) {
        if (std::string trouble = heal(k); !trouble.empty()) {
          pthread_mutex_unlock(&k.m);
          throw Error(trouble);
        }
      } else if (rc != 0) {
        throw Error(failed("pthread_mutex_lock", rc));
      }
      if (k.dead) {  // (a constructor that throws runs no destructor)
        pthread_mutex_unlock(&k.m);
        throw died(b);
      }
      held_ = true;
    }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;
    ~Lock() {
      if (held_) pthread_mutex_unlock(&k_.m);
    }
    void lost() { held_ = false; }  // a failed wait that did not take the lock back

   private:
    Block& k_;
    bool held_ = false;
  };

  /// The lock came back from a seat that died holding it (EOWNERDEAD): the block is marked dead
  /// and the lock made usable, so that every seat, now or later, learns it; wakes the waiters.
  /// Returns what failed, or nothing; the lock stays held either way.
  static std::string heal(Block& k) {
    k.dead = 1;
    if (const int rc = pthread_mutex_consistent(&k.m); rc != 0) return failed("pthread_mutex_consistent", rc);
    if (const int rc = pthread_cond_broadcast(&k.cv); rc != 0) return failed("pthread_cond_broadcast", rc);
    return {};
  }
  static Error died(std::size_t b) {
    return Error("SharedHostMaster: a seat died while holding streamed block " + std::to_string(b) +
                 "'s lock (its process ended inside a call on the shared host master): the block's versions may be "
                 "half-written, every seat must stop");
  }
  static std::string failed(const char* call, int rc) {
    return std::string("VersionBoard: ") + call + " failed: " + std::strerror(rc);
  }
  static std::string hex(std::uint64_t v) {
    static const char* digits = "0123456789abcdef";
    std::string s = "0x";
    for (int i = 60; i >= 0; i -= 4) s += digits[(v >> i) & 15];
    return s;
  }

  static void check_seats(std::size_t seats) {
    if (seats < 1) throw ConfigError("seats", "a shared host master needs at least one seat");
  }
  static void check_region(void* region, std::size_t bytes) {
    if (!region) throw ConfigError("region", "a version board's region is null");
    if (reinterpret_cast<std::uintptr_t>(region) % alignof(Header) != 0)
      throw ConfigError("region", "a version board's region must be 64-byte aligned");
    if (bytes < sizeof(Header))
      throw ConfigError("bytes", "a version board's region of " + std::to_string(bytes) + " bytes holds no header");
  }
  std::size_t check_seat(std::size_t seat) const {
    if (seat >= seats_)
      throw std::out_of_range("VersionBoard: seat " + std::to_string(seat) + " of " + std::to_string(seats_));
    return seat;
  }

  VersionBoard() = default;

  /// Lays out the board in `region` (see create_in).
  void init(void* region, std::size_t bytes, std::size_t blocks, std::size_t seats) {
    const std::size_t need = region_bytes(blocks, seats);
    check_region(region, bytes);
    if (bytes < need)
      throw ConfigError("bytes", "a version board of " + std::to_string(blocks) + " blocks and " +
                                     std::to_string(seats) + " seats needs " + std::to_string(need) +
                                     " bytes, the region has " + std::to_string(bytes));
    auto* old = static_cast<Header*>(region);
    if (old->initialised.load(std::memory_order_acquire) != 0 && old->magic == kMagic)
      throw Error("VersionBoard: the region already holds a board (create_in once, attach_to from the other "
                  "processes)");
    std::memset(region, 0, need);
    auto* h = new (region) Header{};
    h->magic = kMagic;
    h->layout = kLayout;
    h->blocks = blocks;
    h->seats = seats;
    h->bytes = need;
    h->timeout_ms.store(300'000);

    struct Attrs {
      pthread_mutexattr_t m;
      pthread_condattr_t c;
      bool m_ok = false, c_ok = false;
      ~Attrs() {
        if (m_ok) pthread_mutexattr_destroy(&m);
        if (c_ok) pthread_condattr_destroy(&c);
      }
    } a;
    const auto call = [](const char* what, int rc) {
      if (rc != 0) throw Error(failed(what, rc));
    };
    call("pthread_mutexattr_init", pthread_mutexattr_init(&a.m));
    a.m_ok = true;
    call("pthread_mutexattr_setpshared", pthread_mutexattr_setpshared(&a.m, PTHREAD_PROCESS_SHARED));
    call("pthread_mutexattr_setrobust", pthread_mutexattr_setrobust(&a.m, PTHREAD_MUTEX_ROBUST));
    call("pthread_condattr_init", pthread_condattr_init(&a.c));
    a.c_ok = true;
    call("pthread_condattr_setpshared", pthread_condattr_setpshared(&a.c, PTHREAD_PROCESS_SHARED));
    call("pthread_condattr_setclock", pthread_condattr_setclock(&a.c, CLOCK_MONOTONIC));

    auto* base = static_cast<std::byte*>(region);
    for (std::size_t b = 0; b < blocks; ++b) {
      auto* k = new (base + sizeof(Header) + b * block_stride(seats)) Block{};
      call("pthread_mutex_init", pthread_mutex_init(&k->m, &a.m));
      call("pthread_cond_init", pthread_cond_init(&k->cv, &a.c));
    }
    auto* gone = base + sizeof(Header) + blocks * block_stride(seats);
    for (std::size_t s = 0; s < seats; ++s) new (gone + s) std::atomic<std::uint8_t>(0);
    h->initialised.store(1, std::memory_order_release);
    view(region);
  }

  /// Points this board at an initialised region.
  void view(void* region) {
    base_ = static_cast<std::byte*>(region);
    h_ = static_cast<Header*>(region);
    blocks_ = h_->blocks;
    seats_ = h_->seats;
    stride_ = block_stride(seats_);
    gone_ = reinterpret_cast<std::atomic<std::uint8_t>*>(base_ + sizeof(Header) + blocks_ * stride_);
  }

  void take(VersionBoard& o) noexcept {
    own_ = std::move(o.own_);
    base_ = std::exchange(o.base_, nullptr);
    h_ = std::exchange(o.h_, nullptr);
    blocks_ = std::exchange(o.blocks_, 0);
    seats_ = std::exchange(o.seats_, 0);
    stride_ = std::exchange(o.stride_, 0);
    gone_ = std::exchange(o.gone_, nullptr);
  }
  /// A heap board's mutexes and conditions end with it; a region's are left to the region (other
  /// processes may still use them, and unmapping is all Linux needs).
  void release() noexcept {
    if (own_ && h_)
      for (std::size_t b = 0; b < blocks_; ++b) {
        pthread_cond_destroy(&block(b).cv);
        pthread_mutex_destroy(&block(b).m);
      }
    own_.reset();
    base_ = nullptr;
    h_ = nullptr;
  }

  Block& block(std::size_t b) const {
    if (b >= blocks_)
      throw std::out_of_range("VersionBoard: streamed block " + std::to_string(b) + " of " + std::to_string(blocks_));
    return *std::launder(reinterpret_cast<Block*>(base_ + sizeof(Header) + b * stride_));
  }
  static std::uint64_t* begun(Block& k) {
    return reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::byte*>(&k) + sizeof(Block));
  }
  std::uint64_t* done(Block& k) const { return begun(k) + seats_; }
  bool gone(std::size_t s) const { return gone_[s].load() != 0; }

  void broadcast(Block& k) {
    if (const int rc = pthread_cond_broadcast(&k.cv); rc != 0) throw Error(failed("pthread_cond_broadcast", rc));
  }

  /// Sleeps on block b's condition (its lock held) until pred(), or throws the timeout's Error,
  /// or died() if a seat died holding the lock meanwhile.
  template <class Pred, class Say>
  void wait(Lock& lock, Block& k, std::size_t b, Pred pred, Say say) {
    const std::chrono::milliseconds t = timeout();
    timespec deadline{};
    if (clock_gettime(CLOCK_MONOTONIC, &deadline) != 0) throw Error(failed("clock_gettime", errno));
    if (t.count() > 0) {
      const auto secs = t.count() / 1000;
      deadline.tv_sec += static_cast<time_t>(secs);
      deadline.tv_nsec += static_cast<long>((t.count() - secs * 1000) * 1'000'000);
      if (deadline.tv_nsec >= 1'000'000'000) deadline.tv_sec += 1, deadline.tv_nsec -= 1'000'000'000;
    }
    while (!pred()) {
      if (k.dead) throw died(b);
      const int rc = pthread_cond_timedwait(&k.cv, &k.m, &deadline);
      if (rc == 0) continue;  // woken, maybe spuriously: check again
      if (rc == ETIMEDOUT) {
        if (pred()) break;
        throw Error("SharedHostMaster: " + say() + " for " + std::to_string(t.count()) +
                    " ms and gave up (do all seats make the same calls?)");
      }
      if (rc == EOWNERDEAD) {  // the lock is ours again, from a dead seat
        if (std::string trouble = heal(k); !trouble.empty()) throw Error(trouble);
        throw died(b);
      }
      if (rc == ENOTRECOVERABLE) lock.lost();
      throw Error(failed("pthread_cond_timedwait", rc));
    }
    if (k.dead) throw died(b);
  }

  std::unique_ptr<Line[]> own_;  // the heap region of a board built by VersionBoard(blocks, seats)
  std::byte* base_ = nullptr;    // the region
  Header* h_ = nullptr;
  std::size_t blocks_ = 0, seats_ = 0, stride_ = 0;
  std::atomic<std::uint8_t>* gone_ = nullptr;  // per seat, in the region
};

}  // namespace zo2::offload
