// zo2/offload/shared_host_master.cuh -- one pinned host master shared by several offload
// engines of one process: data-parallel replicas on N GPUs, each a HostOffload driven by its
// own thread, hold the streamed blocks (and their rule state) in host memory once instead of N
// times.
//
//   zo2::gpu::SharedHostMaster<Codec, T> shared(layout, options, 2);      // the pinned master
//   HostOffload<Codec, T> seat0(store, options, stream0, shared.seat(0));  // device 0: the leader
//   HostOffload<Codec, T> seat1(store, options, stream1, shared.seat(1));  // device 1: a follower
//   // one thread per seat: a ZOOptimizer over each, the same seed, configuration and calls
//
// Replicas apply identical updates, so their blocks are identical bytes. Seat 0 (the leader) is
// the only one that writes a streamed block back (D2H); the others (followers) only upload. Every
// seat keeps its own WritebackLog on the same schedule, so a follower's visit that the schedule
// says writes back is counted as written back without a D2H: the leader's write-back at the same
// visit puts the same bytes on the host. Every seat therefore replays the same owed updates, and
// every replica stays bit-identical to a lone HostOffload.
//
// Versions (offload/version_board.hpp, offload/seat_gate.cuh): block b's host copy is at
// version n after the leader's n-th write-back of it; each seat counts its own write-backs of b
// (performed or counted: prepare's scheduled ones, apply_update, settle). Then
//   - a follower's upload of b, issued when it counts n, waits (on the host) until the leader
//     has published n, and its H2D waits for the leader's D2H of version n (a CUDA event);
//   - the leader's write-back n + 1 of b waits (on the host) until every follower has begun
//     its visit counting write-back n + 1 (so every upload it needs of version n is issued),
//     and its D2H waits for those uploads;
//   - the rule state travels with its block under the same events.
// A wait that outlasts set_wait_timeout() (300 s) throws an Error naming seat, block and
// versions instead of hanging.
//
// Processes: create_in_shared_memory / attach_to_shared_memory put the master in POSIX shared
// memory (master_region.hpp: the board with process-shared robust locks, the seats' interprocess
// event handles, the masters and rule state, registered with CUDA in each process), so the ranks
// of one host that mpirun starts, one GPU each, hold it once. The protocol is the same; a seat
// whose process dies stops its partners with the board's timeout Error instead of a hang.
//
// Devices: each seat's thread makes its device current (cudaSetDevice) before it builds its
// engine and before its calls; the seats' events may be waited on from any device of the
// process, and pinned memory is portable across devices under unified addressing (every 64-bit
// platform CUDA supports).
//
// The contract (what replicated training does anyway):
//   - every seat makes the same sequence of calls (prepare, materialize, current, apply_update,
//     settle; the optimizer's step and flush) with the same arguments;
//   - every seat uses the master's codec, T, layout and plan (streamed blocks, block bytes,
//     writeback_every, rule_state_slots, rule_state_bf16): checked when a seat is built
//     (ConfigError naming the difference). Slots, prefetch depth and the perturbed copies may
//     differ; the budget only as far as the streamed blocks stay the same;
//   - streamed blocks' host copies are set through the leader only (load, set_group,
//     set_group_encoded, set_rule_state, reserve_rule_state), while no follower is inside a
//     call and every seat stands after the same calls with nothing owed (before the threads
//     start, or behind a barrier after flush on every seat); a follower's load() sets its
//     device-resident groups only, its set_group* / set_rule_state of a streamed group throws
//     ConfigError. A follower reads a streamed group (get_group*, get_rule_state, store_to) when
//     its host copy lags nothing (e.g. after flush), else an Error says so;
//   - a seat's reserve_rule_state cannot change the number of state values (the master holds
//     them): create the master with the rule_state_slots the optimizer needs.
//
// No deadlock. A follower blocks only in an upload (or host read) of b that needs version n,
// issued after its own visit W counted write-back n, i.e. after W in the common call order; the
// leader publishes n at its own W. The leader blocks only in a write-back n + 1 at its visit V,
// until each follower begins its V. If the leader waits at V for a follower that waits for the
// leader to pass W, the follower has passed W but not begun V (so W precedes V), while the
// leader is at V but not past W (so V precedes W): impossible. Followers never wait for each
// other, and a barrier every seat reaches at the same point of the calls (a communicator's
// all-reduce at the end of a step) keeps this: whoever waits there has passed every visit before
// it, which is all its partner can be waiting for. Prefetch changes nothing: an upload of b is
// issued ahead but expects the count of the moment it is issued, and no write-back of b comes
// between it and the visit that uses it (a block is never prefetched into its own visit:
// prefetch_after skips the block being visited), so the upload a visit uses is issued before
// the visit marks itself begun. The same holds for any prefetch depth, for slot-cache hits (no
// upload: nothing to wait for, and the begin mark comes at once), and for the epilogue's
// prefetch of the next step's first blocks (it expects the counts after this step's visits,
// which the leader publishes in this step). On the device, the leader's D2H n + 1 waits for
// uploads that waited for its D2H n: the waits follow the versions and have no cycle.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/device_passes.cuh>
#include <zo2/offload/offload_plan.cuh>
#include <zo2/offload/seat_gate.cuh>

namespace zo2::gpu {

/// Seat `index` of a shared host master: pass it to HostOffload's constructor.
template <offload::ElementCodec Codec, class T>
struct SharedSeat {
  std::shared_ptr<offload_detail::SharedMasterCore> core;
  std::size_t index = 0;
};

/// The pinned host master of `seats` HostOffload<Codec, T> engines (see the file comment).
template <offload::ElementCodec Codec, class T>
class SharedHostMaster {
 public:
  using GroupCodecT = typename offload::GroupCodecOf<Codec>::type;
  using Pass = typename offload_detail::DevicePassOf<Codec, T>::type;

  /// Allocates the pinned masters (zero) and rule state of the streamed blocks the plan for
  /// `layout` under `options` gives; every seat must plan the same (see the file comment).
  SharedHostMaster(const ModelLayout& layout, const OffloadOptions& options, std::size_t seats)
      : core_(std::make_shared<offload_detail::SharedMasterCore>(
            layout, offload_detail::make_plan<GroupCodecT, Pass, T>(layout, options), seats, Codec::name)) {}

  /// Across the processes of one host (data-parallel ranks, one GPU each): seat 0's process
  /// creates the master in POSIX shared memory `name` ("/zo2-..."; the name is removed when this
  /// process's last holder of the master is gone; other processes keep their mappings), and
  /// every other seat's process attaches to it (attach_to_shared_memory). Each process then
  /// builds its HostOffload over seat(its index): the protocol is the in-process one, with the
  /// board in the shared memory (process-shared robust locks) and interprocess CUDA events.
  /// Host memory: the masters and rule state exist once on the host, however many processes.
  static SharedHostMaster create_in_shared_memory(const std::string& name, const ModelLayout& layout,
                                                  const OffloadOptions& options, std::size_t seats) {
    return SharedHostMaster(std::make_shared<offload_detail::SharedMasterCore>(
        layout, offload_detail::make_plan<GroupCodecT, Pass, T>(layout, options), seats, Codec::name, sizeof(T), name,
        true, std::chrono::milliseconds(0)));
  }
  /// Another seat's process: waits up to `wait` for seat 0's process to create and ready the
  /// master `name`, then checks that this process's layout and plan match it (ConfigError naming
  /// the field that differs).
  static SharedHostMaster attach_to_shared_memory(const std::string& name, const ModelLayout& layout,
                                                  const OffloadOptions& options, std::size_t seats,
                                                  std::chrono::milliseconds wait = std::chrono::minutes(5)) {
    return SharedHostMaster(std::make_shared<offload_detail::SharedMasterCore>(
        layout, offload_detail::make_plan<GroupCodecT, Pass, T>(layout, options), seats, Codec::name, sizeof(T), name,
        false, wait));
  }

  /// The write-back interval of the master `name` (its plan's; waits up to `wait` for it to be
  /// ready): another seat's process that lets the plan pick it from the link asks for this
  /// instead of measuring its own.
  static unsigned writeback_every_of(const std::string& name, std::chrono::milliseconds wait) {
    const auto shm = offload::ShmRegion::attach(name, 0, wait);
    return static_cast<unsigned>(
        offload::MasterRegion::ready_header(static_cast<const unsigned char*>(shm.data()), shm.size(), wait)
            .shape.writeback_every);
  }

  /// Seat i (0: the leader). Each seat is taken by one engine (ConfigError for a second).
  SharedSeat<Codec, T> seat(std::size_t i) const {
    if (i >= seats())
      throw ConfigError("seat", "the shared host master has " + std::to_string(seats()) + " seats, not seat " +
                                    std::to_string(i));
    return {core_, i};
  }
  std::size_t seats() const { return core_->seats(); }
  /// The plan every seat must match.
  const OffloadPlan& plan() const { return core_->plan(); }
  /// The creating process, once every seat's process has attached (e.g. after a barrier):
  /// removes the shared memory's name (the mappings stay), so a crash leaves nothing in
  /// /dev/shm. Otherwise the name goes when this process's last holder of the master does.
  void remove_name() { core_->remove_name(); }
  /// Whether the seats are processes (create_in_shared_memory / attach_to_shared_memory).
  bool across_processes() const { return core_->across_processes(); }
  /// Pinned host bytes of the masters and their rule state (once, for all seats).
  std::size_t pinned_bytes() const { return core_->pinned_bytes(); }
  /// How long a seat waits for another before it throws (default 300 s). Set before the seats
  /// start.
  void set_wait_timeout(std::chrono::milliseconds t) { core_->board().set_timeout(t); }

 private:
  explicit SharedHostMaster(std::shared_ptr<offload_detail::SharedMasterCore> core) : core_(std::move(core)) {}

  std::shared_ptr<offload_detail::SharedMasterCore> core_;
};

}  // namespace zo2::gpu
