// zo2/offload/slot_cache.cuh -- the device slots streamed blocks pass through, and the events
// that order every copy of a streamed block against the kernels that read and write it.
//
// A slot holds one block's encoded master and, for a stateful rule, its rule state. A visit of
// streamed block i:
//   upload stream   wait the slot's `freed` (its previous block is done with it) and block i's
//                   `written` (the host copy holds its last write-back); H2D master (and state)
//                   -> slot; record `uploaded`. Issued ahead of the visit (prefetch), LRU eviction.
//   compute stream  wait `uploaded`; the pass over the slot (the caller launches it).
//   offload stream  (only when the pass applied an update) D2H slot -> host: the first
//                   head_bytes() after the pass's body_done (packed codec: the body and the state
//                   are final before its escape lists are sorted), the rest after the whole pass
//                   (kernel_done); record block i's `written`.
//   free            record `freed` once the compute stream's reads of the slot (the pass, and
//                   materialize()'s passes while the slot is held) and the write-back are done.
// So the host copy and the slot are never raced, and the upload of block i+1 overlaps the
// compute of block i and the write-back of block i-1 (H2D and D2H use separate copy engines).
// Block i's upload for step t+1 may be issued while step t still runs (prefetch wraps around):
// it waits on block i's `written` and on its slot's `freed`.
//
// Deferred write-back (OffloadOptions::writeback_every > 1): a visit that skips its write-back
// records no `written` and frees the slot on the compute stream alone; the block's next upload
// still waits on the `written` of its last write-back (already complete, or in flight), which
// is the copy the host holds. A slot remembers whether its contents came from the host since
// the block's last visit (`fresh`): only such a slot lacks what the host copy lacks, and the
// caller replays those updates (writeback_log.hpp) on the compute stream after `uploaded`; a
// slot still holding the block from its last visit is current.
//
// A seat of a shared host master (shared_host_master.cuh) passes its SeatGate: every upload
// then waits for the host copy's version the seat counts, and a write-back is the leader's D2H
// (after the followers' uploads of that version) or, on a follower, only counted: no D2H, the
// slot is freed as after a skipped write-back.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/offload/host_store.cuh>
#include <zo2/offload/seat_gate.cuh>
#include <zo2/offload/timeline.cuh>

namespace zo2::gpu::offload_detail {

struct Slot {
  unsigned char* data = nullptr;
  void* state = nullptr;  // room for its block's rule state (null without state)
  long block = -1;         // group index held (or being uploaded), -1: none
  bool fresh = false;      // uploaded from the host copy and not visited since (see the file comment)
  std::uint64_t last_use = 0;
  Event uploaded, freed;
  int upload_start = -1, upload_end = -1;  // timeline marks of the upload that filled it
};

class SlotCache {
 public:
  /// The streams the copies and passes run on, and the timeline that marks them (kept).
  void attach(cudaStream_t compute, cudaStream_t upload, cudaStream_t offload, Timeline* timeline) {
    compute_ = compute;
    upload_ = upload;
    offload_ = offload;
    timeline_ = timeline;
  }
  /// A seat's gate (null: a lone engine with its own host store).
  void set_gate(SeatGate* gate) { gate_ = gate; }

  /// Slots over `data` (and `state`: one room per slot, or empty without state) for
  /// `streamed_blocks` blocks resting in `host` (groups 1..streamed_blocks), each `master_bytes`
  /// of encoded master and `state_bytes` of state; every slot empty.
  void reset(const HostStore* host, std::size_t master_bytes, std::size_t state_bytes,
             const std::vector<unsigned char*>& data, const std::vector<void*>& state, std::size_t streamed_blocks,
             std::size_t prefetch_depth) {
    host_ = host;
    master_bytes_ = master_bytes;
    state_bytes_ = state_bytes;
    streamed_ = streamed_blocks;
    prefetch_depth_ = prefetch_depth;
    slots_ = std::vector<Slot>(data.size());
    for (std::size_t i = 0; i < data.size(); ++i) {
      slots_[i].data = data[i];
      slots_[i].state = state.empty() ? nullptr : state[i];
    }
    written_ = std::vector<Event>(streamed_blocks);
    current_ = held_ = nullptr;
  }
  /// New state rooms (after the rule state was allocated anew): every slot is emptied.
  void set_state_rooms(const std::vector<void*>& state, std::size_t state_bytes) {
    state_bytes_ = state_bytes;
    for (std::size_t i = 0; i < slots_.size(); ++i) slots_[i].state = state.empty() ? nullptr : state[i];
    invalidate_all();
  }

  /// The slot holding (or uploading) group `group`, or null.
  Slot* find(std::size_t group) {
    for (auto& s : slots_)
      if (s.block == static_cast<long>(group)) return &s;
    return nullptr;
  }
  /// Forgets group `group`'s copy on the device (its host copy changed); every slot.
  void invalidate(std::size_t group) {
    for (auto& s : slots_)
      if (s.block == static_cast<long>(group)) s.block = -1;
  }
  void invalidate_all() {
    for (auto& s : slots_) s.block = -1;
  }

  /// Starts the visit of streamed group `group`: its slot (uploaded now unless already there or
  /// on its way), ordered on the compute stream; the upload's timeline marks go into `m`.
  /// `from_host`: whether the slot's contents are the host copy's (uploaded since the block's
  /// last visit), so that what the host copy lacks must be replayed before they are used.
  /// `writes_back`: the visit will end with a write-back (a seat tells its partners).
  Slot& begin(std::size_t group, Timeline::Marks& m, bool& from_host, bool writes_back = false) {
    Slot& s = ensure_uploaded(group, nullptr);
    if (gate_) gate_->begin_visit(group - 1, writes_back);
    s.last_use = ++use_clock_;
    s.uploaded.wait_on(compute_);
    from_host = std::exchange(s.fresh, false);
    m.upload_start = std::exchange(s.upload_start, -1);
    m.upload_end = std::exchange(s.upload_end, -1);
    current_ = &s;
    return s;
  }
  /// Whether a visit of a streamed group is open (begin() without end()).
  bool visiting() const { return current_ != nullptr; }
  /// A visit of a device-resident group starts: no slot is being visited (also after a visit
  /// that threw before its end()).
  void begin_resident() { current_ = nullptr; }

  /// Ends the visit of streamed group `group` after its pass was launched on the compute
  /// stream: the write-back (when the pass applied an update; `head` bytes of the master may go
  /// after body_done(), see the file comment), then the slot is freed unless `hold` (freed by
  /// release_held(), when materialize() has read it), and the next blocks are prefetched.
  /// `visit`: the timeline visit that gets the write-back's marks (may be null).
  void end(std::size_t group, bool write_back, bool hold, std::size_t head, Timeline::Marks* visit) {
    Slot& s = *current_;
    if (write_back && gate_ && !gate_->leader()) {
      gate_->after_write_back(group - 1, offload_);  // the leader's D2H of this visit writes the same bytes
      write_back = false;
    }
    if (write_back) {
      if (gate_) gate_->before_write_back(group - 1, offload_);
      unsigned char* host = host_->master(group - 1);
      if (head) body_done_.wait_on(offload_);
      const int start = timeline_->mark(offload_);
      if (head) {
        ZO2_CUDA_CHECK(cudaMemcpyAsync(host, s.data, head, cudaMemcpyDeviceToHost, offload_));
        write_back_state(group, s);  // final with the body
      }
      kernel_done_.record(compute_);
      kernel_done_.wait_on(offload_);
      ZO2_CUDA_CHECK(cudaMemcpyAsync(host + head, s.data + head, master_bytes_ - head, cudaMemcpyDeviceToHost, offload_));
      if (!head) write_back_state(group, s);
      const int stop = timeline_->mark(offload_);
      if (visit) {
        visit->offload_start = start;
        visit->offload_end = stop;
      }
      written_[group - 1].record(offload_);
      if (gate_) gate_->after_write_back(group - 1, offload_);
      offloaded_ += master_bytes_;
    }
    held_ = &s;
    held_written_back_ = write_back;
    if (!hold) release_held();
    prefetch_after(group - 1, &s);
    current_ = nullptr;
  }

  /// Whether `s` is the slot a visit left held.
  bool holds(const Slot* s) const { return s && s == held_; }
  /// Frees the held slot for the next upload once everything enqueued so far that reads it
  /// (the passes on the compute stream, the write-back on the offload stream) is done.
  void release_held() {
    if (!held_) return;
    if (held_written_back_) {
      reads_done_.record(compute_);
      reads_done_.wait_on(offload_);
      held_->freed.record(offload_);
    } else {
      held_->freed.record(compute_);
    }
    held_ = nullptr;
  }

  /// The first prefetch_depth streamed blocks of the next step: their uploads overlap the
  /// epilogue and the prologue.
  void prefetch_first() {
    const std::size_t depth = std::min(prefetch_depth_, streamed_);
    for (std::size_t k = 0; k < depth; ++k) ensure_uploaded(1 + k, nullptr);
  }

  /// Recorded by a pass once the first head bytes and the rule state are final.
  const Event* body_done() const { return &body_done_; }
  /// Drops the slots' upload marks (a new timeline recording starts).
  void clear_marks() {
    for (auto& s : slots_) s.upload_start = s.upload_end = -1;
  }
  std::size_t bytes_uploaded() const { return uploaded_; }
  std::size_t bytes_offloaded() const { return offloaded_; }
  void reset_traffic() { uploaded_ = offloaded_ = 0; }

 private:
  /// Puts streamed group `group` into a slot (issuing its upload if it is not already there or
  /// on its way) and returns the slot. `keep` is not evicted.
  Slot& ensure_uploaded(std::size_t group, const Slot* keep) {
    if (Slot* s = find(group)) {
      // A prefetch hit is a use to come: without the refresh, a block uploaded several visits
      // ahead (depth >= 3) would look least recently used and be evicted before its visit.
      s->last_use = ++use_clock_;
      return *s;
    }
    Slot* victim = nullptr;
    for (auto& s : slots_)
      if (&s != keep && (!victim || s.last_use < victim->last_use)) victim = &s;
    Slot& s = *victim;
    s.block = static_cast<long>(group);
    s.fresh = true;
    s.last_use = ++use_clock_;
    s.freed.wait_on(upload_);              // the slot's previous block is done with it
    written_[group - 1].wait_on(upload_);  // the host copy holds its last write-back
    if (gate_) gate_->before_upload(group - 1, upload_);
    s.upload_start = timeline_->mark(upload_);
    ZO2_CUDA_CHECK(cudaMemcpyAsync(s.data, host_->master(group - 1), master_bytes_, cudaMemcpyHostToDevice, upload_));
    uploaded_ += master_bytes_;
    if (state_bytes_) {  // the block's rule state travels with it, under the same events
      ZO2_CUDA_CHECK(cudaMemcpyAsync(s.state, host_->state(group - 1), state_bytes_, cudaMemcpyHostToDevice, upload_));
      uploaded_ += state_bytes_;
    }
    if (gate_) gate_->after_upload(group - 1, upload_);
    s.upload_end = timeline_->mark(upload_);
    s.uploaded.record(upload_);
    return s;
  }

  /// Issues uploads of the next prefetch_depth streamed blocks after streamed block
  /// `streamed_index` (cyclically: the first blocks of the next step follow the last one).
  void prefetch_after(std::size_t streamed_index, const Slot* keep) {
    const std::size_t n = streamed_;
    const std::size_t depth = std::min(prefetch_depth_, n > 0 ? n - 1 : 0);
    for (std::size_t k = 1; k <= depth; ++k) ensure_uploaded(1 + (streamed_index + k) % n, keep);
  }

  /// D2H of slot s's rule state into streamed group `group`'s, on the offload stream.
  void write_back_state(std::size_t group, const Slot& s) {
    if (!state_bytes_) return;
    ZO2_CUDA_CHECK(cudaMemcpyAsync(host_->state(group - 1), s.state, state_bytes_, cudaMemcpyDeviceToHost, offload_));
    offloaded_ += state_bytes_;
  }

  cudaStream_t compute_ = nullptr, upload_ = nullptr, offload_ = nullptr;
  Timeline* timeline_ = nullptr;
  SeatGate* gate_ = nullptr;
  const HostStore* host_ = nullptr;
  std::size_t master_bytes_ = 0, state_bytes_ = 0, streamed_ = 0, prefetch_depth_ = 1;
  std::vector<Slot> slots_;
  std::vector<Event> written_;  // per streamed block: its last write-back
  std::uint64_t use_clock_ = 0;
  Slot* current_ = nullptr;
  Slot* held_ = nullptr;  // visited, not yet freed (see end())
  bool held_written_back_ = false;
  Event kernel_done_, body_done_, reads_done_;
  std::size_t uploaded_ = 0, offloaded_ = 0;
};

}  // namespace zo2::gpu::offload_detail
