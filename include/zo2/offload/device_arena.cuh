// zo2/offload/device_arena.cuh -- HostOffload's device memory: two allocations made once, carved
// as the plan (offload_plan.cuh) counts them, so nothing is allocated on the device after start.
//
//   arena        prologue master, epilogue master (encoded), the perturbed scratch (the
//                prologue's unless it shares the other, and one shared by the blocks and the
//                epilogue; one copy or two),
//                the resident blocks' masters, the slots streamed blocks pass through;
//   state arena  (stateful rules only) the rule state of the prologue, the epilogue, each
//                resident block and each slot: state[slot * total_elements + element], fp32
//                or bf16 (OffloadPlan::state_value_bytes).
// Every buffer starts at a multiple of kArenaAlignment (256) bytes.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/offload/offload_plan.cuh>

namespace zo2::gpu::offload_detail {

/// What the arena carves by, per group kind (0: prologue, 1: block, 2: epilogue).
struct GroupSizes {
  std::size_t encoded_bytes[3];
  std::size_t elements[3];
};

template <class T>
class DeviceArena {
 public:
  struct Scratch {
    T* plus = nullptr;
    T* minus = nullptr;  // == plus with one perturbed copy
  };

  /// Allocates the arena of `plan` and zeroes it on `stream`. Throws OutOfMemory.
  void allocate(const OffloadPlan& plan, const GroupSizes& sizes, bool one_copy, cudaStream_t stream) {
    arena_ = {};
    arena_ = DeviceBuffer<unsigned char>(plan.arena_bytes);
    ZO2_CUDA_CHECK(cudaMemsetAsync(arena_.data(), 0, plan.arena_bytes, stream));
    unsigned char* p = arena_.data();
    const auto take = [&](std::size_t bytes) {
      unsigned char* r = p;
      p += align_up(bytes, kArenaAlignment);
      return r;
    };
    prologue_master_ = take(sizes.encoded_bytes[0]);
    epilogue_master_ = take(sizes.encoded_bytes[2]);
    const bool share = plan.prologue_scratch_shared;
    const std::size_t shared =
        std::max({sizes.elements[1], sizes.elements[2], share ? sizes.elements[0] : std::size_t{0}});
    if (!share) {
      scratch_[0].plus = reinterpret_cast<T*>(take(sizes.elements[0] * sizeof(T)));
      scratch_[0].minus = one_copy ? scratch_[0].plus : reinterpret_cast<T*>(take(sizes.elements[0] * sizeof(T)));
    }
    scratch_[1].plus = reinterpret_cast<T*>(take(shared * sizeof(T)));
    scratch_[1].minus = one_copy ? scratch_[1].plus : reinterpret_cast<T*>(take(shared * sizeof(T)));
    if (share) scratch_[0] = scratch_[1];
    resident_masters_.clear();
    for (std::size_t i = 0; i < plan.resident_blocks; ++i) resident_masters_.push_back(take(plan.block_bytes));
    slot_data_.clear();
    for (std::size_t i = 0; i < plan.slots; ++i) slot_data_.push_back(take(plan.block_bytes));
  }

  /// Allocates the rule state's arena of `plan` (nothing without state) and zeroes it on
  /// `stream`. Throws OutOfMemory.
  void allocate_state(const OffloadPlan& plan, const GroupSizes& sizes, cudaStream_t stream) {
    state_arena_ = {};
    prologue_state_ = epilogue_state_ = nullptr;
    resident_states_.assign(plan.resident_blocks, nullptr);
    slot_states_.assign(plan.slots, nullptr);
    state_bytes_ = plan.state_arena_bytes;
    if (plan.state_slots == 0) return;
    state_arena_ = DeviceBuffer<unsigned char>(plan.state_arena_bytes);
    ZO2_CUDA_CHECK(cudaMemsetAsync(state_arena_.data(), 0, plan.state_arena_bytes, stream));
    unsigned char* p = state_arena_.data();
    const auto take = [&](int kind) {
      void* r = p;
      p += align_up(std::size_t{plan.state_slots} * sizes.elements[kind] * plan.state_value_bytes, kArenaAlignment);
      return r;
    };
    prologue_state_ = take(0);
    epilogue_state_ = take(2);
    for (auto& r : resident_states_) r = take(1);
    for (auto& s : slot_states_) s = take(1);
  }
  /// Frees the rule state's arena.
  void release_state() {
    state_arena_ = {};
    prologue_state_ = epilogue_state_ = nullptr;
    resident_states_.clear();
    slot_states_.clear();
    state_bytes_ = 0;
  }
  void zero_state(cudaStream_t stream) {
    if (state_bytes_) ZO2_CUDA_CHECK(cudaMemsetAsync(state_arena_.data(), 0, state_bytes_, stream));
  }
  void release() {
    arena_ = {};
    state_arena_ = {};
    resident_masters_.clear();
    slot_data_.clear();
    resident_states_.clear();
    slot_states_.clear();
    prologue_master_ = epilogue_master_ = nullptr;
    prologue_state_ = epilogue_state_ = nullptr;
    state_bytes_ = 0;
  }

  unsigned char* prologue_master() const { return prologue_master_; }
  unsigned char* epilogue_master() const { return epilogue_master_; }
  unsigned char* resident_master(std::size_t i) const { return resident_masters_.at(i); }
  void* prologue_state() const { return prologue_state_; }
  void* epilogue_state() const { return epilogue_state_; }
  void* resident_state(std::size_t i) const { return resident_states_.empty() ? nullptr : resident_states_.at(i); }
  /// Slot i's block room and state room (null without state).
  const std::vector<unsigned char*>& slot_data() const { return slot_data_; }
  const std::vector<void*>& slot_states() const { return slot_states_; }
  /// 0: the prologue's scratch (scratch 1 itself with OffloadPlan::prologue_scratch_shared), 1:
  /// the one the blocks and the epilogue share.
  const Scratch& scratch(int i) const { return scratch_[i]; }

 private:
  DeviceBuffer<unsigned char> arena_, state_arena_;
  unsigned char* prologue_master_ = nullptr;
  unsigned char* epilogue_master_ = nullptr;
  std::vector<unsigned char*> resident_masters_, slot_data_;
  void* prologue_state_ = nullptr;
  void* epilogue_state_ = nullptr;
  std::vector<void*> resident_states_, slot_states_;
  std::size_t state_bytes_ = 0;
  Scratch scratch_[2];
};

}  // namespace zo2::gpu::offload_detail
