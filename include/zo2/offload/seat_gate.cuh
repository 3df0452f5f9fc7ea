// zo2/offload/seat_gate.cuh -- one seat's side of a shared pinned host master
// (shared_host_master.cuh): what the seats share (SharedMasterCore: the host store, the plan
// and layout they must use, the version board, the seats' CUDA events), and SeatGate, which a
// seat's slot cache calls around every copy of a streamed block so that the copy reads or
// replaces the version of the host copy its own count says (version_board.hpp).
//
// Events: the leader records, per streamed block, `written` on its offload stream after each
// write-back; a follower records, per streamed block, `uploaded` on its upload stream after each
// upload. Each seat creates its events on its own device; a stream of another device may wait on
// them (cudaStreamWaitEvent), and every record or wait of a block's event happens under that
// block's lock on the board, so a wait always sees the record the board's counts describe.
// Across processes the events are interprocess ones: a seat writes their handles into the shared
// region when it joins, and a partner process opens them (cudaIpcOpenEventHandle) the first time
// it needs one; a record in one process and a wait in another are ordered by the same lock.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/offload/host_store.cuh>
#include <zo2/offload/master_region.hpp>
#include <zo2/offload/offload_plan.cuh>
#include <zo2/offload/shm_region.hpp>
#include <zo2/offload/version_board.hpp>

namespace zo2::gpu::offload_detail {

/// What the seats of one shared host master share: in one process (the seats are threads), or
/// across the processes of one host (each maps the master's POSIX shared memory; the board, the
/// masters, the rule state and the seats' event handles live there: master_region.hpp).
class SharedMasterCore {
 public:
  /// In one process: pinned masters and rule state for `plan`'s streamed blocks of `layout`,
  /// zeroed, shared by `seats` seats of codec `codec`.
  SharedMasterCore(const ModelLayout& layout, const OffloadPlan& plan, std::size_t seats, std::string codec)
      : layout_(layout), plan_(plan), codec_(std::move(codec)),
        board_(std::make_unique<offload::VersionBoard>(plan.streamed_blocks, seats)), events_(seats),
        claimed_(seats, false) {
    shape_ = shape_of(layout, plan, codec_, 0);
    store_.allocate_masters(plan.streamed_blocks, plan.block_bytes,
                            std::to_string(plan.streamed_blocks) + " shared streamed blocks of " +
                                std::to_string(plan.block_bytes) + " bytes in codec " + codec_);
    store_.allocate_state(plan.streamed_blocks, plan.block_state_bytes,
                          "the rule state of " + std::to_string(plan.streamed_blocks) + " shared streamed blocks");
  }

  /// Across processes: the master in POSIX shared memory `name`, created here (`create`: seat
  /// 0's process; zeroed) or attached (another seat's process: waits up to `wait` for it to
  /// exist and be ready, then checks its shape against this process's layout and plan,
  /// ConfigError naming the field that differs). `element_bytes`: sizeof(T).
  SharedMasterCore(const ModelLayout& layout, const OffloadPlan& plan, std::size_t seats, std::string codec,
                   std::size_t element_bytes, const std::string& name, bool create, std::chrono::milliseconds wait)
      : layout_(layout), plan_(plan), codec_(std::move(codec)), events_(seats), claimed_(seats, false),
        imported_(seats) {
    if (seats < 1) throw ConfigError("seats", "a shared host master needs at least one seat");
    const std::size_t blocks = plan.streamed_blocks;
    shape_ = shape_of(layout, plan, codec_, element_bytes);
    const std::size_t board_bytes = offload::VersionBoard::region_bytes(blocks, seats);
    const auto layout_of_region = offload::MasterRegionLayout::of(
        seats, blocks, board_bytes, PinnedBlocks::adopted_bytes(blocks, plan.block_bytes),
        PinnedBlocks::adopted_bytes(blocks, plan.block_state_bytes));
    if (create) {
      shm_ = std::make_unique<offload::ShmRegion>(offload::ShmRegion::create(name, layout_of_region.total));
    } else {
      shm_ = std::make_unique<offload::ShmRegion>(offload::ShmRegion::attach(name, 0, wait));
    }
    region_ = std::make_unique<offload::MasterRegion>(static_cast<unsigned char*>(shm_->data()), shm_->size(), seats,
                                                       blocks, layout_of_region);
    if (create) {
      region_->initialize(shape_);
      board_ = std::make_unique<offload::VersionBoard>(
          offload::VersionBoard::create_in(region_->board(), board_bytes, blocks, seats));
    } else {
      region_->check(shape_, wait);
      board_ = std::make_unique<offload::VersionBoard>(
          offload::VersionBoard::attach_to(region_->board(), board_bytes, wait));
    }
    store_.adopt(region_->masters(), region_->state(), blocks, plan.block_bytes, plan.block_state_bytes,
                 std::to_string(blocks) + " streamed blocks of the shared host master '" + name + "'");
    if (create) region_->set_ready();
  }

  HostStore& store() { return store_; }
  offload::VersionBoard& board() { return *board_; }
  const OffloadPlan& plan() const { return plan_; }
  const ModelLayout& layout() const { return layout_; }
  std::size_t seats() const { return board_->seats(); }
  std::size_t pinned_bytes() const { return store_.pinned_bytes(); }
  /// Whether the seats are processes (the master lives in shared memory).
  bool across_processes() const { return region_ != nullptr; }
  /// Across processes, in the creating process: removes the shared memory's name now (every
  /// mapping stays; nobody can attach any more), so that a process that dies leaves nothing in
  /// /dev/shm. Call it once every seat's process has attached. Elsewhere it does nothing.
  void remove_name() {
    if (shm_) shm_->unlink();
  }

  /// Throws ConfigError unless a seat's layout and plan match the master's (naming the field).
  void check_seat(std::size_t seat, const ModelLayout& ml, const OffloadPlan& p) const {
    offload::check_same_shape(shape_of(ml, p, codec_, shape_.element_bytes), shape_,
                              "seat " + std::to_string(seat) + " of the shared host master: its ",
                              " (every seat needs the master's model and options)");
  }

  /// Seat `seat` joins with its per-block events (ConfigError if out of range or taken). Across
  /// processes the events are interprocess ones: their handles go into the region before the
  /// seat is marked taken there.
  void claim(std::size_t seat, std::vector<cudaEvent_t> events) {
    std::lock_guard lock(m_);
    if (seat >= claimed_.size())
      throw ConfigError("seat", "the shared host master has " + std::to_string(claimed_.size()) + " seats, not seat " +
                                    std::to_string(seat));
    if (claimed_[seat]) throw ConfigError("seat", "seat " + std::to_string(seat) + " of the shared host master is taken");
    if (region_) {
      region_->claim(seat);
      static_assert(sizeof(cudaIpcEventHandle_t) <= offload::MasterRegionLayout::kHandleBytes);
      for (std::size_t b = 0; b < events.size(); ++b) {
        cudaIpcEventHandle_t h{};
        ZO2_CUDA_CHECK(cudaIpcGetEventHandle(&h, events[b]));
        std::memcpy(region_->handle(seat, b), &h, sizeof h);
      }
      region_->publish_claim(seat);
    }
    claimed_[seat] = true;
    events_[seat] = std::move(events);
  }
  /// Seat `seat` is gone: its events are forgotten, nobody waits for it. (leave() takes every
  /// block's lock, under which a partner uses an event: none still holds one of these after.)
  void release(std::size_t seat) {
    {
      std::lock_guard lock(m_);
      events_[seat].clear();
    }
    board_->leave(seat);
  }
  /// Seat `seat`'s event of streamed block b (null before it joined or after it left). Across
  /// processes, another process's seat's events are opened from their handles when first asked
  /// for after it joined.
  cudaEvent_t event(std::size_t seat, std::size_t b) {
    std::lock_guard lock(m_);
    if (b < events_[seat].size()) return events_[seat][b];
    if (!region_ || claimed_[seat]) return nullptr;  // one of this process's seats, not (or no longer) there
    if (imported_[seat].empty() && region_->claimed(seat)) {
      std::vector<Event> opened;
      opened.reserve(plan_.streamed_blocks);
      for (std::size_t i = 0; i < plan_.streamed_blocks; ++i) {
        cudaIpcEventHandle_t h{};
        std::memcpy(&h, region_->handle(seat, i), sizeof h);
        opened.push_back(Event::open_ipc(h));
      }
      imported_[seat] = std::move(opened);
    }
    return b < imported_[seat].size() ? imported_[seat][b].get() : nullptr;
  }

  /// The shape a layout and plan give a master of codec `codec` (element_bytes: sizeof(T)).
  static offload::MasterShape shape_of(const ModelLayout& layout, const OffloadPlan& plan, const std::string& codec,
                                       std::size_t element_bytes) {
    offload::MasterShape shape;
    shape.layout_fingerprint = offload::layout_fingerprint(layout);
    shape.num_blocks = layout.num_blocks();
    shape.streamed_blocks = plan.streamed_blocks;
    shape.block_bytes = plan.block_bytes;
    shape.block_state_bytes = plan.block_state_bytes;
    shape.writeback_every = plan.writeback_every;
    shape.rule_state_slots = plan.state_slots;
    shape.state_value_bytes = plan.state_value_bytes;
    shape.element_bytes = element_bytes;
    shape.set_codec(codec);
    return shape;
  }

 private:
  ModelLayout layout_;
  OffloadPlan plan_;
  std::string codec_;
  offload::MasterShape shape_;  // what every seat's layout and plan must match
  // Across processes: the mapping, the view of it, then what lives in it (destroyed first).
  std::unique_ptr<offload::ShmRegion> shm_;
  std::unique_ptr<offload::MasterRegion> region_;
  std::unique_ptr<offload::VersionBoard> board_;
  HostStore store_;
  mutable std::mutex m_;
  std::vector<std::vector<cudaEvent_t>> events_;  // per seat of this process, per streamed block
  std::vector<bool> claimed_;                     // seats taken in this process
  std::vector<std::vector<Event>> imported_;      // across processes: other processes' seats' events
};

/// One seat's side of the protocol (see the file comment and shared_host_master.cuh).
class SeatGate {
 public:
  /// Joins `core` as seat `seat`; its events are created on the current device.
  SeatGate(std::shared_ptr<SharedMasterCore> core, std::size_t seat)
      : core_(std::move(core)), seat_(seat), count_(core_->plan().streamed_blocks, 0),
        seen_(core_->plan().streamed_blocks, 0) {
    events_.reserve(count_.size());
    std::vector<cudaEvent_t> handles;
    for (std::size_t b = 0; b < count_.size(); ++b) {
      events_.push_back(core_->across_processes() ? Event::interprocess() : Event());
      handles.push_back(events_.back().get());
    }
    core_->claim(seat_, std::move(handles));
  }
  SeatGate(const SeatGate&) = delete;
  SeatGate& operator=(const SeatGate&) = delete;
  ~SeatGate() { core_->release(seat_); }

  bool leader() const { return seat_ == 0; }
  std::size_t seat() const { return seat_; }
  SharedMasterCore& core() const { return *core_; }
  /// Write-backs of streamed block b this seat has performed (leader) or counted (follower).
  std::uint64_t count(std::size_t b) const { return count_.at(b); }

  // ---- the slot cache's hooks ------------------------------------------------------------------

  /// Before the H2D of streamed block b on `upload`: a follower waits for the version its count
  /// says and orders the copy after the leader's write-back of it.
  void before_upload(std::size_t b, cudaStream_t upload) {
    if (leader()) return;
    seen_[b] = core_->board().await_published(seat_, b, count_[b], [&] {
      if (cudaEvent_t e = core_->event(0, b)) ZO2_CUDA_CHECK(cudaStreamWaitEvent(upload, e, 0));
    });
  }
  /// After the H2D (master and state) of streamed block b on `upload`.
  void after_upload(std::size_t b, cudaStream_t upload) {
    if (leader()) return;
    core_->board().locked(b, [&] { events_[b].record(upload); });
  }
  /// A visit of streamed block b has its slot (its upload issued); `writes_back`: the visit
  /// ends with a write-back.
  void begin_visit(std::size_t b, bool writes_back) {
    if (!leader() && writes_back) core_->board().mark_begun(seat_, b, count_[b] + 1);
  }
  /// Before the leader's D2H of streamed block b on `offload`: waits until every follower has
  /// begun the same visit, and orders the copy after their uploads of b.
  void before_write_back(std::size_t b, cudaStream_t offload) {
    core_->board().await_begun(b, count_[b] + 1, [&](std::size_t s) {
      if (cudaEvent_t e = core_->event(s, b)) ZO2_CUDA_CHECK(cudaStreamWaitEvent(offload, e, 0));
    });
  }
  /// A visit of streamed block b wrote it back (leader: its D2H is issued on `offload`) or, on
  /// a follower, would have.
  void after_write_back(std::size_t b, cudaStream_t offload) {
    const std::uint64_t n = ++count_[b];
    if (leader()) core_->board().publish(b, n, [&] { events_[b].record(offload); });
    else core_->board().mark_done(seat_, b, n);
  }

  // ---- reads and writes of the host copy outside the streams -----------------------------------

  /// Whether a follower's device copy of streamed block b may predate a replacement of the host
  /// copy by the leader (set_group and the like): drop it then.
  bool stale(std::size_t b) const { return !leader() && core_->board().generation(b) != seen_[b]; }
  /// Before a follower reads streamed block b's host copy on the host: waits for the version its
  /// count says and for the leader's write-back of it to land.
  void await_host(std::size_t b) {
    if (leader()) return;
    core_->board().await_published(seat_, b, count_[b], [&] {
      if (cudaEvent_t e = core_->event(0, b)) ZO2_CUDA_CHECK(cudaEventSynchronize(e));
    });
  }
  /// Before the leader replaces streamed block b's host copy on the host: every follower must
  /// stand where the leader does (ConfigError otherwise), and its uploads of b have landed.
  void replace(std::size_t b) {
    core_->board().replace(b, count_[b], [&] {
      for (std::size_t s = 1; s < core_->seats(); ++s)
        if (cudaEvent_t e = core_->event(s, b)) ZO2_CUDA_CHECK(cudaEventSynchronize(e));
    });
  }

 private:
  std::shared_ptr<SharedMasterCore> core_;
  std::size_t seat_;
  std::vector<std::uint64_t> count_;  // per streamed block: write-backs performed or counted
  std::vector<std::uint64_t> seen_;   // per streamed block: the generation of the last upload
  std::vector<Event> events_;         // leader: `written`; follower: `uploaded` (per streamed block)
};

}  // namespace zo2::gpu::offload_detail
