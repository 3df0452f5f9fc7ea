// zo2/optim/step_types.hpp -- what the optimizer tells a policy about a step, and reports back.
#pragma once

#include <cstdint>

#include <zo2/core/param_layout.hpp>
#include <zo2/core/update_rules.hpp>

namespace zo2 {

/// Queries one step may draw (q-query estimates: q independent z per step).
inline constexpr std::uint32_t kMaxQueries = 16;

/// An update whose coefficients are known but which has not touched memory yet (ZO2's lazy
/// update: step t's update of a group is applied when that group is next visited, at step t+1).
///
/// Its terms are (step, query i, coefficient c_i): the direction of an element is
/// d = sum_i c_i z(step, query i), summed in query order, and the rule (core/update_rules.hpp)
/// turns d into the new value. For MeZO-SGD with one query, c_0 = g, the projected gradient, and
/// the update is theta - lr (g z + lambda theta). The first four fields keep that meaning, so
/// PendingUpdate{step, g, lr, lambda} is a plain MeZO-SGD update.
struct PendingUpdate {
  std::uint32_t step;   // the step whose z the update uses (and whose rounding bits)
  double g;             // c_0: coefficient of query 0's z
  double lr;            // learning rate of that step
  double weight_decay;  // lambda (applied to tensors flagged for decay only)
  RuleId rule = RuleId::kSgd;
  std::uint32_t num_queries = 1;
  double more_g[kMaxQueries - 1] = {};  // c_1 .. c_{q-1}
  double momentum = 0;                  // MomentumRule's mu
  double beta1 = 0, beta2 = 0, adam_eps = 0;
  double step_size = 0, inv_sqrt_bc2 = 0;  // AdamRule: lr / bc1, 1 / sqrt(bc2)

  /// Coefficient of query i's z.
  ZO2_HD double coeff(std::uint32_t i) const { return i == 0 ? g : more_g[i - 1]; }
  void set_coeff(std::uint32_t i, double c) {
    if (i == 0) g = c;
    else more_g[i - 1] = c;
  }
  /// One query and the SGD rule: the form every kernel applies.
  bool plain_sgd() const { return rule == RuleId::kSgd && num_queries == 1; }
  /// The rule's scalars for a tensor that does (or does not) take weight decay.
  ZO2_HD RuleCoeffs rule_coeffs(bool decays) const {
    RuleCoeffs r;
    r.lr = lr;
    r.wd = decays ? weight_decay : 0.0;
    r.momentum = momentum;
    r.beta1 = beta1;
    r.beta2 = beta2;
    r.adam_eps = adam_eps;
    r.step_size = step_size;
    r.inv_sqrt_bc2 = inv_sqrt_bc2;
    return r;
  }
};

/// The noise of the step being computed, and the update still owed from the step before it.
///
/// `query` selects which of the step's z a pass draws (0 for the first, as every single-query
/// pass). For prepare(), `materialize_follows` says that the optimizer will call materialize()
/// on the group before it moves on (several queries, or a one-side estimate), so a policy must
/// keep the group's memory until then; for materialize(), `final_probe` marks the group's last
/// call, a minus side, after which a policy may let that memory go (HostOffload frees the slot).
struct StepNoise {
  std::uint64_t seed;
  std::uint32_t step;
  double eps;
  const PendingUpdate* pending;  // null when nothing is owed
  std::uint32_t query = 0;
  bool materialize_follows = false;
  bool final_probe = true;
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
  /// L(theta + eps z) and L(theta - eps z), averaged over the queries (one-side: loss_minus is
  /// L(theta)); with accumulation, the weighted mean over the micro-batches.
  double loss_plus = 0, loss_minus = 0;
  /// The projected gradient, averaged over the queries; per query in query_grads.
  double projected_grad = 0;
  double lr = 0;
  /// True when a loss was not finite: no update is scheduled for this step.
  bool skipped = false;
  std::uint32_t queries = 1;
  double query_grads[kMaxQueries] = {};
  /// zo-cons: L(theta), L(theta - lr g z), L(theta + lr g z), and the multiple s of -lr g z it
  /// kept (1, 0 or -1).
  double loss_base = 0, loss_descent = 0, loss_ascent = 0;
  int conservative_choice = 1;
};

}  // namespace zo2
