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
#include <cstdint>
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

/// Pinned host memory for `blocks` equal blocks of `stride` bytes, in chunks of whole blocks:
/// allocated here (allocate), or memory the caller maps (adopt: a shared-memory segment several
/// processes use), registered with CUDA chunk by chunk.
class PinnedBlocks {
 public:
  /// At most this many bytes per cudaMallocHost or cudaHostRegister (unless one block is larger).
  static constexpr std::size_t kPinChunkBytes = std::size_t{1} << 30;
  /// Adopted chunks start on page boundaries: two registrations never share a page.
  static constexpr std::size_t kPageBytes = 4096;

  void allocate(std::size_t blocks, std::size_t stride, const std::string& what) {
    release();
    shape(blocks, stride);
    if (blocks == 0 || stride == 0) return;
    const std::size_t count = (blocks + per_chunk_ - 1) / per_chunk_;
    chunks_.reserve(count);
    for (std::size_t c = 0; c < count; ++c) {
      const std::size_t in_chunk = std::min(per_chunk_, blocks - c * per_chunk_);
      chunks_.push_back(pin_zeroed(in_chunk * stride,
                                   what + " (chunk " + std::to_string(c + 1) + " of " + std::to_string(count) + ", " +
                                       std::to_string(blocks * stride) + " bytes in all)"));
      starts_.push_back(chunks_.back().data());
    }
  }

  /// Bytes adopt() uses for `blocks` blocks of `stride` bytes (chunks padded to whole pages).
  static std::size_t adopted_bytes(std::size_t blocks, std::size_t stride) {
    if (blocks == 0 || stride == 0) return 0;
    const std::size_t per = per_chunk(stride);
    return (blocks + per - 1) / per * chunk_pitch(per, stride);
  }
  /// Uses `base` (page-aligned, adopted_bytes(blocks, stride) bytes, owned by the caller and
  /// outliving this) for the blocks and registers it with CUDA chunk by chunk. Its content is
  /// kept (another process may have written it).
  void adopt(unsigned char* base, std::size_t blocks, std::size_t stride, const std::string& what) {
    release();
    shape(blocks, stride);
    if (blocks == 0 || stride == 0) return;
    if (reinterpret_cast<std::uintptr_t>(base) % kPageBytes != 0)
      throw Error("HostOffload: the shared memory for " + what + " is not page-aligned");
    const std::size_t count = (blocks + per_chunk_ - 1) / per_chunk_, pitch = chunk_pitch(per_chunk_, stride);
    registrations_.reserve(count);
    for (std::size_t c = 0; c < count; ++c) {
      const std::size_t in_chunk = std::min(per_chunk_, blocks - c * per_chunk_);
      unsigned char* start = base + c * pitch;
      try {
        registrations_.emplace_back(start, in_chunk * stride);
      } catch (const CudaError& e) {
        throw Error("HostOffload: cannot pin the shared memory of " + what + " (chunk " + std::to_string(c + 1) +
                    " of " + std::to_string(count) + "): " + e.what());
      }
      starts_.push_back(start);
    }
  }

  void zero() {
    for (std::size_t c = 0; c < starts_.size(); ++c) std::memset(starts_[c], 0, chunk_size(c));
  }
  void release() {
    chunks_.clear();
    registrations_.clear();
    starts_.clear();
  }
  bool empty() const { return starts_.empty(); }
  /// Pinned bytes held (allocated or registered).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (std::size_t c = 0; c < starts_.size(); ++c) n += chunk_size(c);
    return n;
  }
  /// Block i's bytes (null when nothing was allocated: no blocks, or blocks of 0 bytes).
  unsigned char* block(std::size_t i) const {
    if (starts_.empty()) return nullptr;
    return starts_.at(i / per_chunk_) + (i % per_chunk_) * stride_;
  }

 private:
  static std::size_t per_chunk(std::size_t stride) { return std::max<std::size_t>(1, kPinChunkBytes / stride); }
  static std::size_t chunk_pitch(std::size_t per, std::size_t stride) {
    return (per * stride + kPageBytes - 1) / kPageBytes * kPageBytes;
  }
  void shape(std::size_t blocks, std::size_t stride) {
    blocks_ = blocks;
    stride_ = stride;
    per_chunk_ = stride ? per_chunk(stride) : 1;
  }
  std::size_t chunk_size(std::size_t c) const {
    return std::min(per_chunk_, blocks_ - c * per_chunk_) * stride_;
  }

  std::vector<PinnedBuffer<unsigned char>> chunks_;  // allocate(): owned
  std::vector<HostRegistration> registrations_;      // adopt(): registered, owned by the caller
  std::vector<unsigned char*> starts_;               // each chunk's first byte
  std::size_t blocks_ = 0, stride_ = 0, per_chunk_ = 1;
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
  /// The masters and rule state in memory the caller maps (see PinnedBlocks::adopt): masters at
  /// `masters`, state at `state`, each PinnedBlocks::adopted_bytes long.
  void adopt(unsigned char* masters, unsigned char* state, std::size_t blocks, std::size_t block_stride,
             std::size_t state_stride, const std::string& what) {
    release();
    masters_.adopt(masters, blocks, block_stride, what);
    state_.adopt(state, blocks, state_stride, "the rule state of " + what);
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
