// zo2/offload/offload_plan.cuh -- what a HostOffload run chooses (OffloadOptions) and what it
// holds where as a consequence (OffloadPlan): device bytes, which blocks stay resident and which
// stream, how many slots, how much pinned host memory. Computed before anything is allocated, so
// a caller can size a run (and tests can check the bound) without a device allocation.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/offload/writeback_log.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>

namespace zo2::gpu {

struct OffloadOptions {
  /// Bytes of device memory the policy may hold (masters, slots, perturbed scratch, rule state;
  /// not the model's activations). 0: the minimum -- prologue, epilogue, scratch and `slots`
  /// slots, every block streams. Otherwise the bytes above the minimum buy a third slot
  /// (budget_adds_slot), then keep blocks resident (no transfer).
  std::size_t gpu_memory_budget = 0;
  /// Device slots blocks stream through (>= 2).
  std::size_t slots = 2;
  /// With a budget above the minimum and slots = 2, the first block's worth of it buys a third
  /// slot before any block stays resident, as long as at least half the blocks still stream (the
  /// slot saves a little on every streamed block; a resident block saves one block's transfer
  /// each way). With two slots, a slot's next upload waits for its write-back, so a block costs
  /// about (upload + fused kernel + write-back) / 2 and follows the concurrent PCIe bandwidth; a
  /// third slot decouples them (OPT-6.7B int8 on an H200: 0.151-0.171 s with two slots, 0.144 s
  /// with three; bench/results/h200-2026-12-02-int8-slots.jsonl).
  bool budget_adds_slot = true;
  /// Blocks uploaded ahead of the one being computed (1 <= depth <= slots - 1).
  std::size_t prefetch_depth = 1;
  /// One perturbed copy per group instead of two: the fused pass writes theta + eps z, and
  /// theta - eps z is written over it between the group's two forwards (materialize(): z is
  /// regenerated, one more pass over the group on the GPU, which the PCIe-bound step hides).
  /// Saves one block's and the prologue's size of device memory. false: both copies at once.
  bool one_perturbed_copy = true;
  /// Record a timeline of every visit (CUDA timing events; see timeline.cuh).
  bool record_timeline = false;
  /// Timing events in the pool (0: 6 per group visit for 3 steps).
  std::size_t timeline_events = 0;
  /// Per-element optimizer state values (fp32) the plan holds room for: 0 for the stateless
  /// rules (zo-sgd, zo-sign, zo-cons), 1 for zo-mmt, 2 for zo-adam. Counted in the plan and the
  /// budget. ZOOptimizer asks for what its rule needs (reserve_rule_state); when that differs
  /// from this, the policy re-plans then, and if the number of resident blocks changes it moves
  /// every master (holding a second copy of the streamed ones in host memory meanwhile): set it
  /// up front for a large model.
  unsigned rule_state_slots = 0;
  /// Keep the rule state in bf16 instead of fp32 (each value rounded to nearest bf16 after every
  /// update, wherever it rests): half the state's host memory, device memory and PCIe traffic
  /// (zo-adam streams 8 bytes of state per parameter in fp32, 4 in bf16). The rule reads and
  /// computes in fp32 as before; only what it stores is rounded.
  bool rule_state_bf16 = false;
  /// Write a streamed block back to host memory every K visits that update it instead of every
  /// one (deferred write-back, offload/writeback_log.hpp): the device-to-host traffic drops to
  /// ~1/K, the host copy lags by at most K - 1 updates, which the next upload of the block
  /// replays on the device (update-only passes, bit-identical to K = 1) before the visit's pass.
  /// Pays where the link's duplex is slower than one way. 1: every visit (no lag); 0: the plan
  /// picks K from `link` (offload::choose_writeback_every: 1 for an unknown link).
  unsigned writeback_every = 1;
  /// The prologue's perturbed copy shares the blocks' and the epilogue's scratch instead of
  /// having its own: saves the prologue's size of device memory in T (a LLaMA-family token
  /// embedding: 1.6 GB in bf16 at Qwen3-32B). Only for a model whose epilogue does not read the
  /// prologue's parameters (an untied LM head: zo2::epilogue_reads_prologue(model) is false), as
  /// the views prepare()/current() hand out for the prologue are then overwritten by the first
  /// block's; ZOOptimizer refuses the combination otherwise.
  bool prologue_scratch_shared = false;
  /// The measured link, for writeback_every = 0 (HostOffload measures nothing itself:
  /// zo2_bench passes what it measured, zo2-opt offload/link_probe.cuh's measure_link()).
  offload::LinkHint link{};
};

/// What a plan holds on the device and the host.
struct OffloadPlan {
  std::size_t block_bytes = 0;        // one encoded block: what crosses PCIe each way per visit
  unsigned state_slots = 0;           // rule state values per parameter
  unsigned state_value_bytes = 4;     // 4: fp32 state, 2: bf16 (OffloadOptions::rule_state_bf16)
  std::size_t block_state_bytes = 0;  // one block's rule state: crosses PCIe with it (0: none)
  /// prologue + epilogue masters, their rule state and the perturbed scratch
  std::size_t fixed_bytes = 0;
  bool prologue_scratch_shared = false;  // OffloadOptions::prologue_scratch_shared
  std::size_t minimum_bytes = 0;      // fixed + options.slots slots (budget 0)
  std::size_t resident_blocks = 0;
  std::size_t streamed_blocks = 0;
  std::size_t slots = 0;
  std::size_t arena_bytes = 0;        // the device allocation holding the masters, scratch and slots
  std::size_t state_arena_bytes = 0;  // the device allocation holding the rule state (0: none)
  std::size_t table_bytes = 0;        // the kernels' tables and (packed codec) scratch: separate allocations
  /// Upper bound of the device memory the policy's allocations take from cudaMemGetInfo's
  /// point of view (each allocation rounded up to the 2 MiB the driver maps in).
  std::size_t device_bound_bytes = 0;
  std::size_t host_pinned_bytes = 0;  // streamed blocks' masters and their rule state
  std::size_t host_state_bytes = 0;   // of which the rule state
  /// Visits that update a streamed block per write-back of it (OffloadOptions::writeback_every,
  /// or the plan's pick from the link for 0); 1 when nothing streams.
  unsigned writeback_every = 1;
  /// Device bytes of one slot or resident block: the encoded block and its rule state.
  std::size_t slot_bytes() const { return block_bytes + block_state_bytes; }
  /// Device bytes of every allocation (arenas, tables, codec scratch), before the driver's rounding.
  std::size_t device_bytes() const { return arena_bytes + state_arena_bytes + table_bytes; }
};

namespace offload_detail {

inline std::size_t align_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

/// Alignment of every buffer carved from an arena (and of the sizes the plan counts).
inline constexpr std::size_t kArenaAlignment = 256;

inline void validate_options(const OffloadOptions& opt) {
  if (opt.slots < 2) throw ConfigError("slots", "HostOffload needs at least 2 device slots (one computing, one uploading)");
  if (opt.prefetch_depth < 1 || opt.prefetch_depth > opt.slots - 1)
    throw ConfigError("prefetch_depth", "must be between 1 and slots - 1 = " + std::to_string(opt.slots - 1));
  if (opt.writeback_every != 0) offload::validate_writeback_every(opt.writeback_every);
}

/// The write-back interval a plan uses: the options' K, or the link's pick for 0.
inline unsigned resolve_writeback_every(const OffloadOptions& opt) {
  return opt.writeback_every != 0 ? opt.writeback_every : offload::choose_writeback_every(opt.link);
}

/// The plan for layout `ml` under `opt`. GroupCodecT: the codec's group type (bytes(),
/// total_elements()); Pass: its device pass (device_passes.cuh: the device memory it allocates
/// beside the arena); T: the precision of the perturbed copies.
template <class GroupCodecT, class Pass, class T>
OffloadPlan make_plan(const ModelLayout& ml, const OffloadOptions& opt) {
  validate_options(opt);
  constexpr std::size_t A = kArenaAlignment;
  OffloadPlan p;
  const GroupCodecT pro(ml.layout(ml.prologue())), blk(ml.layout(ml.block(0))), epi(ml.layout(ml.epilogue()));
  p.block_bytes = align_up(blk.bytes(), A);
  p.state_slots = opt.rule_state_slots;
  p.state_value_bytes = opt.rule_state_bf16 ? 2 : 4;
  const auto state_bytes = [&](const GroupCodecT& c) {
    return align_up(std::size_t{p.state_slots} * c.total_elements() * p.state_value_bytes, A);
  };
  p.block_state_bytes = state_bytes(blk);
  const std::size_t fixed_state = state_bytes(pro) + state_bytes(epi);
  p.prologue_scratch_shared = opt.prologue_scratch_shared;
  const std::size_t copies = opt.one_perturbed_copy ? 1 : 2;
  const std::size_t pro_scratch = align_up(pro.total_elements() * sizeof(T), A);
  const std::size_t shared_scratch = align_up(
      std::max({blk.total_elements(), epi.total_elements(), p.prologue_scratch_shared ? pro.total_elements() : 0}) *
          sizeof(T),
      A);
  p.fixed_bytes = align_up(pro.bytes(), A) + align_up(epi.bytes(), A) + fixed_state +
                  copies * ((p.prologue_scratch_shared ? 0 : pro_scratch) + shared_scratch);
  const std::size_t per_block = p.slot_bytes();
  p.minimum_bytes = p.fixed_bytes + opt.slots * per_block;
  const std::size_t n = ml.num_blocks();
  std::size_t slots = opt.slots;
  if (opt.gpu_memory_budget == 0) {
    p.resident_blocks = 0;
  } else {
    if (opt.gpu_memory_budget < p.minimum_bytes)
      throw ConfigError("gpu_memory_budget",
                        "HostOffload needs at least " + std::to_string(p.minimum_bytes) + " bytes (" +
                            std::to_string(p.minimum_bytes >> 20) + " MiB: prologue, epilogue, perturbed scratch and " +
                            std::to_string(opt.slots) + " slots of " + std::to_string(per_block) + " bytes" +
                            (p.state_slots ? " with their rule state" : "") + "); got " +
                            std::to_string(opt.gpu_memory_budget) + " (0 means the minimum)");
    // All blocks resident needs no slots at all.
    if (opt.gpu_memory_budget >= p.fixed_bytes + n * per_block) {
      p.resident_blocks = n;
    } else {
      std::size_t extra = (opt.gpu_memory_budget - p.minimum_bytes) / per_block;
      if (opt.budget_adds_slot && slots == 2 && extra >= 1 && 2 * (extra - 1) <= n) {
        slots = 3;
        --extra;
      }
      p.resident_blocks = std::min(n, extra);
    }
  }
  p.streamed_blocks = n - p.resident_blocks;
  p.slots = p.streamed_blocks == 0 ? 0 : slots;
  p.state_arena_bytes = p.state_slots ? fixed_state + (p.resident_blocks + p.slots) * p.block_state_bytes : 0;
  p.arena_bytes = p.fixed_bytes - fixed_state + (p.resident_blocks + p.slots) * p.block_bytes;
  const std::size_t tables = 3;  // one tensor table per layout (prologue, block, epilogue)
  p.table_bytes = tables * A;    // a few KiB; accounted at 2 MiB each below
  constexpr std::size_t kMiB2 = std::size_t{2} << 20;
  p.device_bound_bytes = align_up(p.arena_bytes, kMiB2) + align_up(p.state_arena_bytes, kMiB2) + tables * kMiB2;
  // What a codec's pass allocates beyond its table (the packed codec's escape-list scratch).
  for (const GroupCodecT* c : {&pro, &blk, &epi}) {
    const std::size_t bytes = Pass::extra_device_bytes(*c);
    if (bytes == 0 && Pass::kExtraAllocations == 0) continue;
    p.table_bytes += bytes;
    p.device_bound_bytes += align_up(bytes, kMiB2) + Pass::kExtraAllocations * kMiB2;
  }
  p.host_state_bytes = p.streamed_blocks * p.block_state_bytes;
  p.writeback_every = p.streamed_blocks == 0 ? 1 : resolve_writeback_every(opt);
  p.host_pinned_bytes = p.streamed_blocks * p.block_bytes + p.host_state_bytes;
  return p;
}

}  // namespace offload_detail
}  // namespace zo2::gpu
