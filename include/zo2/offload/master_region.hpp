// zo2/offload/master_region.hpp -- the bytes of a shared host master that several processes map
// (POSIX shared memory: data-parallel ranks of one host, one GPU each; see
// shared_host_master.cuh's create_in_shared_memory / attach_to_shared_memory). Host only, no
// CUDA: the region is laid out and checked here, the CUDA side (events, registration) lives in
// seat_gate.cuh.
//
//   header   magic, format, the master's shape (what every seat's plan must match), seats, the
//            region's size, and `ready`, which the creating process sets last;
//   claims   one word per seat: 0 free, 1 being taken, 2 taken with its event handles written;
//   handles  seats x streamed blocks opaque event handles (kHandleBytes each: a
//            cudaIpcEventHandle_t), written by their seat before it is marked taken;
//   board    the VersionBoard (version_board.hpp) of the streamed blocks;
//   masters  the streamed blocks' encoded masters, then their rule state (PinnedBlocks' adopted
//   state  layout: chunks of whole blocks on page boundaries).
// Every part starts on a page boundary. A process that attaches checks the header field by field
// against its own plan and says which field differs (ConfigError naming it).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <thread>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2::offload {

/// What every seat of a shared host master must agree on.
struct MasterShape {
  std::uint64_t layout_fingerprint = 0;  // layout_fingerprint(model layout)
  std::uint64_t num_blocks = 0;
  std::uint64_t streamed_blocks = 0;
  std::uint64_t block_bytes = 0;        // one encoded block
  std::uint64_t block_state_bytes = 0;  // one block's rule state
  std::uint64_t writeback_every = 0;
  std::uint64_t rule_state_slots = 0;
  std::uint64_t state_value_bytes = 0;  // 4: fp32 rule state, 2: bf16
  std::uint64_t element_bytes = 0;      // sizeof(T) of the perturbed copies
  char codec[24] = {};                  // the codec's name, NUL-terminated

  void set_codec(const std::string& name) {
    if (name.size() >= sizeof(codec)) throw ConfigError("codec", "codec name '" + name + "' is too long");
    std::memset(codec, 0, sizeof(codec));
    std::memcpy(codec, name.data(), name.size());
  }
};

/// A hash of a model layout's groups (tensor names, shapes, weight-decay flags) and block count:
/// two processes with different models get different fingerprints (FNV-1a, 64 bits).
inline std::uint64_t layout_fingerprint(const ModelLayout& ml) {
  std::uint64_t h = 1469598103934665603ull;
  const auto mix = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  const auto mix_u64 = [&](std::uint64_t v) { mix(&v, sizeof v); };
  mix_u64(ml.num_blocks());
  for (GroupIndex g : {ml.prologue(), ml.block(0), ml.epilogue()}) {
    const ParamLayout& l = ml.layout(g);
    mix_u64(l.num_tensors());
    for (const TensorSpec& t : l.specs()) {
      mix_u64(t.name.size());
      mix(t.name.data(), t.name.size());
      mix_u64(t.shape.size());
      for (std::int64_t d : t.shape) mix_u64(static_cast<std::uint64_t>(d));
      mix_u64(t.weight_decay ? 1 : 0);
    }
  }
  return h;
}

/// Throws ConfigError(field) unless `mine` == `master`: "<who><field> is <mine>, the master's
/// <master><advice>".
inline void check_field(const char* field, std::uint64_t mine, std::uint64_t master, const std::string& who,
                        const std::string& advice) {
  if (mine != master)
    throw ConfigError(field, who + field + " is " + std::to_string(mine) + ", the master's " + std::to_string(master) +
                                 advice);
}

/// Throws ConfigError naming the first field in which a seat's shape `mine` differs from the
/// master's (the codec, then the sizes, then the layout's fingerprint: tensor names and shapes).
inline void check_same_shape(const MasterShape& mine, const MasterShape& master, const std::string& who,
                             const std::string& advice) {
  if (std::strncmp(mine.codec, master.codec, sizeof(mine.codec)) != 0)
    throw ConfigError("codec", who + "codec is " + std::string(mine.codec, strnlen(mine.codec, sizeof(mine.codec))) +
                                   ", the master's " +
                                   std::string(master.codec, strnlen(master.codec, sizeof(master.codec))) + advice);
  check_field("element_bytes", mine.element_bytes, master.element_bytes, who, advice);
  check_field("num_blocks", mine.num_blocks, master.num_blocks, who, advice);
  check_field("streamed_blocks", mine.streamed_blocks, master.streamed_blocks, who, advice);
  check_field("block_bytes", mine.block_bytes, master.block_bytes, who, advice);
  check_field("writeback_every", mine.writeback_every, master.writeback_every, who, advice);
  check_field("rule_state_slots", mine.rule_state_slots, master.rule_state_slots, who, advice);
  check_field("rule_state_bf16", mine.state_value_bytes, master.state_value_bytes, who, advice);
  check_field("block_state_bytes", mine.block_state_bytes, master.block_state_bytes, who, advice);
  check_field("layout", mine.layout_fingerprint, master.layout_fingerprint, who, advice);
}

/// Where each part of the region starts, and its size.
struct MasterRegionLayout {
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kHandleBytes = 64;

  std::size_t claims = 0, handles = 0, board = 0, masters = 0, state = 0, total = 0;

  /// `seats` seats, `blocks` streamed blocks, a board of `board_bytes`, masters and state of
  /// `masters_bytes` and `state_bytes` (PinnedBlocks::adopted_bytes).
  static MasterRegionLayout of(std::size_t seats, std::size_t blocks, std::size_t board_bytes, std::size_t masters_bytes,
                               std::size_t state_bytes);
};

/// The header at offset 0. Only `ready` and the claims are written after creation.
struct MasterRegionHeader {
  static constexpr std::uint64_t kMagic = 0x7a6f32686f73746dull;  // "zo2hostm"
  static constexpr std::uint32_t kFormat = 1;

  std::uint64_t magic = 0;
  std::uint32_t format = 0;
  std::atomic<std::uint32_t> ready{0};
  std::uint64_t seats = 0;
  std::uint64_t total_bytes = 0;
  MasterShape shape;
};
static_assert(std::atomic<std::uint32_t>::is_always_lock_free, "a shared region needs lock-free 32-bit atomics");

inline MasterRegionLayout MasterRegionLayout::of(std::size_t seats, std::size_t blocks, std::size_t board_bytes,
                                                 std::size_t masters_bytes, std::size_t state_bytes) {
  const auto up = [](std::size_t n) { return (n + kPage - 1) / kPage * kPage; };
  MasterRegionLayout l;
  l.claims = up(sizeof(MasterRegionHeader));
  l.handles = l.claims + up(seats * sizeof(std::atomic<std::uint32_t>));
  l.board = l.handles + up(seats * blocks * kHandleBytes);
  l.masters = l.board + up(board_bytes);
  l.state = l.masters + up(masters_bytes);
  l.total = l.state + up(state_bytes);
  return l;
}

/// A view of a mapped region (the mapping outlives it).
class MasterRegion {
 public:
  MasterRegion(unsigned char* base, std::size_t bytes, std::size_t seats, std::size_t blocks,
               const MasterRegionLayout& layout)
      : base_(base), bytes_(bytes), seats_(seats), blocks_(blocks), layout_(layout) {
    if (reinterpret_cast<std::uintptr_t>(base) % MasterRegionLayout::kPage != 0)
      throw Error("shared host master: the region is not page-aligned");
  }

  /// The creating process: writes the header (the rest of a fresh segment is zero), then ready.
  void initialize(const MasterShape& shape) {
    if (bytes_ < layout_.total)
      throw Error("shared host master: the region has " + std::to_string(bytes_) + " bytes, its layout needs " +
                  std::to_string(layout_.total));
    auto* h = new (base_) MasterRegionHeader();
    h->magic = MasterRegionHeader::kMagic;
    h->format = MasterRegionHeader::kFormat;
    h->seats = seats_;
    h->total_bytes = layout_.total;
    h->shape = shape;
    for (std::size_t s = 0; s < seats_; ++s) new (&claim_word(s)) std::atomic<std::uint32_t>(0);
  }
  /// The creating process, once the board is initialised: attaching processes may go on.
  void set_ready() { header().ready.store(1, std::memory_order_release); }

  /// The header once the creating process made the region ready (waits up to `wait`), checked
  /// to be a zo2 host master of this format.
  static const MasterRegionHeader& ready_header(const unsigned char* base, std::size_t bytes,
                                                std::chrono::milliseconds wait) {
    if (bytes < sizeof(MasterRegionHeader))
      throw Error("shared host master: the region has " + std::to_string(bytes) + " bytes, less than its header");
    const auto& h = *reinterpret_cast<const MasterRegionHeader*>(base);
    const auto deadline = std::chrono::steady_clock::now() + wait;
    while (h.ready.load(std::memory_order_acquire) == 0) {
      if (std::chrono::steady_clock::now() >= deadline)
        throw Error("shared host master: the region was not made ready within " + std::to_string(wait.count()) +
                    " ms (did seat 0's process fail while creating it?)");
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (h.magic != MasterRegionHeader::kMagic || h.format != MasterRegionHeader::kFormat)
      throw Error("shared host master: the region is not a zo2 host master of format " +
                  std::to_string(MasterRegionHeader::kFormat));
    return h;
  }

  /// An attaching process: waits up to `wait` for ready, then checks the header against `shape`
  /// and the seat count (ConfigError naming the first field that differs).
  void check(const MasterShape& shape, std::chrono::milliseconds wait) const {
    const MasterRegionHeader& h = ready_header(base_, bytes_, wait);
    const char* who = "shared host master: this process's ";
    const char* advice = " (every seat needs the same model and offload options)";
    check_field("seats", seats_, h.seats, who, advice);
    check_same_shape(shape, h.shape, who, advice);
    check_field("region_bytes", layout_.total, h.total_bytes, who, advice);
    if (bytes_ < layout_.total)
      throw Error("shared host master: the region has " + std::to_string(bytes_) + " bytes, its header says " +
                  std::to_string(layout_.total));
  }

  /// Takes seat `seat` (ConfigError if out of range or taken); publish_claim() after its handles
  /// are written.
  void claim(std::size_t seat) {
    if (seat >= seats_)
      throw ConfigError("seat", "the shared host master has " + std::to_string(seats_) + " seats, not seat " +
                                    std::to_string(seat));
    std::uint32_t free = 0;
    if (!claim_word(seat).compare_exchange_strong(free, 1, std::memory_order_acq_rel))
      throw ConfigError("seat", "seat " + std::to_string(seat) + " of the shared host master is taken");
  }
  void publish_claim(std::size_t seat) { claim_word(seat).store(2, std::memory_order_release); }
  /// Whether seat `seat` is taken and its handles are written.
  bool claimed(std::size_t seat) const {
    return claim_word(seat).load(std::memory_order_acquire) == 2;
  }
  /// The event handle of seat `seat` for streamed block b.
  unsigned char* handle(std::size_t seat, std::size_t b) const {
    return base_ + layout_.handles + (seat * blocks_ + b) * MasterRegionLayout::kHandleBytes;
  }

  unsigned char* board() const { return base_ + layout_.board; }
  unsigned char* masters() const { return base_ + layout_.masters; }
  unsigned char* state() const { return base_ + layout_.state; }
  const MasterRegionLayout& layout() const { return layout_; }

 private:
  MasterRegionHeader& header() const { return *reinterpret_cast<MasterRegionHeader*>(base_); }
  std::atomic<std::uint32_t>& claim_word(std::size_t seat) const {
    return *reinterpret_cast<std::atomic<std::uint32_t>*>(base_ + layout_.claims + seat * sizeof(std::atomic<std::uint32_t>));
  }

  unsigned char* base_;
  std::size_t bytes_, seats_, blocks_;
  MasterRegionLayout layout_;
};

}  // namespace zo2::offload
