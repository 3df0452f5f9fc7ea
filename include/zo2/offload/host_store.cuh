// zo2/offload/host_store.cuh -- where streamed blocks rest between visits: their encoded masters
// and their rule state in pinned host memory (pinned, so the copies run asynchronously at full
// PCIe rate on the copy engines).
//
// Streamed block i (0-based among the streamed blocks, i.e. group i + 1) has its master at
// master(i) (block_stride bytes) and its rule state at state(i) (state_stride bytes; fp32 or
// bf16, state[slot * total_elements + element]). Nothing here orders the copies: the slot cache
// (slot_cache.cuh) does.
//
// Pinned in chunks: each chunk holds whole blocks, at most kPinChunkBytes of them
// (at least one block), so a large model needs many moderate cudaMallocHost calls instead of
// one of hundreds of GB, which the driver may refuse (or take minutes to pin) where the pieces
// succeed; a block never straddles two chunks, so every copy is still one cudaMemcpyAsync.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>

namespace zo2::gpu::offload_detail {

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

/// Pinned host memory for `blocks` equal blocks of `stride` bytes, in chunks of whole blocks.
class PinnedBlocks {
 public:
  /// At most this many bytes per cudaMallocHost (unless one block is larger).
  static constexpr std::size_t kPinChunkBytes = std::size_t{1} << 30;

  void allocate(std::size_t blocks, std::size_t stride, const std::string& what) {
    chunks_.clear();
    stride_ = stride;
    per_chunk_ = 1;
    if (blocks == 0 || stride == 0) return;
    per_chunk_ = std::max<std::size_t>(1, kPinChunkBytes / stride);
    const std::size_t count = (blocks + per_chunk_ - 1) / per_chunk_;
    chunks_.reserve(count);
    for (std::size_t c = 0; c < count; ++c) {
      const std::size_t in_chunk = std::min(per_chunk_, blocks - c * per_chunk_);
      chunks_.push_back(pin_zeroed(in_chunk * stride,
                                   what + " (chunk " + std::to_string(c + 1) + " of " + std::to_string(count) + ", " +
                                       std::to_string(blocks * stride) + " bytes in all)"));
    }
  }
  void zero() {
    for (auto& chunk : chunks_)
      if (chunk.size()) std::memset(chunk.data(), 0, chunk.size());
  }
  void release() { chunks_.clear(); }
  bool empty() const { return chunks_.empty(); }
  /// Pinned bytes held.
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& chunk : chunks_) n += chunk.size();
    return n;
  }
  /// Block i's bytes (null when nothing was allocated: no blocks, or blocks of 0 bytes).
  unsigned char* block(std::size_t i) const {
    if (chunks_.empty()) return nullptr;
    return chunks_.at(i / per_chunk_).data() + (i % per_chunk_) * stride_;
  }

 private:
  std::vector<PinnedBuffer<unsigned char>> chunks_;
  std::size_t stride_ = 0, per_chunk_ = 1;
};

class HostStore {
 public:
  /// Room for `blocks` masters of `block_stride` bytes; `what` names them in an error.
  void allocate_masters(std::size_t blocks, std::size_t block_stride, const std::string& what) {
    masters_.release();
    masters_.allocate(blocks, block_stride, what);
  }
  /// Room for `blocks` rule states of `state_stride` bytes, zeroed (none for 0).
  void allocate_state(std::size_t blocks, std::size_t state_stride, const std::string& what) {
    state_.release();
    state_.allocate(blocks, state_stride, what);
  }
  void zero_state() { state_.zero(); }
  void release() {
    masters_.release();
    state_.release();
  }

  /// Pinned bytes held (masters and rule state).
  std::size_t pinned_bytes() const { return masters_.bytes() + state_.bytes(); }

  unsigned char* master(std::size_t i) const { return masters_.block(i); }
  unsigned char* state(std::size_t i) const { return state_.block(i); }

 private:
  PinnedBlocks masters_, state_;
};

}  // namespace zo2::gpu::offload_detail
