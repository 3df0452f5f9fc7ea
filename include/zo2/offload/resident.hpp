// zo2/offload/resident.hpp -- the Resident policy on the host: every group stays in the
// ParameterStore's memory; perturbed copies are written into two scratch buffers.
//
// Perturbing into scratch copies instead of in place keeps the master exact: theta only ever
// changes by an update, never by the round trip theta + ez - 2ez + ez of in-place MeZO.
// The prologue has scratch of its own, so its perturbed copies stay valid until the epilogue
// (which may read them: an LM head tied to the token embeddings).
//
// With ResidentOptions::one_perturbed_copy the policy keeps one scratch per group kind, as the
// offload engine does by default: prepare() writes theta + eps z and materialize() rewrites it
// as theta - eps z when ZOOptimizer asks (OnePerturbedCopy). It saves a block's and the
// prologue's copy of host memory for one more noise pass per group; results are bit-identical.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <zo2/backend/cpu/perturber.hpp>
#include <zo2/core/error.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2 {

struct ResidentOptions {
  /// One perturbed copy per group kind instead of two (see the file comment).
  bool one_perturbed_copy = false;
};

/// S: storage precision of the master copy; T: the precision the model's forward reads.
template <class S, class T>
class Resident {
 public:
  using storage_type = S;
  using value_type = T;
  using state_type = compute_t<S>;  // the rule state's element type

  explicit Resident(ParameterStore<S>& store, ResidentOptions options = {}) : store_(&store), options_(options) {
    const ModelLayout& ml = store.model_layout();
    const std::size_t prologue = ml.layout(ml.prologue()).total_elements();
    const std::size_t largest = std::max(ml.layout(ml.block(0)).total_elements(),
                                         ml.layout(ml.epilogue()).total_elements());
    scratch_[0].plus.assign(prologue, T{});
    scratch_[1].plus.assign(largest, T{});
    if (!options_.one_perturbed_copy) {
      scratch_[0].minus.assign(prologue, T{});
      scratch_[1].minus.assign(largest, T{});
    }
  }

  using Perturbed = PerturbedViews<T>;

  /// The fused pass for group g: apply the owed update (if any), then write theta +- eps z.
  Perturbed prepare(GroupIndex g, const StepNoise& noise) {
    ParamView<S> theta = store_->group(g);
    const ParamLayout& layout = theta.layout();
    Scratch& scratch = scratch_for(g);
    T* minus = options_.one_perturbed_copy ? nullptr : scratch.minus.data();  // null: one copy
    for_each_tensor(g, noise.seed, noise.pending, [&]<class Rule>(std::size_t r, NoiseId id, state_type* state, std::size_t stride) {
      const std::size_t off = layout.offset(r);
      cpu::Perturber<S>::template update_and_perturb_into<Rule, T>(
          theta.tensor(r), scratch.plus.data() + off, minus ? minus + off : nullptr, layout.spec(r).numel(),
          noise.pending, layout.spec(r).weight_decay, state, stride, id,
          NoiseId{noise.seed, noise.step, id.tensor, noise.query}, noise.eps);
    });
    return {ParamView<const T>(scratch.plus.data(), &layout),
            ParamView<const T>(minus ? minus : scratch.plus.data(), &layout)};
  }

  /// Whether prepare() leaves one copy for both views (ResidentOptions::one_perturbed_copy).
  bool shares_perturbed_copy() const { return options_.one_perturbed_copy; }

  /// Rewrites group g's perturbed copy (the buffer of prepare()'s plus view) as theta + eps z or
  /// theta - eps z of noise.step and noise.query.
  void materialize(GroupIndex g, const StepNoise& noise, Side side) {
    ParamView<const S> theta = std::as_const(*store_).group(g);
    const ParamLayout& layout = theta.layout();
    const std::uint32_t first_id = store_->model_layout().first_tensor_id(g);
    const double c = side == Side::kPlus ? noise.eps : -noise.eps;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r)
      cpu::Perturber<S>::add_scaled_noise_into(scratch_for(g).plus.data() + layout.offset(r), theta.tensor(r),
                                               layout.spec(r).numel(),
                                               NoiseId{noise.seed, noise.step, first_id + static_cast<std::uint32_t>(r),
                                                       noise.query},
                                               c);
  }

  /// theta of group g in the model's precision (no perturbation), for evaluation.
  ParamView<const T> current(GroupIndex g) {
    ParamView<const S> theta = std::as_const(*store_).group(g);
    const ParamLayout& layout = theta.layout();
    if constexpr (std::is_same_v<S, T>) {
      return theta;
    } else {
      for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
        const std::size_t n = layout.spec(r).numel();
        const S* src = theta.tensor(r);
        T* dst = scratch_for(g).plus.data() + layout.offset(r);
        for (std::size_t j = 0; j < n; ++j) dst[j] = static_cast<T>(load(src[j]));
      }
      return {scratch_for(g).plus.data(), &layout};
    }
  }

  /// Applies an owed update to group g alone (used to flush before evaluation or a checkpoint).
  void apply_update(GroupIndex g, std::uint64_t seed, const PendingUpdate& pending) {
    ParamView<S> theta = store_->group(g);
    const ParamLayout& layout = theta.layout();
    for_each_tensor(g, seed, &pending, [&]<class Rule>(std::size_t r, NoiseId id, state_type* state, std::size_t stride) {
      cpu::Perturber<S>::template apply<Rule>(theta.tensor(r), state, stride, layout.spec(r).numel(), pending,
                                              layout.spec(r).weight_decay, id);
    });
  }

  const ModelLayout& model_layout() const { return store_->model_layout(); }

  // ---- optimizer state (momentum, Adam's moments) ----------------------------------------------

  /// Per-element state values for a stateful rule: `slots` arrays the size of each group's flat
  /// buffer, zeroed. Called by ZOOptimizer for rules with state; a second call with another count
  /// starts over from zero.
  void reserve_rule_state(unsigned slots) {
    const ModelLayout& ml = store_->model_layout();
    state_slots_ = slots;
    state_offset_.assign(ml.num_groups() + 1, 0);
    for (std::size_t g = 0; g < ml.num_groups(); ++g)
      state_offset_[g + 1] = state_offset_[g] + slots * ml.layout(GroupIndex{g}).total_elements();
    state_.assign(state_offset_.back(), state_type{});
  }
  unsigned rule_state_slots() const { return state_slots_; }
  /// Group g's state: rule_state_slots() arrays of the group's flat size, one after another.
  std::span<const state_type> rule_state(GroupIndex g) const {
    if (state_slots_ == 0) return {};
    return std::span<const state_type>(state_).subspan(state_offset_.at(g.value), state_offset_.at(g.value + 1) - state_offset_[g.value]);
  }
  std::span<state_type> rule_state(GroupIndex g) {
    if (state_slots_ == 0) return {};
    return std::span<state_type>(state_).subspan(state_offset_.at(g.value), state_offset_.at(g.value + 1) - state_offset_[g.value]);
  }

  /// Group g's state as floats (checkpoints), and back.
  void get_rule_state(GroupIndex g, std::span<float> out) const {
    const auto s = rule_state(g);
    if (out.size() != s.size()) throw ShapeError("get_rule_state: expected " + std::to_string(s.size()) + " values");
    for (std::size_t i = 0; i < s.size(); ++i) out[i] = static_cast<float>(s[i]);
  }
  void set_rule_state(GroupIndex g, std::span<const float> in) {
    auto s = rule_state(g);
    if (in.size() != s.size()) throw ShapeError("set_rule_state: expected " + std::to_string(s.size()) + " values");
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<state_type>(in[i]);
  }

 private:
  struct Scratch {
    std::vector<T> plus, minus;
  };
  Scratch& scratch_for(GroupIndex g) { return scratch_[g.value == 0 ? 0 : 1]; }

  /// Calls f.template operator()<Rule>(tensor r, its noise id, its state, state stride) for each
  /// tensor of group g, Rule the owed update's rule (SgdRule when nothing is owed).
  template <class F>
  void for_each_tensor(GroupIndex g, std::uint64_t seed, const PendingUpdate* pending, F&& f) {
    const ParamLayout& layout = store_->model_layout().layout(g);
    const std::uint32_t first_id = store_->model_layout().first_tensor_id(g);
    const std::size_t stride = layout.total_elements();
    visit_rule(pending ? pending->rule : RuleId::kSgd, [&]<class Rule>(RuleTag<Rule>) {
      if constexpr (Rule::kStateSlots > 0)
        if (pending && Rule::kStateSlots > state_slots_)
          throw ConfigError("optimizer", "the policy holds no state for this update rule (reserve_rule_state)");
      state_type* state = Rule::kStateSlots > 0 ? state_.data() + state_offset_.at(g.value) : nullptr;
      for (std::size_t r = 0; r < layout.num_tensors(); ++r)
        f.template operator()<Rule>(r, NoiseId{seed, 0, first_id + static_cast<std::uint32_t>(r)},
                                    state ? state + layout.offset(r) : nullptr, stride);
    });
  }

  ParameterStore<S>* store_;
  ResidentOptions options_;
  Scratch scratch_[2];  // [0]: the prologue's, [1]: shared by the blocks and the epilogue
  unsigned state_slots_ = 0;
  std::vector<std::size_t> state_offset_;  // group g's state starts at state_offset_[g]
  std::vector<state_type> state_;
};

}  // namespace zo2
