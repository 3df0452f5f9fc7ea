// zo2/offload/cuda_resident.cuh -- the Resident policy on the GPU: the master copy of every group
// lives in device memory; perturbed copies are written into device scratch by one fused launch
// per group (backend/cuda/perturb.cuh).
//
// Same interface and the same scratch discipline as offload/resident.hpp, so ZOOptimizer drives
// it unchanged: the prologue has scratch of its own, so its perturbed copies stay valid until the
// epilogue (which may read them: an LM head tied to the token embeddings); the blocks and the
// epilogue share the other scratch pair.
//
// Optimizer state (momentum, Adam's moments) lives on the device beside the master:
// reserve_rule_state(slots) keeps `slots` float arrays of each group's flat size, zeroed, laid out
// per group as Resident's (slot k of element e at [k * group size + e]); the fused pass reads and
// writes it in the same launch as the update.
//
// Streams: every kernel of the policy runs on stream(), asynchronously; nothing here blocks
// except upload and download. The model's forward must enqueue its work on the same stream (or
// order itself after it), and its epilogue must synchronize before it returns the loss to the
// host. The views handed out point at device memory; their layouts live on the host.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/core/error.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2::gpu {

/// S: storage precision of the master copy (float, bfloat16, float16); T: the precision the
/// model's forward reads (float, bfloat16, float16).
template <class S, class T>
class CudaResident {
 public:
  using storage_type = S;
  using value_type = T;

  using Perturbed = PerturbedViews<T>;

  /// Uploads every group of `store` to the device; the policy owns a stream of its own.
  explicit CudaResident(const ParameterStore<S>& store) : CudaResident(store, nullptr, true) {}
  /// The same, running on `stream`, which the caller owns and keeps alive longer than the policy.
  CudaResident(const ParameterStore<S>& store, cudaStream_t stream) : CudaResident(store, stream, false) {}
  /// Allocates the master for `layout` on the device, zeroed, with no host copy (fill it through
  /// master(g) or upload()): a large model's weights can be drawn on the device without staging
  /// them in host memory. Runs on `stream` (null: the policy owns one).
  CudaResident(ModelLayout layout, cudaStream_t stream)
      : CudaResident(std::move(layout), stream, stream == nullptr, Allocate{}) {}

  CudaResident(const CudaResident&) = delete;
  CudaResident& operator=(const CudaResident&) = delete;

  /// The fused pass for group g: apply the owed update (if any), then write theta +- eps z.
  Perturbed prepare(GroupIndex g, const StepNoise& noise) {
    Scratch& s = scratch_for(g);
    if (noise.pending) check_rule_state(*noise.pending);
    update_and_perturb(master_ptr(g), s.plus.data(), s.minus.data(), table_for(g),
                       layout_->first_tensor_id(g), noise, stream_, device_rule_state(g));
    const ParamLayout& layout = layout_->layout(g);
    return {ParamView<const T>(s.plus.data(), &layout), ParamView<const T>(s.minus.data(), &layout)};
  }

  /// Rewrites group g's perturbed copy (the buffer of prepare()'s plus view) as theta + eps z or
  /// theta - eps z of noise.step and noise.query (ZOOptimizer's further probes).
  void materialize(GroupIndex g, const StepNoise& noise, Side side) {
    perturb_into(scratch_for(g).plus.data(), master_ptr(g), table_for(g), layout_->first_tensor_id(g), noise.seed,
                 noise.step, side == Side::kPlus ? noise.eps : -noise.eps, stream_, noise.query);
  }

  /// theta of group g in the model's precision (no perturbation), for evaluation.
  ParamView<const T> current(GroupIndex g) {
    const ParamLayout& layout = layout_->layout(g);
    if constexpr (std::is_same_v<S, T>) {
      return ParamView<const T>(master_ptr(g), &layout);
    } else {
      T* dst = scratch_for(g).plus.data();
      convert(dst, master_ptr(g), table_for(g), stream_);
      return ParamView<const T>(dst, &layout);
    }
  }

  /// Applies an owed update to group g alone (used to flush before evaluation or a checkpoint).
  void apply_update(GroupIndex g, std::uint64_t seed, const PendingUpdate& pending) {
    check_rule_state(pending);
    update(master_ptr(g), table_for(g), layout_->first_tensor_id(g), seed, pending, stream_, device_rule_state(g));
  }

  const ModelLayout& model_layout() const { return *layout_; }
  cudaStream_t stream() const { return stream_; }
  void synchronize() const { ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  /// The device master copy of group g (for a model's own use, or tests).
  ParamView<S> master(GroupIndex g) { return {master_ptr(g), &layout_->layout(g)}; }
  ParamView<const S> master(GroupIndex g) const { return {master_ptr(g), &layout_->layout(g)}; }

  /// Replaces the master copy with `store`'s (same model layout). Blocks until copied.
  void upload(const ParameterStore<S>& store) {
    check_same_layout(store.model_layout(), "upload");
    for (std::size_t g = 0; g < layout_->num_groups(); ++g) {
      const GroupIndex gi{g};
      const std::size_t n = layout_->layout(gi).total_elements();
      if (n) copy_to_device(master_ptr(gi), store.group(gi).data(), n, stream_);
    }
    synchronize();
  }

  /// Copies the master copy into `store` (same model layout), e.g. for a checkpoint; call the
  /// optimizer's flush() first so it holds theta after the last step. Blocks until copied.
  void download(ParameterStore<S>& store) const {
    check_same_layout(store.model_layout(), "download");
    for (std::size_t g = 0; g < layout_->num_groups(); ++g) {
      const GroupIndex gi{g};
      const std::size_t n = layout_->layout(gi).total_elements();
      if (n) copy_to_host(store.group(gi).data(), master_ptr(gi), n, stream_);
    }
    synchronize();
  }

  /// Device memory the policy holds, in bytes (master, scratch and rule state).
  std::size_t device_bytes() const {
    return master_.bytes() + scratch_[0].plus.bytes() + scratch_[0].minus.bytes() +
           scratch_[1].plus.bytes() + scratch_[1].minus.bytes() + state_.bytes();
  }

  // ---- optimizer state (momentum, Adam's moments) ----------------------------------------------

  /// Per-element state values for a stateful rule: `slots` float arrays the size of each group's
  /// flat buffer, on the device, zeroed. Called by ZOOptimizer for rules with state; a second
  /// call with another count starts over from zero (0 frees it). Blocks until zeroed.
  void reserve_rule_state(unsigned slots) {
    synchronize();  // no queued pass may still use the old arrays
    state_ = DeviceBuffer<float>();
    state_slots_ = 0;
    if (slots > 0) {
      state_ = DeviceBuffer<float>(static_cast<std::size_t>(slots) * group_offset_.back());
      if (state_.bytes()) ZO2_CUDA_CHECK(cudaMemsetAsync(state_.data(), 0, state_.bytes(), stream_));
      synchronize();
    }
    state_slots_ = slots;
  }
  unsigned rule_state_slots() const { return state_slots_; }
  /// Values of group g's state: rule_state_slots() arrays of the group's flat size.
  std::size_t rule_state_size(GroupIndex g) const {
    return static_cast<std::size_t>(state_slots_) * layout_->layout(g).total_elements();
  }
  /// Group g's state on the device (slot k of element e at [k * group size + e]); empty when
  /// the policy keeps none.
  DeviceRuleState device_rule_state(GroupIndex g) const {
    if (state_slots_ == 0) return {};
    return {state_.data() + static_cast<std::size_t>(state_slots_) * group_offset_.at(g.value),
            layout_->layout(g).total_elements(), state_slots_};
  }

  /// Group g's state copied to the host (checkpoints), and back; `out` / `in` hold
  /// rule_state_size(g) values. Both wait for the policy's queued work and block until copied.
  void get_rule_state(GroupIndex g, std::span<float> out) const {
    const std::size_t n = rule_state_size(g);
    if (out.size() != n) throw ShapeError("get_rule_state: expected " + std::to_string(n) + " values");
    if (n) copy_to_host(out.data(), device_rule_state(g).data, n, stream_);
    synchronize();
  }
  void set_rule_state(GroupIndex g, std::span<const float> in) {
    const std::size_t n = rule_state_size(g);
    if (in.size() != n) throw ShapeError("set_rule_state: expected " + std::to_string(n) + " values");
    if (n) copy_to_device(device_rule_state(g).data, in.data(), n, stream_);
    synchronize();
  }

 private:
  struct Scratch {
    DeviceBuffer<T> plus, minus;
  };

  struct Allocate {};
  CudaResident(const ParameterStore<S>& store, cudaStream_t stream, bool own_stream)
      : CudaResident(store.model_layout(), stream, own_stream, Allocate{}) {
    upload(store);
  }
  CudaResident(ModelLayout layout, cudaStream_t stream, bool own_stream, Allocate)
      : layout_(std::make_unique<ModelLayout>(std::move(layout))) {
    if (own_stream) {
      owned_stream_.emplace();
      stream_ = owned_stream_->get();
    } else {
      stream_ = stream;
    }
    const ModelLayout& ml = *layout_;
    group_offset_.resize(ml.num_groups() + 1, 0);
    for (std::size_t g = 0; g < ml.num_groups(); ++g)
      group_offset_[g + 1] = group_offset_[g] + ml.layout(GroupIndex{g}).total_elements();
    master_ = DeviceBuffer<S>(group_offset_.back());
    tables_[0] = GroupTable(ml.layout(ml.prologue()));
    tables_[1] = GroupTable(ml.layout(ml.block(0)));
    tables_[2] = GroupTable(ml.layout(ml.epilogue()));
    const std::size_t prologue = ml.layout(ml.prologue()).total_elements();
    const std::size_t largest = std::max(ml.layout(ml.block(0)).total_elements(),
                                         ml.layout(ml.epilogue()).total_elements());
    scratch_[0].plus = DeviceBuffer<T>(prologue);
    scratch_[0].minus = DeviceBuffer<T>(prologue);
    scratch_[1].plus = DeviceBuffer<T>(largest);
    scratch_[1].minus = DeviceBuffer<T>(largest);
    if (master_.bytes()) ZO2_CUDA_CHECK(cudaMemsetAsync(master_.data(), 0, master_.bytes(), stream_));
  }

  void check_rule_state(const PendingUpdate& pending) const {
    if (zo2::rule_state_slots(pending.rule) > state_slots_)
      throw ConfigError("optimizer", "the policy holds no state for this update rule (reserve_rule_state)");
  }

  void check_same_layout(const ModelLayout& other, const char* what) const {
    const ModelLayout& ml = *layout_;
    bool same = other.num_blocks() == ml.num_blocks();
    for (std::size_t g = 0; same && g < 3; ++g) {
      const GroupIndex gi = g == 0 ? ml.prologue() : g == 1 ? ml.block(0) : ml.epilogue();
      same = other.layout(gi) == ml.layout(gi);
    }
    if (!same)
      throw ConfigError("store", std::string("CudaResident::") + what +
                                     ": the parameter store has a different model layout");
  }

  // Group offsets are sums of multiples of kTensorAlignment elements: every group starts 16-byte
  // aligned in the one master allocation.
  S* master_ptr(GroupIndex g) const { return master_.data() + group_offset_.at(g.value); }
  const GroupTable& table_for(GroupIndex g) const {
    if (g.value == 0) return tables_[0];
    return g.value <= layout_->num_blocks() ? tables_[1] : tables_[2];
  }
  Scratch& scratch_for(GroupIndex g) { return scratch_[g.value == 0 ? 0 : 1]; }

  std::unique_ptr<ModelLayout> layout_;  // views point at its layouts: keep its address fixed
  std::optional<Stream> owned_stream_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::size_t> group_offset_;
  DeviceBuffer<S> master_;
  GroupTable tables_[3];  // prologue, block (shared by all blocks), epilogue
  Scratch scratch_[2];    // [0]: the prologue's, [1]: shared by the blocks and the epilogue
  unsigned state_slots_ = 0;
  DeviceBuffer<float> state_;  // group g's at state_slots_ * group_offset_[g]
};

}  // namespace zo2::gpu
