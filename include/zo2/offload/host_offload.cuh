// zo2/offload/host_offload.cuh -- HostOffload<Codec, T>: the ZO2 offload engine.
//
// Where parameters rest: the prologue and epilogue, and as many blocks as the GPU memory budget
// allows, stay on the device; every other block's master rests in pinned host memory in the
// codec's format (codecs.hpp) and streams through a fixed pool of device slots, crossing PCIe
// once per step each way. Nothing is allocated on the device after construction.
//
// One visit of a streamed block i (prepare, called by ZOOptimizer once per group per step):
//   upload stream   H2D host master[i] -> slot            (issued ahead: prefetch depth >= 1)
//   compute stream  wait upload; ONE fused kernel: decode the slot, apply the update owed from
//                   the previous step, write the updated master back into the slot (encoded,
//                   stochastic rounding), write theta + eps z in T into the perturbed scratch;
//                   the model's + forward of block i; materialize(): theta - eps z over the same
//                   scratch (z regenerated from the slot); the - forward (both enqueued by the
//                   caller). With one_perturbed_copy = false the fused kernel writes both copies.
//   offload stream  wait kernel; D2H slot -> host master[i]; the slot is free for the next upload
//                   once that copy and the materialize() pass are done
// so the upload of block i+1 overlaps the compute of block i, and the offload of block i
// overlaps it too (H2D and D2H use separate copy engines).
//
// Write-back, not a host-side update. The alternative -- upload theta only, and let the CPU
// apply the owed update to its master -- halves PCIe traffic but puts Philox (z and the SR
// word), Box-Muller and the update on the CPU for every parameter every step. Measured on the
// H100 machine's CPU (bench/offload_step.cu, now `zo2_bench --extras`;
// bench/results/h100-offload-2026-11-23.jsonl):
// cpu::Perturber<bfloat16>::update takes 19-20 ns per element on one core and 1.6-2.0 ns per
// element on all 16, so OPT-6.7B's 6.7e9 elements cost 10.5-13 s per step on the host, against
// 0.24 s for its bf16 copy at the 55 GB/s measured pinned H2D. The D2H write-back runs on the
// other copy engine while the uploads run (48 GB/s H2D + 52 GB/s D2H measured concurrently), so
// it costs bandwidth in the otherwise idle direction, not time: an offloaded OPT-6.7B bf16 step
// took 0.289 s against a 0.270 s PCIe floor. A visit with no owed update (the first step, or
// after flush) skips the write-back.
//
// The ZO optimizer family (optim/zo_optimizer.hpp, core/update_rules.hpp): materialize() draws
// z of any query of the step, and the fused pass applies an owed update of several queries and
// any rule. The kernels are templates on the rule and on whether there are several queries
// (update_terms.cuh); a default run (MeZO-SGD, one query) launches the default instantiations,
// the same code as without the family. A stateful rule's per-element state (momentum; Adam's
// m and v: OffloadOptions::rule_state_slots floats per parameter) lives where the group's master
// does: on the device for the prologue, the epilogue and resident blocks; in pinned host memory
// for streamed blocks, uploaded into the slot with the block and written back with it (the same
// streams and events), so the plan and the GPU budget count it: each slot and resident block
// grows by its block's state.
//
// Ordering across steps: the upload of a block for step t+1 may be issued while step t is still
// running (prefetch wraps around); it waits on that block's last write-back event, and the slot
// it fills waits on its own free event, so the host master and the slot are never raced.
//
// Streams: the model must run its forwards on stream() (or order itself after it) and its
// epilogue must synchronize before returning the loss. The views handed out point at device
// memory and stay valid until the next prepare/current call for a group that shares scratch
// (the prologue has scratch of its own, so its views survive until the epilogue).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/zo_element.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/packed_kernel.cuh>
#include <zo2/offload/plain_kernel.cuh>
#include <zo2/offload/row_kernel.cuh>
#include <zo2/offload/timeline.cuh>
#include <zo2/offload/update_terms.cuh>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::cuda {

struct OffloadOptions {
  /// Bytes of device memory the policy may hold (masters, slots, perturbed scratch; not the
  /// model's activations). 0: the minimum -- prologue, epilogue, scratch and `slots` slots, every
  /// block streams. Otherwise the bytes above the minimum buy a third slot (budget_adds_slot),
  /// then keep blocks resident (no transfer).
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
};

namespace offload_detail {

inline std::size_t align_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

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

}  // namespace offload_detail

/// The offload policy. Codec: offload::Fp32Codec, Bf16Codec, Fp16Codec or Int8RowCodec (what
/// rests on the host and crosses PCIe); T: the precision the model's forward reads (float,
/// zo2::bfloat16, zo2::float16). The prologue and epilogue rest on the device in the codec's
/// format too.
template <offload::ElementCodec Codec, class T>
class HostOffload {
 public:
  using value_type = T;
  using codec_type = Codec;
  using GroupCodecT = typename offload::GroupCodecOf<Codec>::type;

  using Perturbed = PerturbedViews<T>;

  /// Allocates everything (pinned host masters, the device arena) for `layout`; parameters are
  /// zero until set with load() or set_group(). `compute` is the stream the model runs on
  /// (null: the policy owns one).
  explicit HostOffload(ModelLayout layout, OffloadOptions options = {}, cudaStream_t compute = nullptr)
      : layout_(std::make_unique<ModelLayout>(std::move(layout))), options_(options) {
    init(compute);
  }
  /// The same, with the initial parameters from `store` (encoded with round-to-nearest).
  explicit HostOffload(const ParameterStore<float>& store, OffloadOptions options = {}, cudaStream_t compute = nullptr)
      : HostOffload(store.model_layout(), options, compute) {
    load(store);
  }

  HostOffload(const HostOffload&) = delete;
  HostOffload& operator=(const HostOffload&) = delete;
  ~HostOffload() {
    // Copies may still be in flight into pinned memory freed below.
    cudaStreamSynchronize(compute_);
    cudaStreamSynchronize(upload_.get());
    cudaStreamSynchronize(offload_.get());
  }

  // ---- the policy interface (Resident / CudaResident) ----------------------------------------

  /// The fused pass for group g: apply the owed update (if any), write theta +- eps z in T
  /// (with one_perturbed_copy, theta + eps z only, in the one buffer both views point at:
  /// materialize(g, noise, Side::kMinus) turns it into theta - eps z).
  Perturbed prepare(GroupIndex g, const StepNoise& noise) {
    close_visit();
    const ParamLayout& layout = layout_->layout(g);
    Scratch& s = scratch_for(g);
    const bool write_back = noise.pending != nullptr;
    const Visit v = begin_visit(g, 'p', write_back);
    launch(v, g, s.plus, options_.one_perturbed_copy ? nullptr : s.minus, noise.seed, noise.step, noise.query,
           noise.eps, noise.pending, Mode::kPerturb);
    end_visit(g, write_back, options_.one_perturbed_copy || noise.materialize_follows);
    return {ParamView<const T>(s.plus, &layout), ParamView<const T>(s.minus, &layout)};
  }

  /// Whether prepare() leaves one copy for both views (OffloadOptions::one_perturbed_copy).
  bool shares_perturbed_copy() const { return options_.one_perturbed_copy; }

  /// Rewrites group g's perturbed copy as theta + eps z (kPlus) or theta - eps z (kMinus) of
  /// noise.step and noise.query, from the master as prepare() left it (updated). For a streamed
  /// block, only between its prepare() and the next policy call: its slot is held until the
  /// kMinus call marked final_probe (or that next call).
  void materialize(GroupIndex g, const StepNoise& noise, Side side) {
    const double c = side == Side::kPlus ? noise.eps : -noise.eps;
    T* dst = scratch_for(g).plus;
    if (is_streamed(g)) {
      Slot* s = find_slot(g.value);
      if (!s || s != held_slot_)
        throw Error("HostOffload::materialize: block group " + std::to_string(g.value) +
                    " is not the one being visited (call it right after its prepare())");
      launch(Visit{s->data, s->state}, g, dst, nullptr, noise.seed, noise.step, noise.query, c, nullptr,
             Mode::kPerturbOnly);
      if (side == Side::kMinus && noise.final_probe) release_held_slot();
    } else {
      launch(Visit{device_master(g), device_state(g)}, g, dst, nullptr, noise.seed, noise.step, noise.query, c,
             nullptr, Mode::kPerturbOnly);
    }
  }

  /// theta of group g in T, no perturbation, no write-back (evaluation).
  ParamView<const T> current(GroupIndex g) {
    close_visit();
    const ParamLayout& layout = layout_->layout(g);
    T* dst = scratch_for(g).plus;
    const Visit v = begin_visit(g, 'c', false);
    launch(v, g, dst, nullptr, 0, 0, 0, 0.0, nullptr, Mode::kConvert);
    end_visit(g, false);
    return ParamView<const T>(dst, &layout);
  }

  /// Applies an owed update to group g alone (flush before evaluation or a checkpoint).
  void apply_update(GroupIndex g, std::uint64_t seed, const PendingUpdate& pending) {
    close_visit();
    const Visit v = begin_visit(g, 'u', true);
    launch(v, g, nullptr, nullptr, seed, 0, 0, 0.0, &pending, Mode::kUpdate);
    end_visit(g, true);
  }

  const ModelLayout& model_layout() const { return *layout_; }
  cudaStream_t stream() const { return compute_; }
  /// Packed codec only (0 otherwise): escapes that found no room in their tensor's list since
  /// the start, each flushed to zero -- the one way the packed codec can lose information.
  /// Blocks until the count is known.
  std::uint64_t escape_overflow() const {
    std::uint64_t n = 0;
    if constexpr (offload::is_packed_codec_v<Codec>)
      for (const auto& p : packed_passes_) n += p.overflow(compute_);
    return n;
  }

  /// Waits for all three streams.
  void synchronize() const {
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(upload_.get()));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(offload_.get()));
  }

  // ---- parameters in and out ------------------------------------------------------------------

  /// Encodes `flat` (the group's float flat buffer, padding included) as group g's master.
  void set_group(GroupIndex g, std::span<const float> flat) {
    synchronize();
    const auto& codec = codec_for(g);
    if (is_streamed(g)) {
      codec.encode_group(flat, host_block(g));
      for (auto& slot : slots_)
        if (slot.block == static_cast<long>(g.value)) slot.block = -1;  // stale on the device now
    } else {
      std::vector<unsigned char> staging(codec.bytes());
      codec.encode_group(flat, staging);
      ZO2_CUDA_CHECK(cudaMemcpy(device_master(g), staging.data(), staging.size(), cudaMemcpyHostToDevice));
    }
  }
  /// Sets group g's master from bytes already in the codec's format (GroupCodec<Codec>::bytes()
  /// of them), e.g. one encoding copied to many blocks, or a checkpoint saved encoded.
  void set_group_encoded(GroupIndex g, std::span<const unsigned char> encoded) {
    synchronize();
    check_encoded_size(g, encoded.size(), "set_group_encoded");
    if (is_streamed(g)) {
      std::memcpy(host_block(g).data(), encoded.data(), encoded.size());
      for (auto& slot : slots_)
        if (slot.block == static_cast<long>(g.value)) slot.block = -1;
    } else {
      ZO2_CUDA_CHECK(cudaMemcpy(device_master(g), encoded.data(), encoded.size(), cudaMemcpyHostToDevice));
    }
  }
  /// Copies group g's master, in the codec's format, into `encoded` (GroupCodec<Codec>::bytes()
  /// of them): with set_group_encoded, an exact save and restore where decoding to float and
  /// encoding again would not be (the int8 codec's row scales are sticky).
  void get_group_encoded(GroupIndex g, std::span<unsigned char> encoded) const {
    synchronize();
    check_encoded_size(g, encoded.size(), "get_group_encoded");
    if (is_streamed(g)) std::memcpy(encoded.data(), host_block(g).data(), encoded.size());
    else ZO2_CUDA_CHECK(cudaMemcpy(encoded.data(), device_master(g), encoded.size(), cudaMemcpyDeviceToHost));
  }
  /// Bytes of group g's master in the codec's format.
  std::size_t group_encoded_bytes(GroupIndex g) const { return codec_for(g).bytes(); }
  /// Decodes group g's master into `flat`. Call the optimizer's flush() first for theta after
  /// the last step.
  void get_group(GroupIndex g, std::span<float> flat) const {
    synchronize();
    const auto& codec = codec_for(g);
    if (is_streamed(g)) {
      codec.decode_group(host_block(g), flat);
    } else {
      std::vector<unsigned char> staging(codec.bytes());
      ZO2_CUDA_CHECK(cudaMemcpy(staging.data(), device_master(g), staging.size(), cudaMemcpyDeviceToHost));
      codec.decode_group(staging, flat);
    }
  }
  /// Encodes every group of `store` as the masters. The streamed blocks are encoded straight
  /// into pinned host memory on all cores: encoding a large model is most of a start-up (the
  /// packed codec encodes ~370 M values/s on one core, OPT-30B has 30 G).
  void load(const ParameterStore<float>& store) {
    check_same_layout(store.model_layout());
    synchronize();
    const auto flat_of = [&](std::size_t g) {
      const auto view = store.group(GroupIndex{g});
      return std::span<const float>(view.data(), view.layout().total_elements());
    };
    parallel_for(layout_->num_groups(), [&](std::size_t g) {
      if (is_streamed(GroupIndex{g})) codec_for(GroupIndex{g}).encode_group(flat_of(g), host_block(GroupIndex{g}));
    });
    for (auto& slot : slots_) slot.block = -1;  // every slot is stale now
    for (std::size_t g = 0; g < layout_->num_groups(); ++g)
      if (!is_streamed(GroupIndex{g})) set_group(GroupIndex{g}, flat_of(g));
  }
  /// Decodes every master into `store` (streamed blocks on all cores).
  void store_to(ParameterStore<float>& store) const {
    check_same_layout(store.model_layout());
    synchronize();
    const auto flat_of = [&](std::size_t g) {
      auto view = store.group(GroupIndex{g});
      return std::span<float>(view.data(), view.layout().total_elements());
    };
    parallel_for(layout_->num_groups(), [&](std::size_t g) {
      if (is_streamed(GroupIndex{g})) codec_for(GroupIndex{g}).decode_group(host_block(GroupIndex{g}), flat_of(g));
    });
    for (std::size_t g = 0; g < layout_->num_groups(); ++g)
      if (!is_streamed(GroupIndex{g})) get_group(GroupIndex{g}, flat_of(g));
  }

  // ---- optimizer state (momentum, Adam's moments) ----------------------------------------------

  /// Per-element state values for a stateful rule, zeroed: `slots` fp32 arrays the size of each
  /// group's flat buffer. ZOOptimizer calls it for rules with state when rule_state_slots()
  /// differs. The same count as the plan's (OffloadOptions::rule_state_slots) only zeroes the
  /// state; another count re-plans (see OffloadOptions::rule_state_slots; ConfigError when the
  /// budget cannot hold it, and then nothing changes).
  void reserve_rule_state(unsigned slots) {
    close_visit();
    synchronize();
    if (slots == plan_.state_slots) {
      zero_rule_state();
      return;
    }
    OffloadOptions next = options_;
    next.rule_state_slots = slots;
    const Plan p = plan_for(*layout_, next);
    if (p.resident_blocks == plan_.resident_blocks && p.slots == plan_.slots) {
      // The masters stay where they are: only the state's buffers change.
      const Plan old_plan = plan_;
      const OffloadOptions old_options = options_;
      state_arena_ = {};
      host_state_ = {};
      try {
        options_ = next;
        plan_ = p;
        allocate_state();
      } catch (...) {
        options_ = old_options;
        plan_ = old_plan;
        allocate_state();
        throw;
      }
    } else {
      replan(next, p);
    }
  }
  /// Per-element state values per parameter the policy holds (0: none).
  unsigned rule_state_slots() const { return plan_.state_slots; }
  /// Group g's state into `out` (rule_state_slots() arrays of the group's flat size, one after
  /// another: state[slot * total_elements + element]), as it stands after the last call.
  void get_rule_state(GroupIndex g, std::span<float> out) const {
    check_state_size(g, out.size(), "get_rule_state");
    if (out.empty()) return;
    synchronize();
    if (is_streamed(g)) {
      std::memcpy(out.data(), host_state(g), out.size() * sizeof(float));
    } else {
      ZO2_CUDA_CHECK(cudaMemcpyAsync(out.data(), device_state(g), out.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                     compute_));
      ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    }
  }
  /// Sets group g's state from `in` (the layout of get_rule_state), e.g. from a checkpoint.
  void set_rule_state(GroupIndex g, std::span<const float> in) {
    check_state_size(g, in.size(), "set_rule_state");
    if (in.empty()) return;
    synchronize();
    if (is_streamed(g)) {
      std::memcpy(host_state(g), in.data(), in.size() * sizeof(float));
      for (auto& slot : slots_)
        if (slot.block == static_cast<long>(g.value)) slot.block = -1;  // stale on the device now
    } else {
      ZO2_CUDA_CHECK(cudaMemcpyAsync(device_state(g), in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice,
                                     compute_));
      ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    }
  }

  // ---- sizes and the plan ---------------------------------------------------------------------

  /// What the plan for `layout` under `options` holds on the device.
  struct Plan {
    std::size_t block_bytes = 0;        // one encoded block: what crosses PCIe each way per visit
    unsigned state_slots = 0;           // rule state values per parameter (fp32)
    std::size_t block_state_bytes = 0;  // one block's rule state: crosses PCIe with it (0: none)
    /// prologue + epilogue masters, their rule state and the perturbed scratch
    std::size_t fixed_bytes = 0;
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
    /// Device bytes of one slot or resident block: the encoded block and its rule state.
    std::size_t slot_bytes() const { return block_bytes + block_state_bytes; }
  };
  static Plan plan_for(const ModelLayout& ml, const OffloadOptions& opt) {
    validate(opt);
    using offload_detail::align_up;
    constexpr std::size_t A = 256;
    Plan p;
    const GroupCodecT pro(ml.layout(ml.prologue())), blk(ml.layout(ml.block(0))),
        epi(ml.layout(ml.epilogue()));
    p.block_bytes = align_up(blk.bytes(), A);
    p.state_slots = opt.rule_state_slots;
    const auto state_bytes = [&](const GroupCodecT& c) {
      return align_up(std::size_t{p.state_slots} * c.total_elements() * sizeof(float), A);
    };
    p.block_state_bytes = state_bytes(blk);
    const std::size_t fixed_state = state_bytes(pro) + state_bytes(epi);
    const std::size_t shared_elems = std::max(blk.total_elements(), epi.total_elements());
    const std::size_t copies = opt.one_perturbed_copy ? 1 : 2;
    p.fixed_bytes = align_up(pro.bytes(), A) + align_up(epi.bytes(), A) + fixed_state +
                    copies * align_up(pro.total_elements() * sizeof(T), A) +
                    copies * align_up(shared_elems * sizeof(T), A);
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
    if constexpr (offload::is_packed_codec_v<Codec>) {
      // The packed passes' scratch (escape lists, their sort room, counters), one per layout.
      using offload_detail::PackedPass;
      for (const GroupCodecT* c : {&pro, &blk, &epi}) {
        const std::size_t bytes = PackedPass::device_bytes(*c);
        p.table_bytes += bytes;
        p.device_bound_bytes += align_up(bytes, kMiB2) + PackedPass::kAllocations * kMiB2;
      }
    }
    p.host_state_bytes = p.streamed_blocks * p.block_state_bytes;
    p.host_pinned_bytes = p.streamed_blocks * p.block_bytes + p.host_state_bytes;
    return p;
  }
  const Plan& plan() const { return plan_; }
  std::size_t resident_blocks() const { return plan_.resident_blocks; }
  std::size_t streamed_blocks() const { return plan_.streamed_blocks; }
  std::size_t block_bytes() const { return plan_.block_bytes; }
  /// Whether block i stays on the device (the last resident_blocks() blocks do).
  bool block_is_resident(std::size_t i) const { return i >= plan_.streamed_blocks; }

  Timeline& timeline() { return timeline_; }
  /// Starts a new timeline recording at this point of the compute stream (uploads already in
  /// flight keep no upload times). Requires options.record_timeline.
  void restart_timeline() {
    for (auto& s : slots_) s.upload_start = s.upload_end = -1;
    open_visit_ = -1;
    timeline_.restart(compute_);
  }
  /// Closes the last visit's compute interval (call after the step, before timeline().read()).
  void end_timeline_visit() { close_visit(); }
  /// Bytes moved host->device and device->host since construction (or reset_traffic()).
  std::size_t bytes_uploaded() const { return uploaded_; }
  std::size_t bytes_offloaded() const { return offloaded_; }
  void reset_traffic() { uploaded_ = offloaded_ = 0; }

 private:
  enum class Mode { kPerturb, kPerturbOnly, kConvert, kUpdate };

  struct Scratch {
    T* plus = nullptr;
    T* minus = nullptr;
  };
  struct Slot {
    unsigned char* data = nullptr;
    float* state = nullptr;    // room for its block's rule state (null without state)
    long block = -1;           // group index held (or being uploaded), -1: none
    std::uint64_t last_use = 0;
    Event uploaded, freed;
    int upload_start = -1, upload_end = -1;  // timeline marks of the upload that filled it
  };

  /// Where a visited group's master and rule state are on the device.
  struct Visit {
    unsigned char* master;
    float* state;
  };

  static void validate(const OffloadOptions& opt) {
    if (opt.slots < 2) throw ConfigError("slots", "HostOffload needs at least 2 device slots (one computing, one uploading)");
    if (opt.prefetch_depth < 1 || opt.prefetch_depth > opt.slots - 1)
      throw ConfigError("prefetch_depth", "must be between 1 and slots - 1 = " + std::to_string(opt.slots - 1));
  }

  void init(cudaStream_t compute) {
    const ModelLayout& ml = *layout_;
    plan_ = plan_for(ml, options_);
    if (compute) {
      compute_ = compute;
    } else {
      owned_compute_.emplace();
      compute_ = owned_compute_->get();
    }
    codecs_[0] = GroupCodecT(ml.layout(ml.prologue()));
    codecs_[1] = GroupCodecT(ml.layout(ml.block(0)));
    codecs_[2] = GroupCodecT(ml.layout(ml.epilogue()));
    allocate(true);
    kernel_done_ = Event(false);
    body_done_ = Event(false);
    reads_done_ = Event(false);

    const std::size_t visits_per_step = ml.num_groups();
    timeline_ = Timeline(options_.record_timeline
                             ? (options_.timeline_events ? options_.timeline_events : 6 * 3 * visits_per_step + 1)
                             : 0);
    if (options_.record_timeline) timeline_.restart(compute_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }

  /// Allocates what plan_ describes (the kernels' tables too when `tables`), zeroed: the device
  /// arena and its carving, the pinned host masters, the rule state.
  void allocate(bool tables) {
    // Device: check the plan against free memory first, for a message that says what would fit.
    std::size_t free_b = 0, total_b = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (plan_.device_bound_bytes > free_b) throw device_oom(free_b, nullptr);
    try {
      arena_ = DeviceBuffer<unsigned char>(plan_.arena_bytes);
      if (tables)
        for (int i = 0; i < 3; ++i) build_tables(i);
    } catch (const OutOfMemory& e) {
      throw device_oom(free_b, &e);
    }
    ZO2_CUDA_CHECK(cudaMemsetAsync(arena_.data(), 0, plan_.arena_bytes, compute_));

    using offload_detail::align_up;
    constexpr std::size_t A = 256;
    unsigned char* p = arena_.data();
    const auto take = [&](std::size_t bytes) {
      unsigned char* r = p;
      p += align_up(bytes, A);
      return r;
    };
    prologue_master_ = take(codecs_[0].bytes());
    epilogue_master_ = take(codecs_[2].bytes());
    const std::size_t shared_elems = std::max(codecs_[1].total_elements(), codecs_[2].total_elements());
    const bool one = options_.one_perturbed_copy;
    scratch_[0].plus = reinterpret_cast<T*>(take(codecs_[0].total_elements() * sizeof(T)));
    scratch_[0].minus = one ? scratch_[0].plus : reinterpret_cast<T*>(take(codecs_[0].total_elements() * sizeof(T)));
    scratch_[1].plus = reinterpret_cast<T*>(take(shared_elems * sizeof(T)));
    scratch_[1].minus = one ? scratch_[1].plus : reinterpret_cast<T*>(take(shared_elems * sizeof(T)));
    resident_masters_.clear();
    for (std::size_t i = 0; i < plan_.resident_blocks; ++i) resident_masters_.push_back(take(plan_.block_bytes));
    slots_ = std::vector<Slot>(plan_.slots);
    for (auto& s : slots_) s.data = take(plan_.block_bytes);
    current_slot_ = held_slot_ = nullptr;

    // Host: the streamed blocks' masters, pinned.
    const std::size_t host_masters = plan_.host_pinned_bytes - plan_.host_state_bytes;
    if (host_masters) {
      host_ = pin(host_masters, "streamed blocks of " + std::to_string(plan_.block_bytes) + " bytes in codec " +
                                    Codec::name);
      std::memset(host_.data(), 0, host_masters);
    }
    block_written_ = std::vector<Event>(plan_.streamed_blocks);
    allocate_state();
  }

  /// The rule state's buffers for plan_ (none without state), zeroed; every slot is emptied
  /// (its state room moved).
  void allocate_state() {
    state_arena_ = {};
    host_state_ = {};
    prologue_state_ = epilogue_state_ = nullptr;
    resident_states_.assign(plan_.resident_blocks, nullptr);
    for (auto& s : slots_) {
      s.state = nullptr;
      s.block = -1;
    }
    if (plan_.state_slots == 0) return;
    std::size_t free_b = 0, total_b = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (offload_detail::align_up(plan_.state_arena_bytes, std::size_t{2} << 20) > free_b)
      throw OutOfMemory("HostOffload: " + std::to_string(plan_.state_arena_bytes >> 20) + " MiB of device memory for " +
                        std::to_string(plan_.state_slots) + " rule state values per parameter, " +
                        std::to_string(free_b >> 20) + " MiB free");
    state_arena_ = DeviceBuffer<unsigned char>(plan_.state_arena_bytes);
    ZO2_CUDA_CHECK(cudaMemsetAsync(state_arena_.data(), 0, plan_.state_arena_bytes, compute_));
    unsigned char* p = state_arena_.data();
    const auto take = [&](std::size_t k) {
      float* r = reinterpret_cast<float*>(p);
      p += offload_detail::align_up(state_bytes_of(k), 256);
      return r;
    };
    prologue_state_ = take(0);
    epilogue_state_ = take(2);
    for (auto& r : resident_states_) r = take(1);
    for (auto& s : slots_) s.state = take(1);
    if (plan_.host_state_bytes) {
      host_state_ = pin(plan_.host_state_bytes, "the rule state of " + std::to_string(plan_.streamed_blocks) +
                                                    " streamed blocks (" + std::to_string(plan_.state_slots) +
                                                    " fp32 values per parameter)");
      std::memset(host_state_.data(), 0, plan_.host_state_bytes);
    }
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }

  /// Pinned host memory, or an Error that says what it was for.
  static PinnedBuffer<unsigned char> pin(std::size_t bytes, const std::string& what) {
    // MemAvailable only informs the message: some hosts grow their memory as it is used, so
    // it may read less than the allocation would get.
    try {
      return PinnedBuffer<unsigned char>(bytes);
    } catch (const CudaError& e) {
      const std::size_t avail = offload_detail::host_available_bytes();
      throw Error("HostOffload: cannot pin " + std::to_string(bytes) + " bytes (" + std::to_string(bytes >> 20) +
                  " MiB) of host memory for " + what +
                  (avail ? " (MemAvailable: " + std::to_string(avail >> 20) + " MiB)" : std::string()) +
                  "; use a smaller codec or a larger gpu_memory_budget: " + e.what());
    }
  }

  /// Zeroes the rule state everywhere (synchronized: nothing is in flight).
  void zero_rule_state() {
    if (plan_.state_slots == 0) return;
    ZO2_CUDA_CHECK(cudaMemsetAsync(state_arena_.data(), 0, plan_.state_arena_bytes, compute_));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    if (plan_.host_state_bytes) std::memset(host_state_.data(), 0, plan_.host_state_bytes);
  }

  /// Moves to plan `p` for options `next` where resident blocks or slots change: every master
  /// is saved (encoded, in host memory), everything is allocated anew, the masters restored;
  /// the rule state starts at zero. On failure the old plan is restored and the error rethrown.
  void replan(const OffloadOptions& next, const Plan& p) {
    std::vector<std::vector<unsigned char>> saved(layout_->num_groups());
    for (std::size_t g = 0; g < saved.size(); ++g) {
      saved[g].resize(group_encoded_bytes(GroupIndex{g}));
      get_group_encoded(GroupIndex{g}, saved[g]);
    }
    const auto restore = [&] {
      for (std::size_t g = 0; g < saved.size(); ++g) set_group_encoded(GroupIndex{g}, saved[g]);
    };
    const OffloadOptions old_options = options_;
    const Plan old_plan = plan_;
    const auto release = [&] {
      slots_.clear();
      resident_masters_.clear();
      current_slot_ = held_slot_ = nullptr;
      state_arena_ = {};
      host_state_ = {};
      arena_ = {};
      host_ = {};
    };
    release();
    try {
      options_ = next;
      plan_ = p;
      allocate(false);
    } catch (...) {
      release();
      options_ = old_options;
      plan_ = old_plan;
      allocate(false);
      restore();
      throw;
    }
    restore();
  }

  OutOfMemory device_oom(std::size_t free_b, const std::exception* cause) const {
    // What budget would fit: what is free now, less the 2 MiB-per-table overhead.
    const std::size_t overhead = plan_.device_bound_bytes - plan_.arena_bytes - plan_.state_arena_bytes;
    const std::size_t fits = free_b > overhead ? free_b - overhead : 0;
    std::string msg = "HostOffload: out of device memory at startup: the plan needs " +
                      std::to_string(plan_.device_bound_bytes >> 20) + " MiB (" +
                      std::to_string(plan_.resident_blocks) + " resident blocks, " + std::to_string(plan_.slots) +
                      " slots of " + std::to_string(plan_.block_bytes >> 20) + " MiB) but " +
                      std::to_string(free_b >> 20) + " MiB are free; ";
    if (fits >= plan_.minimum_bytes)
      msg += "a gpu_memory_budget of " + std::to_string(fits) + " bytes (" + std::to_string(fits >> 20) +
             " MiB) or less would fit";
    else
      msg += "even the minimum (" + std::to_string(plan_.minimum_bytes >> 20) +
             " MiB, budget 0) does not fit: free device memory or use a smaller codec";
    if (cause) msg += std::string(" [") + cause->what() + "]";
    return OutOfMemory(msg);
  }

  void build_tables(int i) {
    const ModelLayout& ml = *layout_;
    const GroupIndex gi = i == 0 ? ml.prologue() : i == 1 ? ml.block(0) : ml.epilogue();
    const ParamLayout& layout = ml.layout(gi);
    if constexpr (offload::is_packed_codec_v<Codec>) {
      packed_passes_[i] = offload_detail::PackedPass(codecs_[i], layout);
    } else if constexpr (Codec::row_scaled) {
      row_tables_[i] = offload_detail::RowTable(codecs_[i], layout);
    } else {
      tables_[i] = GroupTable(layout);
    }
  }

  void check_same_layout(const ModelLayout& other) const {
    const ModelLayout& ml = *layout_;
    bool same = other.num_blocks() == ml.num_blocks();
    for (std::size_t g = 0; same && g < 3; ++g) {
      const GroupIndex gi = g == 0 ? ml.prologue() : g == 1 ? ml.block(0) : ml.epilogue();
      same = other.layout(gi) == ml.layout(gi);
    }
    if (!same) throw ConfigError("store", "HostOffload: the parameter store has a different model layout");
  }

  int kind_of(GroupIndex g) const {
    if (g.value == 0) return 0;
    if (g.value <= layout_->num_blocks()) return 1;
    if (g.value == layout_->num_blocks() + 1) return 2;
    throw Error("HostOffload: group index " + std::to_string(g.value) + " out of range");
  }
  const GroupCodecT& codec_for(GroupIndex g) const { return codecs_[kind_of(g)]; }
  void check_encoded_size(GroupIndex g, std::size_t size, const char* what) const {
    if (size != codec_for(g).bytes())
      throw Error(std::string("HostOffload::") + what + ": got " + std::to_string(size) + " bytes, group " +
                  std::to_string(g.value) + " needs " + std::to_string(codec_for(g).bytes()));
  }
  Scratch& scratch_for(GroupIndex g) { return scratch_[g.value == 0 ? 0 : 1]; }
  bool is_streamed(GroupIndex g) const { return kind_of(g) == 1 && g.value - 1 < plan_.streamed_blocks; }
  std::span<unsigned char> host_block(GroupIndex g) const {
    return {host_.data() + (g.value - 1) * plan_.block_bytes, codecs_[1].bytes()};
  }
  unsigned char* device_master(GroupIndex g) const {
    const int k = kind_of(g);
    if (k == 0) return prologue_master_;
    if (k == 2) return epilogue_master_;
    return resident_masters_.at(g.value - 1 - plan_.streamed_blocks);
  }
  /// Bytes of the rule state of a group of kind k (0: prologue, 1: block, 2: epilogue).
  std::size_t state_bytes_of(int k) const {
    return std::size_t{plan_.state_slots} * codecs_[k].total_elements() * sizeof(float);
  }
  /// The rule state of a device-resident group (null without state).
  float* device_state(GroupIndex g) const {
    if (plan_.state_slots == 0) return nullptr;
    const int k = kind_of(g);
    if (k == 0) return prologue_state_;
    if (k == 2) return epilogue_state_;
    return resident_states_.at(g.value - 1 - plan_.streamed_blocks);
  }
  /// The rule state of streamed block group g in pinned host memory.
  float* host_state(GroupIndex g) const {
    return reinterpret_cast<float*>(host_state_.data() + (g.value - 1) * plan_.block_state_bytes);
  }
  void check_state_size(GroupIndex g, std::size_t size, const char* what) const {
    const std::size_t want = std::size_t{plan_.state_slots} * codec_for(g).total_elements();
    if (size != want)
      throw ShapeError(std::string("HostOffload::") + what + ": group " + std::to_string(g.value) + " has " +
                       std::to_string(want) + " state values (" + std::to_string(plan_.state_slots) +
                       " per element), got " + std::to_string(size));
  }

  // ---- slots -----------------------------------------------------------------------------------

  Slot* find_slot(std::size_t group) {
    for (auto& s : slots_)
      if (s.block == static_cast<long>(group)) return &s;
    return nullptr;
  }

  /// Puts streamed group `group` into a slot (issuing its upload if it is not already there or
  /// on its way) and returns the slot. `keep` slots are not evicted.
  Slot& ensure_uploaded(std::size_t group, const Slot* keep) {
    if (Slot* s = find_slot(group)) return *s;
    Slot* victim = nullptr;
    for (auto& s : slots_)
      if (&s != keep && (!victim || s.last_use < victim->last_use)) victim = &s;
    Slot& s = *victim;
    s.block = static_cast<long>(group);
    s.last_use = ++use_clock_;
    const cudaStream_t up = upload_.get();
    s.freed.wait_on(up);                           // the slot's previous block is done with it
    block_written_[group - 1].wait_on(up);         // the host master holds its last write-back
    s.upload_start = timeline_.mark(up);
    ZO2_CUDA_CHECK(cudaMemcpyAsync(s.data, host_block(GroupIndex{group}).data(), codecs_[1].bytes(),
                                   cudaMemcpyHostToDevice, up));
    uploaded_ += codecs_[1].bytes();
    if (plan_.state_slots) {  // the block's rule state travels with it, under the same events
      ZO2_CUDA_CHECK(cudaMemcpyAsync(s.state, host_state(GroupIndex{group}), state_bytes_of(1), cudaMemcpyHostToDevice, up));
      uploaded_ += state_bytes_of(1);
    }
    s.upload_end = timeline_.mark(up);
    s.uploaded.record(up);
    return s;
  }

  /// Issues uploads of the next prefetch_depth streamed blocks after `group` (cyclically: the
  /// first blocks of the next step follow the last block of this one).
  void prefetch_after(std::size_t streamed_index, const Slot* keep) {
    const std::size_t n = plan_.streamed_blocks;
    const std::size_t depth = std::min(options_.prefetch_depth, n > 0 ? n - 1 : 0);
    for (std::size_t k = 1; k <= depth; ++k) ensure_uploaded(1 + (streamed_index + k) % n, keep);
  }

  /// The first prefetch_depth streamed blocks of the next step: their uploads overlap the
  /// epilogue and the prologue.
  void prefetch_first() {
    const std::size_t depth = std::min(options_.prefetch_depth, plan_.streamed_blocks);
    for (std::size_t k = 0; k < depth; ++k) ensure_uploaded(1 + k, nullptr);
  }

  /// Starts a visit: returns the device addresses of group g's master and rule state, ordered
  /// on compute_.
  Visit begin_visit(GroupIndex g, char kind, bool /*write_back*/) {
    Timeline::Marks m;
    m.group = g.value;
    m.kind = kind;
    m.resident = !is_streamed(g);
    Visit v;
    if (is_streamed(g)) {
      Slot& s = ensure_uploaded(g.value, nullptr);
      s.last_use = ++use_clock_;
      s.uploaded.wait_on(compute_);
      m.upload_start = std::exchange(s.upload_start, -1);
      m.upload_end = std::exchange(s.upload_end, -1);
      current_slot_ = &s;
      v = Visit{s.data, s.state};
    } else {
      current_slot_ = nullptr;
      v = Visit{device_master(g), device_state(g)};
      if (kind_of(g) == 0) prefetch_first();
    }
    m.compute_start = timeline_.mark(compute_);
    open_visit_ = timeline_.add_visit(m);
    return v;
  }

  /// Ends a visit after its kernel was launched: write-back and freeing of the slot, prefetch.
  /// `hold`: the slot is freed later, by release_held_slot(), when materialize() has read it.
  void end_visit(GroupIndex g, bool write_back, bool hold = false) {
    if (!current_slot_) {
      if (kind_of(g) == 2) prefetch_first();
      return;
    }
    Slot& s = *current_slot_;
    if (write_back) {
      const cudaStream_t off = offload_.get();
      unsigned char* host = host_block(g).data();
      std::size_t head = 0;  // bytes final before the whole pass is: copied out first
      if constexpr (offload::is_packed_codec_v<Codec>) {
        // PackedPass::run records body_done_ once the block is re-encoded, before it sorts the
        // escape lists (at the end of the block) and writes the outputs: the write-back of
        // everything before the lists starts there (with two slots the next upload into this
        // slot waits for the write-back).
        head = codecs_[1].counts_offset();
        body_done_.wait_on(off);
      }
      const int start = timeline_.mark(off);
      if (head) ZO2_CUDA_CHECK(cudaMemcpyAsync(host, s.data, head, cudaMemcpyDeviceToHost, off));
      // The rule state is final where the block's body is: after the packed pass's first
      // launch (body_done_, waited on above), else after the kernel.
      if (head && plan_.state_slots) write_back_state(g, s);
      kernel_done_.record(compute_);
      kernel_done_.wait_on(off);
      ZO2_CUDA_CHECK(cudaMemcpyAsync(host + head, s.data + head, codecs_[1].bytes() - head, cudaMemcpyDeviceToHost, off));
      if (!head && plan_.state_slots) write_back_state(g, s);
      const int end = timeline_.mark(off);
      if (auto* v = timeline_.visit(open_visit_)) {
        v->offload_start = start;
        v->offload_end = end;
      }
      block_written_[g.value - 1].record(off);
      offloaded_ += codecs_[1].bytes();
    }
    held_slot_ = &s;
    held_written_back_ = write_back;
    if (!hold) release_held_slot();
    prefetch_after(g.value - 1, &s);
    current_slot_ = nullptr;
  }

  /// D2H of slot s's rule state into streamed group g's, on the offload stream (ordered by the
  /// caller after the kernel that updated it).
  void write_back_state(GroupIndex g, const Slot& s) {
    ZO2_CUDA_CHECK(cudaMemcpyAsync(host_state(g), s.state, state_bytes_of(1), cudaMemcpyDeviceToHost, offload_.get()));
    offloaded_ += state_bytes_of(1);
  }

  /// Frees the held slot for the next upload once everything enqueued so far that reads it
  /// (the kernels on compute_, the write-back on offload_) is done.
  void release_held_slot() {
    if (!held_slot_) return;
    if (held_written_back_) {
      reads_done_.record(compute_);
      reads_done_.wait_on(offload_.get());
      held_slot_->freed.record(offload_.get());
    } else {
      held_slot_->freed.record(compute_);
    }
    held_slot_ = nullptr;
  }

  /// The compute of the previous visit ends where the next policy call begins on compute_; a
  /// slot still held (materialize() was not called) is freed there.
  void close_visit() {
    release_held_slot();
    if (auto* v = timeline_.visit(open_visit_)) v->compute_end = timeline_.mark(compute_);
    open_visit_ = -1;
  }

  /// One pass over the visited group g: Mode says which (kPerturb: the owed update if any, then
  /// theta + eps z into plus and theta - eps z into minus if not null; kPerturbOnly: plus =
  /// theta + eps z; kConvert: plus = theta; kUpdate: the update alone), z of (step, query).
  /// Picks the kernels' instantiation: the default one for MeZO-SGD with one query and query 0,
  /// else the owed update's rule with several queries (update_terms.cuh).
  void launch(const Visit& v, GroupIndex g, T* plus, T* minus, std::uint64_t seed, std::uint32_t step,
              std::uint32_t query, double eps, const PendingUpdate* pending, Mode mode) {
    if (query != 0 && mode != Mode::kPerturb && mode != Mode::kPerturbOnly)
      throw Error("HostOffload: a query index for a pass without noise");
    if (query >= kMaxQueries)
      throw ConfigError("queries", "HostOffload: query " + std::to_string(query) + " of at most " +
                                       std::to_string(kMaxQueries) + " queries");
    if (query == 0 && (!pending || pending->plain_sgd())) {
      launch_as<SgdRule, false>(v, g, plus, minus, seed, step, 0, eps, pending, mode);
      return;
    }
    visit_rule(pending ? pending->rule : RuleId::kSgd, [&]<class Rule>() {
      if constexpr (Rule::kStateSlots > 0)
        if (pending && Rule::kStateSlots > plan_.state_slots)
          throw ConfigError("optimizer", "HostOffload holds " + std::to_string(plan_.state_slots) +
                                             " rule state values per parameter, this update rule needs " +
                                             std::to_string(Rule::kStateSlots) + " (reserve_rule_state)");
      launch_as<Rule, true>(v, g, plus, minus, seed, step, query, eps, pending, mode);
    });
  }

  template <class Rule, bool Queries>
  void launch_as(const Visit& v, GroupIndex g, T* plus, T* minus, std::uint64_t seed, std::uint32_t step,
                 std::uint32_t query, double eps, const PendingUpdate* pending, Mode mode) {
    constexpr bool kPlain = offload_detail::is_plain_update_v<Rule, Queries>;
    const int k = kind_of(g);
    const std::uint32_t first_id = layout_->first_tensor_id(g);
    unsigned char* master = v.master;
    // The update's terms, with the group's rule state (the family's instantiations only).
    const auto terms = [&] {
      return offload_detail::update_terms(*pending, Rule::kStateSlots > 0 ? v.state : nullptr,
                                          codecs_[k].total_elements());
    };
    // The arguments the packed and row kernels share (PackedArgs, RowArgs).
    const auto fill = [&](auto& a) {
      a.first_tensor_id = first_id;
      a.seed = seed;
      a.step = step;
      a.eps = eps;
      a.perturb = mode == Mode::kPerturb || mode == Mode::kPerturbOnly;
      a.convert = mode == Mode::kConvert;
      if (pending) offload_detail::set_plain_update(a, *pending);
    };
    if constexpr (offload::is_packed_codec_v<Codec>) {
      offload_detail::PackedArgs a{};
      fill(a);
      if constexpr (!kPlain) {
        a.query = query;
        if (pending) a.terms = terms();
      }
      packed_passes_[k].template run<T, Rule, Queries>(master, plus, minus, a, compute_, &body_done_);
    } else if constexpr (Codec::row_scaled) {
      offload_detail::RowArgs a{};
      fill(a);
      offload_detail::RowFamilyArgs f{};
      if constexpr (!kPlain) {
        f.query = query;
        if (pending) f.terms = terms();
      }
      float* scales = reinterpret_cast<float*>(master + codecs_[k].scales_offset());
      offload_detail::launch_row_kernel<Codec, T, Rule, Queries>(master, scales, plus, minus, row_tables_[k], a,
                                                                 compute_, f);
    } else {
      using S = typename Codec::storage;
      S* theta = reinterpret_cast<S*>(master);
      if constexpr (kPlain) {
        switch (mode) {
          case Mode::kPerturb:
            update_and_perturb<S, T>(theta, plus, minus, tables_[k], first_id, seed, step, eps, pending, compute_);
            break;
          case Mode::kPerturbOnly: perturb_into<S, T>(plus, theta, tables_[k], first_id, seed, step, eps, compute_); break;
          case Mode::kConvert: convert<S, T>(plus, theta, tables_[k], compute_); break;
          case Mode::kUpdate: update<S>(theta, tables_[k], first_id, seed, *pending, compute_); break;
        }
      } else {
        offload_detail::PlainArgs a{};
        a.first_tensor_id = first_id;
        a.seed = seed;
        a.step = step;
        a.query = query;
        a.eps = eps;
        if (pending) {
          offload_detail::set_plain_update(a, *pending);
          a.terms = terms();
        }
        switch (mode) {
          case Mode::kPerturb:
            offload_detail::launch_plain_family<Rule, S, T>(theta, plus, minus, tables_[k], a, compute_);
            break;
          case Mode::kPerturbOnly:
            offload_detail::launch_plain_family<Rule, S, T>(theta, plus, nullptr, tables_[k], a, compute_);
            break;
          case Mode::kConvert: convert<S, T>(plus, theta, tables_[k], compute_); break;
          case Mode::kUpdate:
            offload_detail::launch_plain_family<Rule, S, T>(theta, static_cast<T*>(nullptr), nullptr, tables_[k], a,
                                                            compute_);
            break;
        }
      }
    }
  }

  std::unique_ptr<ModelLayout> layout_;  // views point at its layouts: keep its address fixed
  OffloadOptions options_;
  Plan plan_;
  std::optional<Stream> owned_compute_;
  cudaStream_t compute_ = nullptr;
  Stream upload_, offload_;
  GroupCodecT codecs_[3];
  GroupTable tables_[3];
  offload_detail::RowTable row_tables_[3];
  offload_detail::PackedPass packed_passes_[3];  // the packed codec's device side (empty otherwise)

  DeviceBuffer<unsigned char> arena_;
  unsigned char* prologue_master_ = nullptr;
  unsigned char* epilogue_master_ = nullptr;
  std::vector<unsigned char*> resident_masters_;
  DeviceBuffer<unsigned char> state_arena_;  // the rule state on the device (plan_.state_arena_bytes)
  float* prologue_state_ = nullptr;
  float* epilogue_state_ = nullptr;
  std::vector<float*> resident_states_;
  Scratch scratch_[2];
  std::vector<Slot> slots_;
  Slot* current_slot_ = nullptr;
  Slot* held_slot_ = nullptr;  // visited, not yet freed (see end_visit)
  bool held_written_back_ = false;
  std::uint64_t use_clock_ = 0;

  PinnedBuffer<unsigned char> host_;
  PinnedBuffer<unsigned char> host_state_;  // streamed blocks' rule state, block_state_bytes apart
  std::vector<Event> block_written_;
  Event kernel_done_, body_done_, reads_done_;  // body_done_: the packed pass's first kernel
  Timeline timeline_;
  int open_visit_ = -1;
  std::size_t uploaded_ = 0, offloaded_ = 0;
};

}  // namespace zo2::cuda
