// zo2/offload/host_store.cuh -- where streamed blocks rest between visits: their encoded masters
// and their rule state in pinned host memory (pinned, so the copies run asynchronously at full
// PCIe rate on the copy engines).
//
// Streamed block i (0-based among the streamed blocks, i.e. group i + 1) has its master at
// master(i), block_stride bytes apart, and its rule state at state(i), state_stride bytes
// apart (state[slot * total_elements + element], fp32 or bf16). Nothing here orders the copies: the
// slot cache (slot_cache.cuh) does.
#pragma once

#include <cstddef>
#include <cstring>
#include <fstream>
#include <string>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>

namespace zo2::cuda::offload_detail {

/// Host memory the kernel says is available (MemAvailable), or 0 when unknown.
inline std::size_t host_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  std::size_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

/// Pinned host memory, zeroed, or an Error that says what it was for and how much is available.
inline PinnedBuffer<unsigned char> pin_zeroed(std::size_t bytes, const std::string& what) {
  PinnedBuffer<unsigned char> buffer;
  // MemAvailable only informs the message: some hosts grow their memory as it is used, so it
  // may read less than the allocation would get.
  try {
    buffer = PinnedBuffer<unsigned char>(bytes);
  } catch (const CudaError& e) {
    const std::size_t avail = host_available_bytes();
    throw Error("HostOffload: cannot pin " + std::to_string(bytes) + " bytes (" + std::to_string(bytes >> 20) +
                " MiB) of host memory for " + what +
                (avail ? " (MemAvailable: " + std::to_string(avail >> 20) + " MiB)" : std::string()) +
                "; use a smaller codec or a larger gpu_memory_budget: " + e.what());
  }
  if (bytes) std::memset(buffer.data(), 0, bytes);
  return buffer;
}

class HostStore {
 public:
  /// Room for `blocks` masters of `block_stride` bytes; `what` names them in an error.
  void allocate_masters(std::size_t blocks, std::size_t block_stride, const std::string& what) {
    masters_ = {};
    block_stride_ = block_stride;
    if (blocks * block_stride) masters_ = pin_zeroed(blocks * block_stride, what);
  }
  /// Room for `blocks` rule states of `state_stride` bytes, zeroed (none for 0).
  void allocate_state(std::size_t blocks, std::size_t state_stride, const std::string& what) {
    state_ = {};
    state_stride_ = state_stride;
    if (blocks * state_stride) state_ = pin_zeroed(blocks * state_stride, what);
  }
  void zero_state() {
    if (state_.size()) std::memset(state_.data(), 0, state_.size());
  }
  void release() {
    masters_ = {};
    state_ = {};
  }

  unsigned char* master(std::size_t i) const { return masters_.data() + i * block_stride_; }
  unsigned char* state(std::size_t i) const { return state_.data() + i * state_stride_; }

 private:
  PinnedBuffer<unsigned char> masters_, state_;
  std::size_t block_stride_ = 0, state_stride_ = 0;
};

}  // namespace zo2::cuda::offload_detail
