// zo2/optim/step_types.hpp -- what the optimizer tells a policy about a step, and reports back.
#pragma once

#include <cstdint>

#include <zo2/core/param_layout.hpp>

namespace zo2 {

/// An update whose projected gradient is known but which has not touched memory yet (ZO2's lazy
/// update: step t's update of a group is applied when that group is next visited, at step t+1).
struct PendingUpdate {
  std::uint32_t step;  // the step whose z the update uses
  double g;            // projected gradient (L+ - L-) / (2 eps)
  double lr;           // learning rate of that step
  double weight_decay; // lambda (applied to tensors flagged for decay only)
};

/// The noise of the step being computed, and the update still owed from the step before it.
struct StepNoise {
  std::uint64_t seed;
  std::uint32_t step;
  double eps;
  const PendingUpdate* pending;  // null when nothing is owed
};

/// What a policy's prepare(group, noise) hands the model: theta + eps z and theta - eps z of one
/// group, in the model's precision, valid until the next prepare() of a group of the same kind.
/// A policy that keeps one perturbed copy per group (see ZOOptimizer) hands out two views of the
/// same memory, holding theta + eps z until it is told to materialize theta - eps z.
template <class T>
struct PerturbedViews {
  ParamView<const T> plus, minus;
};

/// Which of the two perturbed copies.
enum class Side { kPlus, kMinus };

struct StepResult {
  std::uint64_t step = 0;
  double loss_plus = 0, loss_minus = 0;
  double projected_grad = 0;
  double lr = 0;
  /// True when L+ or L- was not finite: no update is scheduled for this step.
  bool skipped = false;
};

}  // namespace zo2
