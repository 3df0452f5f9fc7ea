// zo2/optim/zo_optimizer.hpp -- MeZO-SGD over any layer stack, with ZO2's dual forward and
// lazy update. It knows nothing about transformers or devices: the Model computes, the Policy
// decides where parameters rest and hands out perturbed copies.
//
// One step t (ARCHITECTURE.md):
//   for each group in order (prologue, block 0..N-1, epilogue):
//     policy.prepare(group): apply step t-1's update (owed since t-1's loss was known), and
//                            produce theta + eps z_t and theta - eps z_t in one pass;
//     run the group's forward on both copies (h+ and h- advance side by side);
//   g_t = (L+ - L-) / (2 eps); the update of step t is now owed to every group.
// So each group is visited once per step, and the update costs no pass of its own.
//
// A policy may keep ONE perturbed copy of a group instead of two (OnePerturbedCopy below: the
// offload engine does, to halve its scratch): prepare() then writes theta + eps z only, and the
// optimizer asks for theta - eps z (z regenerated from the seed) between the group's two
// forwards. The tied prologue copy is re-materialized for the epilogue, minus side first.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include <zo2/core/config.hpp>
#include <zo2/core/error.hpp>
#include <zo2/offload/resident.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>

namespace zo2 {

/// A policy whose prepare() may leave both views on one buffer holding theta + eps z;
/// materialize(g, noise, side) then rewrites group g's buffer as theta +- eps z (no update).
template <class P>
concept OnePerturbedCopy = requires(P& p, const P& cp, GroupIndex g, const StepNoise& noise) {
  { cp.shares_perturbed_copy() } -> std::convertible_to<bool>;
  p.materialize(g, noise, Side::kMinus);
};

/// Where a run stands; with the parameters (flushed) it is all a checkpoint needs.
struct OptimizerState {
  std::uint64_t step = 0;  // index of the next step to run
  std::uint64_t seed = 0;
  std::uint64_t skipped_steps = 0;
};

template <LayerStack Model,
          class Policy = Resident<typename Model::value_type, typename Model::value_type>>
class ZOOptimizer {
 public:
  using Batch = typename Model::Batch;
  using Activation = typename Model::Activation;

  /// `start_step` resumes a run: with the parameters saved after flush() at that step and the
  /// same seed, the continuation is bit-identical to an uninterrupted run.
  ZOOptimizer(const Model& model, Policy& policy, ZOConfig config, std::uint64_t start_step = 0)
      : model_(&model), policy_(&policy), config_(std::move(config)), step_(start_step) {
    config_.validate();
    if (model.num_blocks() == 0) throw ConfigError("num_blocks", "a layer stack needs at least one block");
    if (!(ModelLayout::of(model).layout(GroupIndex{1}) == policy.model_layout().layout(GroupIndex{1})) ||
        policy.model_layout().num_blocks() != model.num_blocks())
      throw ConfigError("policy", "the parameter store was built for a different model layout");
  }

  /// One MeZO-SGD step on `batch`.
  StepResult step(const Batch& batch) {
    if (step_ >= std::numeric_limits<std::uint32_t>::max())
      throw Error("step counter exhausted: the noise counter holds 2^32 - 1 steps");
    const ModelLayout& ml = policy_->model_layout();
    const StepNoise noise{config_.seed, static_cast<std::uint32_t>(step_), config_.eps,
                          pending_ ? &*pending_ : nullptr};

    const bool one_copy = shares_perturbed_copy();
    const auto to_minus = [&](GroupIndex g) {
      if constexpr (OnePerturbedCopy<Policy>) {
        if (one_copy) policy_->materialize(g, noise, Side::kMinus);
      }
    };

    auto p = policy_->prepare(ml.prologue(), noise);
    model_->prologue(p.plus, batch, plus_, workspace_);
    to_minus(ml.prologue());
    model_->prologue(p.minus, batch, minus_, workspace_);
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
      auto b = policy_->prepare(ml.block(i), noise);
      model_->forward_block(i, b.plus, plus_, next_, workspace_);
      std::swap(plus_, next_);
      to_minus(ml.block(i));
      model_->forward_block(i, b.minus, minus_, next_, workspace_);
      std::swap(minus_, next_);
    }
    auto e = policy_->prepare(ml.epilogue(), noise);
    StepResult r;
    r.step = step_;
    if (!one_copy) {
      r.loss_plus = model_->epilogue(e.plus, p.plus, plus_, batch, workspace_);
      r.loss_minus = model_->epilogue(e.minus, p.minus, minus_, batch, workspace_);
    } else if constexpr (OnePerturbedCopy<Policy>) {
      // The prologue's copy holds theta - eps z since its second forward: the minus loss first.
      policy_->materialize(ml.epilogue(), noise, Side::kMinus);
      r.loss_minus = model_->epilogue(e.minus, p.minus, minus_, batch, workspace_);
      policy_->materialize(ml.epilogue(), noise, Side::kPlus);
      policy_->materialize(ml.prologue(), noise, Side::kPlus);
      r.loss_plus = model_->epilogue(e.plus, p.plus, plus_, batch, workspace_);
    }
    r.lr = config_.lr_at(step_);
    // The owed update was applied to every group by the prepare() calls above.
    pending_.reset();
    if (!std::isfinite(r.loss_plus) || !std::isfinite(r.loss_minus)) {
      r.skipped = true;
      ++skipped_;
    } else {
      r.projected_grad = (r.loss_plus - r.loss_minus) / (2.0 * config_.eps);
      pending_ = PendingUpdate{static_cast<std::uint32_t>(step_), r.projected_grad, r.lr,
                               config_.weight_decay};
    }
    ++step_;
    return r;
  }

  /// Applies the owed update everywhere, so the master parameters equal theta after the last
  /// step. Call before saving or evaluating; the run continues bit-identically afterwards.
  void flush() {
    if (!pending_) return;
    const ModelLayout& ml = policy_->model_layout();
    for (std::size_t g = 0; g < ml.num_groups(); ++g)
      policy_->apply_update(GroupIndex{g}, config_.seed, *pending_);
    pending_.reset();
  }

  /// Loss at the current parameters (after flush), no perturbation.
  double evaluate(const Batch& batch) {
    flush();
    const ModelLayout& ml = policy_->model_layout();
    const auto prologue = policy_->current(ml.prologue());
    model_->prologue(prologue, batch, plus_, workspace_);
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
      model_->forward_block(i, policy_->current(ml.block(i)), plus_, next_, workspace_);
      std::swap(plus_, next_);
    }
    return model_->epilogue(policy_->current(ml.epilogue()), prologue, plus_, batch, workspace_);
  }

  OptimizerState state() const { return {step_, config_.seed, skipped_}; }
  /// Whether the policy keeps one perturbed copy per group (see OnePerturbedCopy).
  bool shares_perturbed_copy() const {
    if constexpr (OnePerturbedCopy<Policy>) return policy_->shares_perturbed_copy();
    else return false;
  }
  bool has_pending_update() const { return pending_.has_value(); }
  const ZOConfig& config() const { return config_; }

 private:
  const Model* model_;
  Policy* policy_;
  ZOConfig config_;
  std::uint64_t step_;
  std::uint64_t skipped_ = 0;
  std::optional<PendingUpdate> pending_;
  Activation plus_, minus_, next_;
  typename Model::Workspace workspace_;
};

}  // namespace zo2
