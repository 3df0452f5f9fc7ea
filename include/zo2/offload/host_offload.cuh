// zo2/offload/host_offload.cuh -- HostOffload<Codec, T>: the ZO2 offload engine.
//
// Where parameters rest: the prologue and epilogue, and as many blocks as the GPU memory budget
// allows, stay on the device; every other block's master rests in pinned host memory in the
// codec's format (codecs.hpp) and streams through a fixed pool of device slots, crossing PCIe
// once per step each way. Nothing is allocated on the device after construction (and after
// reserve_rule_state, which ZOOptimizer calls before its first step).
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
// overlaps it too (H2D and D2H use separate copy engines). slot_cache.cuh holds the slots and
// the events that order these copies.
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
// Deferred write-back (OffloadOptions::writeback_every = K > 1). Where the link's duplex is
// slower than one way (issue 20: 55 GB/s alone, 36 per direction in duplex on one H100 host),
// the write-back does cost time: it slows the uploads it overlaps. With K > 1 a visit that
// updates streamed block b writes it back only when (step + b) % K == 0 (or when its host copy
// would otherwise lag K updates), so ~1/K of the blocks cross back per step. The host copy then
// lacks the updates applied since the block's last write-back; writeback_log.hpp keeps them (at
// most K - 1 per block). When the block next comes from the host into a slot, the visit first
// replays them in order on the compute stream (after the upload, before its own pass) with the
// update-only pass apply_update() uses -- decode, the update with that PendingUpdate's rule,
// queries and the block's rule state, encode -- so the parameters, the int8 codec's sticky
// scales, the packed codec's escapes and the rule state are bit-identical to K = 1. A visit that
// finds the block still in its slot from the last visit (a slot-cache hit) replays nothing.
// Everything that reads or replaces a host copy brings it up to date first (settle(): upload,
// replay, write back): apply_update (so the optimizer's flush), get_group, get_group_encoded,
// store_to, get_rule_state, set_rule_state, and, with rule state, set_group / load (which
// otherwise just drop the lag). current() replays into the slot and writes nothing back. The
// replays cost GPU time, (K - 1) / 2 update passes per visit on average: choose_writeback_every
// (writeback_log.hpp) is the plan's rule for writeback_every = 0, from the link alone; a program
// that can time its steps does better with WritebackTrial (writeback_trial.hpp: K = 1, 2, 4, 8
// timed, the fastest kept), setting K between steps with set_writeback_every (zo2-opt's
// --writeback-every 0, zo2_bench's). A replay recomputes what the
// discarded device copy had computed, so escape_overflow() (the packed codec's escapes that
// found no room) may count such an escape again; the values are K = 1's all the same.
//
// The ZO optimizer family (optim/zo_optimizer.hpp, core/update_rules.hpp): materialize() draws
// z of any query of the step, and the fused pass applies an owed update of several queries and
// any rule. The kernels are templates on the rule and on whether there are several queries
// (update_terms.cuh, device_passes.cuh); a default run (MeZO-SGD, one query) launches the
// default instantiations, the same code as without the family. A stateful rule's per-element
// state (momentum; Adam's m and v: OffloadOptions::rule_state_slots values per parameter, fp32 or,
// with rule_state_bf16, bf16) lives
// where the group's master does: on the device for the prologue, the epilogue and resident
// blocks; in pinned host memory for streamed blocks, uploaded into the slot with the block and
// written back with it (the same streams and events), so the plan and the GPU budget count it:
// each slot and resident block grows by its block's state.
//
// The parts, one job each:
//   offload_plan.cuh    OffloadOptions, and the plan: what rests where, in how many bytes
//   device_arena.cuh    the device allocations, carved as the plan counts them
//   host_store.cuh      the streamed blocks' masters and rule state in pinned host memory
//   slot_cache.cuh      the slots, their uploads and write-backs, and the events ordering them
//   device_passes.cuh   each codec's device side behind one interface (DevicePass), and which
//                       kernel instantiation an update needs
//   timeline.cuh        timing events of every visit (optional)
//   shared_host_master.cuh  one host store for several engines (data-parallel seats in one
//                       process): the constructors taking a SharedSeat; seat_gate.cuh orders
//                       each seat's copies against the shared host copies
// This file is the policy: the interface ZOOptimizer calls, visits, parameters and rule state
// in and out.
//
// Streams: the model must run its forwards on stream() (or order itself after it) and its
// epilogue must synchronize before returning the loss. The views handed out point at device
// memory and stay valid until the next prepare/current call for a group that shares scratch
// (the prologue has scratch of its own, so its views survive until the epilogue; with
// OffloadOptions::prologue_scratch_shared it shares the blocks', for models whose epilogue does
// not read the prologue's parameters).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/device_arena.cuh>
#include <zo2/offload/device_passes.cuh>
#include <zo2/offload/host_store.cuh>
#include <zo2/offload/offload_plan.cuh>
#include <zo2/offload/packed_bf16.hpp>
#include <zo2/offload/seat_gate.cuh>
#include <zo2/offload/shared_host_master.cuh>
#include <zo2/offload/slot_cache.cuh>
#include <zo2/offload/timeline.cuh>
#include <zo2/offload/writeback_log.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::gpu {

/// The offload policy. Codec: offload::Fp32Codec, Bf16Codec, Fp16Codec, Int8RowCodec or
/// Bf16PackedCodec (what rests on the host and crosses PCIe); T: the precision the model's
/// forward reads (float, zo2::bfloat16, zo2::float16). The prologue and epilogue rest on the
/// device in the codec's format too.
template <offload::ElementCodec Codec, class T>
class HostOffload {
 public:
  using value_type = T;
  using codec_type = Codec;
  using GroupCodecT = typename offload::GroupCodecOf<Codec>::type;
  using Pass = typename offload_detail::DevicePassOf<Codec, T>::type;
  static_assert(offload_detail::DevicePass<Pass, T>);
  using Plan = OffloadPlan;

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
  /// A seat of a shared host master (shared_host_master.cuh): the streamed blocks' masters and
  /// rule state are the master's, no pinned memory of its own; the device side as above. Seat 0
  /// sets the shared masters (they are zero until then), other seats their device groups only.
  HostOffload(ModelLayout layout, OffloadOptions options, cudaStream_t compute, SharedSeat<Codec, T> seat)
      : layout_(std::make_unique<ModelLayout>(std::move(layout))), options_(options) {
    if (!seat.core) throw ConfigError("seat", "HostOffload: an empty SharedSeat");
    seat.core->check_seat(seat.index, *layout_, plan_for(*layout_, options_));  // before the seat is taken
    seat_ = std::make_unique<offload_detail::SeatGate>(std::move(seat.core), seat.index);
    init(compute);
  }
  /// The same, with the initial parameters from `store` (see load()).
  HostOffload(const ParameterStore<float>& store, OffloadOptions options, cudaStream_t compute,
              SharedSeat<Codec, T> seat)
      : HostOffload(store.model_layout(), options, compute, std::move(seat)) {
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
    const auto& s = scratch_for(g);
    const bool streamed = is_streamed(g);
    // Deferred write-back: a streamed block goes back to the host on the log's schedule only.
    const bool write_back =
        noise.pending != nullptr && (!streamed || log_.writes_back(g.value - 1, *noise.pending));
    auto a = begin_visit(g, 'p', write_back);
    a.plus = s.plus;
    a.minus = options_.one_perturbed_copy ? nullptr : s.minus;
    set_noise(a, noise.seed, noise.step, noise.query, noise.eps);
    a.pending = noise.pending;
    a.mode = offload_detail::PassMode::kPerturb;
    run(g, a);
    if (auto* v = timeline_.visit(open_visit_)) v->pass_end = timeline_.mark(compute_);
    end_visit(g, write_back, options_.one_perturbed_copy || noise.materialize_follows);
    if (streamed && noise.pending) log_.record(g.value - 1, noise.seed, *noise.pending, write_back);
    return {ParamView<const T>(s.plus, &layout), ParamView<const T>(s.minus, &layout)};
  }

  /// Whether prepare() leaves one copy for both views (OffloadOptions::one_perturbed_copy).
  bool shares_perturbed_copy() const { return options_.one_perturbed_copy; }
  /// Whether the prologue's views are overwritten by the first block's (OffloadOptions::
  /// prologue_scratch_shared): only for models whose epilogue does not read them.
  bool shares_prologue_scratch() const { return options_.prologue_scratch_shared; }

  /// Rewrites group g's perturbed copy as theta + eps z (kPlus) or theta - eps z (kMinus) of
  /// noise.step and noise.query, from the master as prepare() left it (updated). For a streamed
  /// block, only between its prepare() and the next policy call: its slot is held until the
  /// kMinus call marked final_probe (or that next call).
  void materialize(GroupIndex g, const StepNoise& noise, Side side) {
    offload_detail::PassArgs<T> a;
    if (is_streamed(g)) {
      offload_detail::Slot* s = slots_.find(g.value);
      if (!slots_.holds(s))
        throw Error("HostOffload::materialize: block group " + std::to_string(g.value) +
                    " is not the one being visited (call it right after its prepare())");
      a.master = s->data;
      a.state = s->state;
    } else {
      a.master = device_master(g);
      a.state = device_state(g);
    }
    a.plus = scratch_for(g).plus;
    set_noise(a, noise.seed, noise.step, noise.query, side == Side::kPlus ? noise.eps : -noise.eps);
    a.mode = offload_detail::PassMode::kPerturbOnly;
    run(g, a);
    if (is_streamed(g) && side == Side::kMinus && noise.final_probe) slots_.release_held();
  }

  /// theta of group g in T, no perturbation, no write-back (evaluation; a streamed block whose
  /// host copy lags is brought up to date in its slot, not on the host).
  ParamView<const T> current(GroupIndex g) {
    close_visit();
    const ParamLayout& layout = layout_->layout(g);
    auto a = begin_visit(g, 'c');
    a.plus = scratch_for(g).plus;
    a.mode = offload_detail::PassMode::kConvert;
    run(g, a);
    end_visit(g, false);
    return ParamView<const T>(a.plus, &layout);
  }

  /// Applies an owed update to group g alone (flush before evaluation or a checkpoint). A
  /// streamed block is written back: its host copy is up to date afterwards.
  void apply_update(GroupIndex g, std::uint64_t seed, const PendingUpdate& pending) {
    close_visit();
    auto a = begin_visit(g, 'u', true);
    set_noise(a, seed, 0, 0, 0.0);
    a.pending = &pending;
    a.mode = offload_detail::PassMode::kUpdate;
    run(g, a);
    end_visit(g, true);
    if (is_streamed(g)) log_.settled(g.value - 1);
  }

  /// Brings the host copy of every streamed block up to date (deferred write-back: uploads,
  /// replays and writes back each block whose host copy lags; nothing otherwise). Every call
  /// that reads host copies does this for the groups it reads.
  void settle() {
    if (!log_.any_lag()) return;
    for (std::size_t i = 0; i < plan_.streamed_blocks; ++i) settle(GroupIndex{i + 1});
  }
  /// The same for group g alone.
  void settle(GroupIndex g) {
    if (!is_streamed(g) || log_.lag(g.value - 1) == 0) return;
    close_visit();
    begin_visit(g, 's', true);  // a slot that came from the host replays what the host copy lacks
    end_visit(g, true);
    log_.settled(g.value - 1);
  }

  const ModelLayout& model_layout() const { return *layout_; }
  cudaStream_t stream() const { return compute_; }
  /// Values the codec could not store since the start (the packed codec's escapes that found
  /// no room in their tensor's list, each flushed to zero -- the one way it can lose
  /// information); 0 for the other codecs. Blocks until the count is known.
  std::uint64_t escape_overflow() const {
    std::uint64_t n = 0;
    for (const auto& p : passes_) n += p.overflow(compute_);
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
    before_host_write(g, "set_group");
    drop_lag(g);
    synchronize();
    const auto& codec = codec_for(g);
    if (is_streamed(g)) {
      codec.encode_group(flat, host_block(g));
      slots_.invalidate(g.value);  // stale on the device now
    } else {
      std::vector<unsigned char> staging(codec.bytes());
      codec.encode_group(flat, staging);
      copy_to_device_blocking(device_master(g), staging.data(), staging.size());
    }
  }
  /// Sets group g's master from bytes already in the codec's format (GroupCodec<Codec>::bytes()
  /// of them), e.g. one encoding copied to many blocks, or a checkpoint saved encoded.
  void set_group_encoded(GroupIndex g, std::span<const unsigned char> encoded) {
    check_encoded_size(g, encoded.size(), "set_group_encoded");
    before_host_write(g, "set_group_encoded");
    drop_lag(g);
    synchronize();
    if (is_streamed(g)) {
      std::memcpy(host_block(g).data(), encoded.data(), encoded.size());
      slots_.invalidate(g.value);
    } else {
      copy_to_device_blocking(device_master(g), encoded.data(), encoded.size());
    }
  }
  /// Copies group g's master, in the codec's format, into `encoded` (GroupCodec<Codec>::bytes()
  /// of them): with set_group_encoded, an exact save and restore where decoding to float and
  /// encoding again would not be (the int8 codec's row scales are sticky).
  void get_group_encoded(GroupIndex g, std::span<unsigned char> encoded) const {
    check_encoded_size(g, encoded.size(), "get_group_encoded");
    before_host_read(g, "get_group_encoded");
    if (is_streamed(g)) std::memcpy(encoded.data(), host_block(g).data(), encoded.size());
    else ZO2_CUDA_CHECK(cudaMemcpy(encoded.data(), device_master(g), encoded.size(), cudaMemcpyDeviceToHost));
  }
  /// Bytes of group g's master in the codec's format.
  std::size_t group_encoded_bytes(GroupIndex g) const { return codec_for(g).bytes(); }
  /// Decodes group g's master into `flat`. Call the optimizer's flush() first for theta after
  /// the last step.
  void get_group(GroupIndex g, std::span<float> flat) const {
    before_host_read(g, "get_group");
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
  /// into pinned host memory, each on all cores (GroupCodec::encode_group): encoding a large
  /// model is much of a start-up (int8 encodes ~170 M values/s on one core, OPT-30B has 30 G).
  ///
  /// A seat of a shared host master: seat 0 encodes the shared streamed blocks, another seat
  /// only its device groups (see shared_host_master.cuh for when); nothing may be owed.
  void load(const ParameterStore<float>& store) {
    check_same_layout(store.model_layout());
    if (seat_) {
      if (log_.any_lag())
        throw ConfigError("seat", "HostOffload::load: seat " + std::to_string(seat_->seat()) +
                                      " has updates its shared host copies lack: flush on every seat first");
      if (seat_->leader())
        for (std::size_t b = 0; b < plan_.streamed_blocks; ++b) seat_->replace(b);
    }
    if (plan_.state_slots) settle();  // the rule state stays: bring it up to date
    log_.settle_all();
    synchronize();
    const auto flat_of = [&](std::size_t g) {
      const auto view = store.group(GroupIndex{g});
      return std::span<const float>(view.data(), view.layout().total_elements());
    };
    const bool writes_host = !seat_ || seat_->leader();
    for (std::size_t g = 0; g < layout_->num_groups(); ++g)
      if (writes_host && is_streamed(GroupIndex{g}))
        codec_for(GroupIndex{g}).encode_group(flat_of(g), host_block(GroupIndex{g}));
    slots_.invalidate_all();  // every slot is stale now
    for (std::size_t g = 0; g < layout_->num_groups(); ++g)
      if (!is_streamed(GroupIndex{g})) set_group(GroupIndex{g}, flat_of(g));
  }
  /// Decodes every master into `store` (streamed blocks on all cores).
  void store_to(ParameterStore<float>& store) const {
    check_same_layout(store.model_layout());
    if (seat_ && !seat_->leader())
      for (std::size_t b = 0; b < plan_.streamed_blocks; ++b) before_host_read(GroupIndex{b + 1}, "store_to");
    if (log_.any_lag()) const_cast<HostOffload*>(this)->settle();  // see settle_lagging()
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
  ///
  /// A seat of a shared host master keeps the master's count (ConfigError for another); seat 0
  /// zeroes the shared state (see shared_host_master.cuh for when), another seat its device
  /// state only.
  void reserve_rule_state(unsigned slots) {
    if (seat_ && slots != plan_.state_slots)
      throw ConfigError("rule_state_slots", "HostOffload::reserve_rule_state: seat " + std::to_string(seat_->seat()) +
                                                " of a shared host master holds " + std::to_string(plan_.state_slots) +
                                                " state values per parameter, the master's; asked for " +
                                                std::to_string(slots) + ": create the SharedHostMaster with "
                                                "OffloadOptions::rule_state_slots = " + std::to_string(slots));
    settle();  // the lagging updates need the state they were applied with
    close_visit();
    synchronize();
    if (slots == plan_.state_slots) {
      arena_.zero_state(compute_);
      ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
      if (seat_) {
        if (!seat_->leader()) return;
        for (std::size_t b = 0; b < plan_.streamed_blocks; ++b) seat_->replace(b);
        slots_.invalidate_all();  // their state is zero on the host now
      }
      host_->zero_state();
      return;
    }
    OffloadOptions next = options_;
    next.rule_state_slots = slots;
    const Plan p = plan_for(*layout_, next);
    if (p.resident_blocks == plan_.resident_blocks && p.slots == plan_.slots) {
      // The masters stay where they are: only the state's buffers change.
      const Plan old_plan = plan_;
      const OffloadOptions old_options = options_;
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
    before_host_read(g, "get_rule_state");
    const std::size_t bytes = out.size() * plan_.state_value_bytes;
    std::vector<bfloat16> staging(plan_.state_value_bytes == 2 ? out.size() : 0);
    void* dst = staging.empty() ? static_cast<void*>(out.data()) : static_cast<void*>(staging.data());
    if (is_streamed(g)) {
      std::memcpy(dst, host_->state(g.value - 1), bytes);
    } else {
      ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, device_state(g), bytes, cudaMemcpyDeviceToHost, compute_));
      ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    }
    for (std::size_t j = 0; j < staging.size(); ++j) out[j] = to_float(staging[j]);
  }
  /// Sets group g's state from `in` (the layout of get_rule_state), e.g. from a checkpoint.
  void set_rule_state(GroupIndex g, std::span<const float> in) {
    check_state_size(g, in.size(), "set_rule_state");
    if (in.empty()) return;
    before_host_write(g, "set_rule_state");
    settle(g);  // the master's lagging updates are applied with the state they were applied with
    synchronize();
    // bf16 state: each value rounded to nearest (exact for values a bf16 run saved).
    const std::size_t bytes = in.size() * plan_.state_value_bytes;
    std::vector<bfloat16> staging(plan_.state_value_bytes == 2 ? in.size() : 0);
    for (std::size_t j = 0; j < staging.size(); ++j) staging[j] = to_bfloat16(in[j]);
    const void* src = staging.empty() ? static_cast<const void*>(in.data()) : static_cast<const void*>(staging.data());
    if (is_streamed(g)) {
      std::memcpy(host_->state(g.value - 1), src, bytes);
      slots_.invalidate(g.value);  // stale on the device now
    } else {
      ZO2_CUDA_CHECK(cudaMemcpyAsync(device_state(g), src, bytes, cudaMemcpyHostToDevice, compute_));
      ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
    }
  }

  // ---- sizes and the plan ---------------------------------------------------------------------

  /// What the plan for `layout` under `options` holds (offload_plan.cuh).
  static Plan plan_for(const ModelLayout& ml, const OffloadOptions& opt) {
    return offload_detail::make_plan<GroupCodecT, Pass, T>(ml, opt);
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
    slots_.clear_marks();
    open_visit_ = -1;
    timeline_.restart(compute_);
  }
  /// Closes the last visit's compute interval (call after the step, before timeline().read()).
  void end_timeline_visit() { close_visit(); }
  /// Bytes moved host->device and device->host since construction (or reset_traffic()).
  std::size_t bytes_uploaded() const { return slots_.bytes_uploaded(); }
  std::size_t bytes_offloaded() const { return slots_.bytes_offloaded(); }
  /// Update-only passes run to replay what a host copy lacked (deferred write-back), since
  /// construction (or reset_traffic()).
  std::size_t updates_replayed() const { return replayed_; }
  void reset_traffic() {
    slots_.reset_traffic();
    replayed_ = 0;
  }
  /// Visits that update a streamed block per write-back of it (the plan's; see
  /// OffloadOptions::writeback_every).
  unsigned writeback_every() const { return plan_.writeback_every; }
  /// Changes the write-back interval K (1..kMaxWritebackEvery) between steps: every lagging
  /// host copy is brought up to date first, so no owed update crosses the change, and the
  /// parameters are the same for any K. A seat of a shared host master keeps the master's K
  /// (ConfigError).
  void set_writeback_every(unsigned k) {
    offload::validate_writeback_every(k);
    if (seat_)
      throw ConfigError("writeback_every", "HostOffload::set_writeback_every: seat " + std::to_string(seat_->seat()) +
                                               " of a shared host master writes back every " +
                                               std::to_string(plan_.writeback_every) + " steps, as the master does");
    if (plan_.streamed_blocks == 0 || k == plan_.writeback_every) return;
    settle();
    close_visit();
    synchronize();
    plan_.writeback_every = k;
    log_.reset(plan_.streamed_blocks, k);
  }
  /// What a visit of a streamed block cost in the timeline's recording (a step recorded with
  /// restart_timeline() before it and end_timeline_visit() after): medians over its perturbing
  /// visits of streamed blocks whose upload was recorded, and of the intervals between the starts
  /// of consecutive ones, in ms (zeros where none was).
  offload::BlockTiming block_timing() const {
    std::vector<double> upload, compute, pass, period;
    const std::vector<GroupVisitTimes> visits = timeline_.read();
    for (std::size_t i = 0; i < visits.size(); ++i) {
      const GroupVisitTimes& v = visits[i];
      if (v.kind != 'p' || v.resident) continue;
      if (i + 1 < visits.size()) {  // the next streamed block's visit of the same sweep
        const GroupVisitTimes& next = visits[i + 1];
        const double gap = next.compute_start - v.compute_start;
        if (next.kind == 'p' && !next.resident && next.group == v.group + 1 && gap > 0) period.push_back(gap);
      }
      const double up = v.upload_end - v.upload_start, busy = v.compute_end - v.compute_start,
                   own = v.pass_end - v.compute_start;
      if (!(up > 0) || !(busy > 0) || !(own > 0)) continue;  // NaN: not recorded
      upload.push_back(up);
      compute.push_back(busy);
      pass.push_back(own);
    }
    const auto median = [](std::vector<double>& x) {
      if (x.empty()) return 0.0;
      std::nth_element(x.begin(), x.begin() + x.size() / 2, x.end());
      return x[x.size() / 2];
    };
    return {median(upload), median(compute), median(pass), median(period)};
  }
  /// Which updates each streamed block's host copy lacks (index: streamed block, group - 1).
  const offload::WritebackLog& writeback_log() const { return log_; }
  /// Pinned host memory this engine allocated itself (the streamed blocks' masters and rule
  /// state): 0 for a seat of a shared host master, whose masters are the master's.
  std::size_t owned_pinned_bytes() const { return own_host_.pinned_bytes(); }
  /// The seat this engine holds in a shared host master (-1: none, a lone engine).
  long seat() const { return seat_ ? static_cast<long>(seat_->seat()) : -1; }
  /// A seat of a shared host master across processes, once every seat's process has attached:
  /// removes the shared memory's name (SharedHostMaster::remove_name; nothing elsewhere).
  void remove_shared_master_name() {
    if (seat_) seat_->core().remove_name();
  }
  /// A seat of a shared host master: how long any seat waits for another (the board's timeout,
  /// shared by every seat; see SharedHostMaster::set_wait_timeout). Nothing for a lone engine.
  void set_shared_master_wait(std::chrono::milliseconds t) {
    if (seat_) seat_->core().board().set_timeout(t);
  }
  /// Whether group g's values are this engine's to set (set_group*, set_rule_state, load): all
  /// but a follower seat's streamed groups, which rest in the shared master and are set through
  /// seat 0.
  bool sets_group(GroupIndex g) const { return !seat_ || seat_->leader() || !is_streamed(g); }

 private:
  void init(cudaStream_t compute) {
    const ModelLayout& ml = *layout_;
    plan_ = plan_for(ml, options_);
    if (seat_) {
      host_ = &seat_->core().store();
      slots_.set_gate(seat_.get());
    }
    if (compute) {
      compute_ = compute;
    } else {
      owned_compute_.emplace();
      compute_ = owned_compute_->get();
    }
    codecs_[0] = GroupCodecT(ml.layout(ml.prologue()));
    codecs_[1] = GroupCodecT(ml.layout(ml.block(0)));
    codecs_[2] = GroupCodecT(ml.layout(ml.epilogue()));
    slots_.attach(compute_, upload_.get(), offload_.get(), &timeline_);
    allocate(true);

    const std::size_t visits_per_step = ml.num_groups();
    timeline_ = Timeline(options_.record_timeline
                             ? (options_.timeline_events ? options_.timeline_events : 6 * 3 * visits_per_step + 1)
                             : 0);
    if (options_.record_timeline) timeline_.restart(compute_);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }

  offload_detail::GroupSizes sizes() const {
    offload_detail::GroupSizes s{};
    for (int k = 0; k < 3; ++k) {
      s.encoded_bytes[k] = codecs_[k].bytes();
      s.elements[k] = codecs_[k].total_elements();
    }
    return s;
  }

  /// Allocates what plan_ describes (the passes' tables too when `passes`), zeroed: the device
  /// arena, the pinned host masters, the rule state; the slots over them.
  void allocate(bool passes) {
    // Device: check the plan against free memory first, for a message that says what would fit.
    std::size_t free_b = 0, total_b = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (plan_.device_bound_bytes > free_b) throw device_oom(free_b, nullptr);
    try {
      arena_.allocate(plan_, sizes(), options_.one_perturbed_copy, compute_);
      if (passes) {
        const ModelLayout& ml = *layout_;
        for (int k = 0; k < 3; ++k)
          passes_[k] = Pass(codecs_[k], ml.layout(k == 0 ? ml.prologue() : k == 1 ? ml.block(0) : ml.epilogue()));
      }
    } catch (const OutOfMemory& e) {
      throw device_oom(free_b, &e);
    }
    if (!seat_)  // a seat's masters are the shared master's
      host_->allocate_masters(plan_.streamed_blocks, plan_.block_bytes,
                              std::to_string(plan_.streamed_blocks) + " streamed blocks of " +
                                  std::to_string(plan_.block_bytes) + " bytes in codec " + Codec::name);
    slots_.reset(host_, codecs_[1].bytes(), 0, arena_.slot_data(), {}, plan_.streamed_blocks, options_.prefetch_depth);
    log_.reset(plan_.streamed_blocks, plan_.writeback_every);  // the host copies are the masters
    allocate_state();
  }

  /// The rule state's buffers for plan_ (none without state), zeroed; every slot is emptied.
  void allocate_state() {
    arena_.release_state();
    if (!seat_) host_->allocate_state(0, 0, "");
    if (plan_.state_slots) {
      std::size_t free_b = 0, total_b = 0;
      ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      if (offload_detail::align_up(plan_.state_arena_bytes, std::size_t{2} << 20) > free_b)
        throw OutOfMemory("HostOffload: " + std::to_string(plan_.state_arena_bytes >> 20) +
                          " MiB of device memory for " + std::to_string(plan_.state_slots) +
                          " rule state values per parameter, " + std::to_string(free_b >> 20) + " MiB free");
    }
    arena_.allocate_state(plan_, sizes(), compute_);
    if (!seat_)
      host_->allocate_state(plan_.streamed_blocks, plan_.block_state_bytes,
                            "the rule state of " + std::to_string(plan_.streamed_blocks) + " streamed blocks (" +
                                std::to_string(plan_.state_slots) + (plan_.state_value_bytes == 2 ? " bf16" : " fp32") +
                                " values per parameter)");
    slots_.set_state_rooms(arena_.slot_states(), plan_.state_slots ? state_bytes_of(1) : 0);
    ZO2_CUDA_CHECK(cudaStreamSynchronize(compute_));
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
      slots_.reset(host_, 0, 0, {}, {}, 0, 1);
      arena_.release();
      host_->release();
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
  const typename offload_detail::DeviceArena<T>::Scratch& scratch_for(GroupIndex g) const {
    return arena_.scratch(g.value == 0 ? 0 : 1);
  }
  bool is_streamed(GroupIndex g) const { return kind_of(g) == 1 && g.value - 1 < plan_.streamed_blocks; }
  std::span<unsigned char> host_block(GroupIndex g) const { return {host_->master(g.value - 1), codecs_[1].bytes()}; }
  unsigned char* device_master(GroupIndex g) const {
    const int k = kind_of(g);
    if (k == 0) return arena_.prologue_master();
    if (k == 2) return arena_.epilogue_master();
    return arena_.resident_master(g.value - 1 - plan_.streamed_blocks);
  }
  /// Bytes of the rule state of a group of kind k (0: prologue, 1: block, 2: epilogue).
  std::size_t state_bytes_of(int k) const {
    return std::size_t{plan_.state_slots} * codecs_[k].total_elements() * plan_.state_value_bytes;
  }
  /// The rule state of a device-resident group (null without state).
  void* device_state(GroupIndex g) const {
    if (plan_.state_slots == 0) return nullptr;
    const int k = kind_of(g);
    if (k == 0) return arena_.prologue_state();
    if (k == 2) return arena_.epilogue_state();
    return arena_.resident_state(g.value - 1 - plan_.streamed_blocks);
  }
  void check_state_size(GroupIndex g, std::size_t size, const char* what) const {
    const std::size_t want = std::size_t{plan_.state_slots} * codec_for(g).total_elements();
    if (size != want)
      throw ShapeError(std::string("HostOffload::") + what + ": group " + std::to_string(g.value) + " has " +
                       std::to_string(want) + " state values (" + std::to_string(plan_.state_slots) +
                       " per element), got " + std::to_string(size));
  }

  // ---- visits ----------------------------------------------------------------------------------

  /// Starts a visit: the pass arguments with group g's master and rule state on the device,
  /// ordered on compute_ (a streamed block's slot waits for its upload). `writes_back`: the
  /// visit of a streamed block ends with a write-back.
  offload_detail::PassArgs<T> begin_visit(GroupIndex g, char kind, bool writes_back = false) {
    Timeline::Marks m;
    m.group = g.value;
    m.kind = kind;
    m.resident = !is_streamed(g);
    offload_detail::PassArgs<T> a;
    bool from_host = false;
    if (is_streamed(g)) {
      if (seat_ && seat_->stale(g.value - 1)) slots_.invalidate(g.value);  // seat 0 set its host copy
      const offload_detail::Slot& s = slots_.begin(g.value, m, from_host, writes_back);
      a.master = s.data;
      a.state = s.state;
    } else {
      slots_.begin_resident();
      a.master = device_master(g);
      a.state = device_state(g);
      if (kind_of(g) == 0) slots_.prefetch_first();
    }
    m.compute_start = timeline_.mark(compute_);
    open_visit_ = timeline_.add_visit(m);
    if (from_host) replay(g, a.master, a.state);
    return a;
  }

  /// Deferred write-back: the updates streamed group g's host copy lacks, applied in order to
  /// the slot that copy was just uploaded into (on compute_, after the upload: begin() ordered
  /// it), each with the update-only pass apply_update() runs.
  void replay(GroupIndex g, unsigned char* master, void* state) {
    for (const offload::OwedUpdate& owed : log_.owed(g.value - 1)) {
      offload_detail::PassArgs<T> a;
      a.master = master;
      a.state = state;
      set_noise(a, owed.seed, 0, 0, 0.0);
      a.pending = &owed.update;  // read while the launch is issued
      a.mode = offload_detail::PassMode::kUpdate;
      run(g, a);
      ++replayed_;
    }
  }

  /// settle(g) for the const readers of host copies. Bringing a host copy up to date changes
  /// no parameter the policy represents, only where its latest value rests; and a host copy can
  /// only lag after a non-const call (prepare), so an object defined const never gets here.
  void settle_lagging(GroupIndex g) const {
    if (is_streamed(g) && log_.lag(g.value - 1) != 0) const_cast<HostOffload*>(this)->settle(g);
  }

  /// Before a caller reads group g's host copy (or device copy): bring it up to date and wait
  /// for the copies. A follower seat cannot write a lagging block back (the leader's copy
  /// comes with the leader's own calls): it throws, or waits for the leader's version.
  void before_host_read(GroupIndex g, const char* what) const {
    if (seat_ && !seat_->leader() && is_streamed(g)) {
      const std::size_t b = g.value - 1;
      if (log_.lag(b) != 0)
        throw Error(std::string("HostOffload::") + what + ": seat " + std::to_string(seat_->seat()) +
                    "'s shared host copy of streamed group " + std::to_string(g.value) + " lacks " +
                    std::to_string(log_.lag(b)) + " updates, which seat 0 writes back: flush on every seat first");
      synchronize();
      seat_->await_host(b);
      return;
    }
    settle_lagging(g);
    synchronize();
  }

  /// Before group g's host copy is set from outside: on a seat of a shared host master only
  /// seat 0 sets a streamed group, with nothing owed, where every seat stands (ConfigError).
  void before_host_write(GroupIndex g, const char* what) {
    if (!seat_ || !is_streamed(g)) return;
    if (!seat_->leader())
      throw ConfigError("seat", std::string("HostOffload::") + what + ": streamed group " + std::to_string(g.value) +
                                    " rests in the host master seat " + std::to_string(seat_->seat()) +
                                    " shares with seat 0: set it through seat 0 (a follower sets its "
                                    "device-resident groups only)");
    if (log_.lag(g.value - 1) != 0)
      throw ConfigError("seat", std::string("HostOffload::") + what + ": streamed group " + std::to_string(g.value) +
                                    " of the shared host master lacks " + std::to_string(log_.lag(g.value - 1)) +
                                    " updates: flush on every seat first");
    seat_->replace(g.value - 1);
  }

  /// Before group g's host copy is replaced: with rule state (which stays) the copy is brought
  /// up to date first; without, what it lacked is simply forgotten.
  void drop_lag(GroupIndex g) {
    if (!is_streamed(g)) return;
    if (plan_.state_slots) settle(g);
    log_.settled(g.value - 1);
  }

  /// Ends a visit after its pass was launched: write-back and freeing of the slot, prefetch.
  /// `hold`: the slot is freed later, when materialize() has read it (or by the next call).
  void end_visit(GroupIndex g, bool write_back, bool hold = false) {
    if (!slots_.visiting()) {
      if (kind_of(g) == 2) slots_.prefetch_first();
      return;
    }
    slots_.end(g.value, write_back, hold, passes_[1].head_bytes(), timeline_.visit(open_visit_));
  }

  /// The compute of the previous visit ends where the next policy call begins on compute_; a
  /// slot still held (materialize() was not called) is freed there.
  void close_visit() {
    slots_.release_held();
    if (auto* v = timeline_.visit(open_visit_)) v->compute_end = timeline_.mark(compute_);
    open_visit_ = -1;
  }

  void set_noise(offload_detail::PassArgs<T>& a, std::uint64_t seed, std::uint32_t step, std::uint32_t query,
                 double eps) const {
    a.seed = seed;
    a.step = step;
    a.query = query;
    a.eps = eps;
  }

  /// Runs group g's codec pass with `a` on compute_.
  void run(GroupIndex g, offload_detail::PassArgs<T>& a) {
    a.first_tensor_id = layout_->first_tensor_id(g);
    a.state_bf16 = plan_.state_value_bytes == 2;
    offload_detail::run_pass(passes_[kind_of(g)], a, plan_.state_slots, compute_, slots_.body_done());
  }

  std::unique_ptr<ModelLayout> layout_;  // views point at its layouts: keep its address fixed
  OffloadOptions options_;
  Plan plan_;
  std::optional<Stream> owned_compute_;
  cudaStream_t compute_ = nullptr;
  Stream upload_, offload_;
  GroupCodecT codecs_[3];  // prologue, block, epilogue (the passes keep pointers: fixed addresses)
  Pass passes_[3];
  offload_detail::DeviceArena<T> arena_;
  std::unique_ptr<offload_detail::SeatGate> seat_;  // a seat of a shared host master (null: none)
  offload_detail::HostStore own_host_;              // a lone engine's masters (empty for a seat)
  offload_detail::HostStore* host_ = &own_host_;    // the masters this engine streams
  offload_detail::SlotCache slots_;
  offload::WritebackLog log_;  // what each streamed block's host copy lacks (deferred write-back)
  std::size_t replayed_ = 0;
  Timeline timeline_;
  int open_visit_ = -1;
};

}  // namespace zo2::gpu
