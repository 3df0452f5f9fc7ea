// zo2/optim/zo_optimizer.hpp -- the ZO optimizer family over any layer stack, with ZO2's dual
// forward and lazy update. It knows nothing about transformers or devices: the Model computes,
// the Policy decides where parameters rest and hands out perturbed copies.
//
// One step t of MeZO-SGD (ARCHITECTURE.md):
//   for each group in order (prologue, block 0..N-1, epilogue):
//     policy.prepare(group): apply step t-1's update (owed since t-1's loss was known), and
//                            produce theta + eps z_t and theta - eps z_t in one pass;
//     run the group's forward on both copies (h+ and h- advance side by side);
//   g_t = (L+ - L-) / (2 eps); the update of step t is now owed to every group.
// So each group is visited once per step, and the update costs no pass of its own.
//
// The family (ZOConfig::method, ::estimator, ::queries; core/update_rules.hpp for the rules):
// - A sweep evaluates a list of probes, each a point theta + s eps z_i (query i, s = +1 or -1,
//   or theta itself), block by block: a group's first probe comes from prepare(), the others
//   from materialize(), which rewrites the group's perturbed copy from its master. So with q
//   queries each block is visited once while all 2q forwards run on it (offloaded: q costs
//   compute, not PCIe). The activations of every probe advance side by side.
// - Two-side probes: +-eps z_i for each query; one-side: +eps z_i for each query and theta.
// - Accumulation: step() over n micro-batches runs one sweep per micro-batch with the same z;
//   the owed update is applied by the first; the losses are the batch-weighted means
//   (batch_weight(), e.g. scored tokens; equal weights where the model has none).
// - The owed update is a PendingUpdate: coefficients c_i per query (g_i / q for zo-sgd,
//   sign(g_i) / q for zo-sign, s g for zo-cons) and the rule (SGD, momentum, Adam), whose
//   per-element state the policy keeps (reserve_rule_state).
// - zo-cons adds theta as a probe (L0), then sweeps theta -+ lr g z (L1, L2) with no update,
//   and keeps the best of the three by ZO-Bench's rule (5 forwards).
//
// A policy may keep ONE perturbed copy of a group instead of two (OnePerturbedCopy below: the
// offload engine does, to halve its scratch): prepare() then writes theta + eps z only, and the
// optimizer asks for theta - eps z (z regenerated from the seed) between the group's two
// forwards. The tied prologue copy is re-materialized for the epilogue's probes.
//
// Exception safety: the owed update is applied group by group, in group order; the optimizer
// counts the groups it has reached, so a step that throws part-way can be retried (or flushed)
// without applying any group's update twice.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <zo2/core/communicator.hpp>
#include <zo2/core/config.hpp>
#include <zo2/core/error.hpp>
#include <zo2/core/update_rules.hpp>
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

/// A policy that can rewrite a group's perturbed copy for another query (q > 1, one-side, cons).
template <class P>
concept Materializes = requires(P& p, GroupIndex g, const StepNoise& noise) { p.materialize(g, noise, Side::kMinus); };

/// A policy that keeps per-element optimizer state for stateful rules (momentum, Adam).
template <class P>
concept KeepsRuleState = requires(P& p, const P& cp, unsigned slots) {
  p.reserve_rule_state(slots);
  { cp.rule_state_slots() } -> std::convertible_to<unsigned>;
};

/// A layer stack that weighs its batches (e.g. by scored tokens) for accumulation.
template <class M>
concept WeighsBatches = requires(const M& m, const typename M::Batch& b) {
  { m.batch_weight(b) } -> std::convertible_to<double>;
};

/// A model and a policy that each run on a (device) stream: the model's forwards must be
/// ordered after the policy's perturbation kernels, so the streams must be one.
template <class M, class P>
concept SharesStream = requires(const M& m, const P& p) {
  { m.stream() == p.stream() } -> std::convertible_to<bool>;
};

/// A policy that may reuse the prologue's perturbed copy for the blocks (HostOffload with
/// OffloadOptions::prologue_scratch_shared).
template <class P>
concept SharesPrologueScratch = requires(const P& p) {
  { p.shares_prologue_scratch() } -> std::convertible_to<bool>;
};

/// A layer stack that can check a batch before any parameter is touched.
template <class M>
concept ValidatesBatches = requires(const M& m, const typename M::Batch& b) { m.validate_batch(b); };

/// Where a run stands; with the parameters (flushed) and the policy's rule state it is all a
/// checkpoint needs.
struct OptimizerState {
  std::uint64_t step = 0;  // index of the next step to run
  std::uint64_t seed = 0;
  std::uint64_t skipped_steps = 0;
  std::uint64_t updates = 0;  // updates scheduled so far (Adam's bias-correction count)
};

template <LayerStack Model,
          class Policy = Resident<typename Model::value_type, typename Model::value_type>>
class ZOOptimizer {
 public:
  using Batch = typename Model::Batch;
  using Activation = typename Model::Activation;

  /// `start_step` resumes a run: with the parameters saved after flush() at that step and the
  /// same seed, the continuation is bit-identical to an uninterrupted run (restore() the rest
  /// of the state for stateful rules).
  ZOOptimizer(const Model& model, Policy& policy, ZOConfig config, std::uint64_t start_step = 0)
      : model_(&model), policy_(&policy), config_(std::move(config)), step_(start_step) {
    config_.validate();
    if (model.num_blocks() == 0) throw ConfigError("num_blocks", "a layer stack needs at least one block");
    if (!(ModelLayout::of(model).layout(GroupIndex{1}) == policy.model_layout().layout(GroupIndex{1})) ||
        policy.model_layout().num_blocks() != model.num_blocks())
      throw ConfigError("policy", "the parameter store was built for a different model layout");
    const bool needs_materialize = config_.queries > 1 || config_.estimator == ZOEstimator::kOneSide ||
                                   config_.method == ZOMethod::kConservative;
    if constexpr (!Materializes<Policy>)
      if (needs_materialize)
        throw ConfigError("optimizer", "this policy cannot re-perturb a group (materialize): queries = 1, "
                                       "the two-side estimator and no zo-cons only");
    check_streams();
    if constexpr (SharesPrologueScratch<Policy>)
      if (policy.shares_prologue_scratch() && epilogue_reads_prologue(model))
        throw ConfigError("prologue_scratch_shared",
                          "the policy overwrites the prologue's parameters with the first block's, but this model's "
                          "epilogue reads them (a tied LM head)");
    const unsigned slots = rule_state_slots(rule());
    if constexpr (KeepsRuleState<Policy>) {
      if (slots > 0 && policy.rule_state_slots() != slots) policy.reserve_rule_state(slots);
    } else if (slots > 0) {
      throw ConfigError("optimizer", std::string(method_name(config_.method)) +
                                         " keeps per-element state, which this policy cannot hold");
    }
  }

  /// Data-parallel training: each step's losses are summed over the communicator's ranks
  /// (kBatch: each rank steps on its shard of the global batch, the losses become the
  /// scored-token-weighted mean over every rank's micro-batches; kQueries: every rank steps on
  /// the same batch with its own share of the queries, and every rank gets every query's
  /// estimate). Every rank applies the same update, so replicas stay identical. A non-finite
  /// loss on any rank skips the step on all. Null: one process.
  void set_communicator(Communicator* comm, DataParallel mode = DataParallel::kBatch) {
    if (comm && mode == DataParallel::kQueries && config_.queries % static_cast<unsigned>(comm->size()) != 0)
      throw ConfigError("queries", "splitting queries over " + std::to_string(comm->size()) +
                                       " ranks needs a multiple of the rank count");
    comm_ = comm && comm->size() > 1 ? comm : nullptr;
    parallel_ = mode;
  }

  /// Continues from a saved state (step, skipped steps, update count); the seed must match.
  void restore(const OptimizerState& s) {
    if (s.seed != config_.seed) throw ConfigError("seed", "the saved state has another seed");
    if (pending_) throw Error("restore: an update is owed; restore a fresh optimizer");
    step_ = s.step;
    skipped_ = s.skipped_steps;
    updates_ = s.updates;
  }

  /// One step on `batch`.
  StepResult step(const Batch& batch) { return step_accumulated(std::span<const Batch>(&batch, 1)); }

  /// One step on n micro-batches that share the step's z (gradient accumulation): the losses
  /// are the batch-weighted means over them, at the activation memory of one.
  StepResult step_accumulated(std::span<const Batch> micro) {
    if (micro.empty()) throw ConfigError("batch", "a step needs at least one micro-batch");
    if (config_.method == ZOMethod::kConservative && micro.size() != 1)
      throw ConfigError("accumulate", "zo-cons takes one batch per step");
    if (step_ >= std::numeric_limits<std::uint32_t>::max())
      throw Error("step counter exhausted: the noise counter holds 2^32 - 1 steps");
    if constexpr (ValidatesBatches<Model>)
      for (const Batch& b : micro) model_->validate_batch(b);
    check_streams();

    const std::uint32_t q = config_.queries;
    const bool one_side = config_.estimator == ZOEstimator::kOneSide;
    const bool cons = config_.method == ZOMethod::kConservative;
    // The probes: +-eps z_i (two-side) or +eps z_i then theta (one-side); zo-cons adds theta.
    // With queries split over ranks, this rank evaluates queries rank, rank + N, ...
    const bool split = comm_ && parallel_ == DataParallel::kQueries;
    const std::uint32_t stride = split ? static_cast<std::uint32_t>(comm_->size()) : 1;
    std::vector<Probe> probes;
    std::vector<std::size_t> slot;  // probe k's index among the step's losses (all queries)
    for (std::uint32_t i = split ? static_cast<std::uint32_t>(comm_->rank()) : 0; i < q; i += stride) {
      probes.push_back({i, Side::kPlus, 1.0});
      slot.push_back(one_side ? i : 2 * i);
      if (!one_side) {
        probes.push_back({i, Side::kMinus, 1.0});
        slot.push_back(2 * i + 1);
      }
    }
    const std::size_t base = one_side ? q : 2 * q;  // the base probe's slot
    if (one_side || cons) {
      probes.push_back({q - 1, Side::kMinus, 0.0});
      slot.push_back(base);
    }

    StepResult r;
    r.step = step_;
    r.lr = config_.lr_at(step_);
    r.queries = q;
    std::vector<double> loss(base + 1, 0.0);
    if (micro.size() == 1 && !comm_) {
      const std::vector<double> l = sweep(micro[0], probes, config_.eps);
      for (std::size_t k = 0; k < l.size(); ++k) loss[slot[k]] = l[k];
    } else {
      // Weighted sums of this rank's micro-batches (and the weight), summed over the ranks.
      std::vector<double> sums(base + 2, 0.0);
      for (const Batch& b : micro) {
        const std::vector<double> l = sweep(b, probes, config_.eps);
        const double w = weight_of(b);  // split queries: every rank the same micro-batches
        if (w == 0) continue;  // no targets: nothing to weigh (its losses are NaN)
        sums[base + 1] += w;
        for (std::size_t k = 0; k < l.size(); ++k) sums[slot[k]] += w * l[k];
      }
      if (split && comm_->rank() != 0) sums[base] = 0;  // every rank evaluated theta: count rank 0's
      if (comm_) comm_->all_reduce_sum(sums);
      const double total = split ? sums[base + 1] / comm_->size() : sums[base + 1];
      for (std::size_t k = 0; k <= base; ++k) loss[k] = sums[k] / total;
    }

    bool finite = true;
    for (double l : loss) finite = finite && std::isfinite(l);  // slots no probe filled hold 0
    double sum_plus = 0, sum_minus = 0, sum_g = 0;
    for (std::uint32_t i = 0; i < q; ++i) {
      const double lp = loss[one_side ? i : 2 * i];
      const double lm = loss[one_side ? base : 2 * i + 1];
      r.query_grads[i] = one_side ? (lp - lm) / config_.eps : (lp - lm) / (2.0 * config_.eps);
      sum_plus += lp;
      sum_minus += lm;
      sum_g += r.query_grads[i];
    }
    r.loss_plus = q == 1 ? loss[0] : sum_plus / q;
    r.loss_minus = q == 1 ? loss[one_side ? base : 1] : sum_minus / q;
    r.projected_grad = q == 1 ? r.query_grads[0] : sum_g / q;
    if (cons) r.loss_base = loss[base];

    std::optional<PendingUpdate> next;
    if (finite) next = make_update(r);
    if (next && cons) {
      // theta -+ lr g z: a sweep with eps' = lr g and nothing owed (the first sweep applied it).
      std::vector<double> l = sweep(micro[0], {{0, Side::kPlus, 1.0}, {0, Side::kMinus, 1.0}},
                                    r.lr * r.projected_grad);
      if (comm_) {
        // Shards: weigh as the first sweep did.
        const double w = weight_of(micro[0]);
        std::vector<double> sums{w * l[0], w * l[1], w};
        if (w == 0) sums = {0, 0, 0};
        comm_->all_reduce_sum(sums);
        l = {sums[0] / sums[2], sums[1] / sums[2]};
      }
      r.loss_ascent = l[0];
      r.loss_descent = l[1];
      if (!std::isfinite(r.loss_ascent) || !std::isfinite(r.loss_descent)) {
        next.reset();
      } else {
        // ZO-Bench's ZO_Conserv: of theta (L0), theta - lr g z (L1), theta + lr g z (L2).
        const double l0 = r.loss_base, l1 = r.loss_descent, l2 = r.loss_ascent;
        r.conservative_choice = l1 > l0 ? (l0 < l2 ? 0 : -1) : (l1 < l2 ? 1 : -1);
        next->g = r.conservative_choice * r.projected_grad;
      }
    }
    if (next) {
      pending_ = next;
      ++updates_;
    } else {
      r.skipped = true;
      ++skipped_;
    }
    owed_applied_ = 0;
    ++step_;
    return r;
  }

  /// Applies the owed update everywhere, so the master parameters equal theta after the last
  /// step. Call before saving or evaluating; the run continues bit-identically afterwards.
  void flush() {
    if (!pending_) {
      // Nothing owed (a fresh run, or the last step skipped), but a policy with deferred
      // write-back may still hold host copies behind their device values.
      if constexpr (requires(Policy& p) { p.settle(); }) policy_->settle();
      return;
    }
    const ModelLayout& ml = policy_->model_layout();
    for (std::size_t g = owed_applied_; g < ml.num_groups(); ++g) {
      policy_->apply_update(GroupIndex{g}, config_.seed, *pending_);
      owed_applied_ = g + 1;
    }
    pending_.reset();
    owed_applied_ = 0;
  }

  /// Loss at the current parameters (after flush), no perturbation.
  double evaluate(const Batch& batch) {
    flush();
    const ModelLayout& ml = policy_->model_layout();
    const auto prologue = policy_->current(ml.prologue());
    if (acts_.empty()) acts_.resize(1);
    Activation& a = acts_[0];  // the step's buffers: a device model allocates nothing here after a step
    model_->prologue(prologue, batch, a, workspace_);
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
      model_->forward_block(i, policy_->current(ml.block(i)), a, next_, workspace_);
      std::swap(a, next_);
    }
    return model_->epilogue(policy_->current(ml.epilogue()),
                            epilogue_reads_prologue(*model_) ? prologue : decltype(prologue){}, a, batch, workspace_);
  }

  OptimizerState state() const { return {step_, config_.seed, skipped_, updates_}; }
  /// Whether the policy keeps one perturbed copy per group (see OnePerturbedCopy).
  bool shares_perturbed_copy() const {
    if constexpr (OnePerturbedCopy<Policy>) return policy_->shares_perturbed_copy();
    else return false;
  }
  bool has_pending_update() const { return pending_.has_value(); }
  /// The owed update, if any (what the next step's prepare() calls apply).
  const std::optional<PendingUpdate>& pending_update() const { return pending_; }
  const ZOConfig& config() const { return config_; }
  /// The element rule of this configuration's updates.
  RuleId rule() const { return rule_of(config_); }
  /// The element rule of a configuration's updates (zo-sign and zo-cons update as SGD does).
  static RuleId rule_of(const ZOConfig& c) {
    switch (c.method) {
      case ZOMethod::kMomentum: return RuleId::kMomentum;
      case ZOMethod::kAdam: return RuleId::kAdam;
      default: return RuleId::kSgd;
    }
  }

 private:
  /// A point a sweep evaluates: theta + s eps' z_query (s = +1 kPlus, -1 kMinus), eps' = eps *
  /// scale; scale 0 is theta itself.
  struct Probe {
    std::uint32_t query;
    Side side;
    double scale;
  };

  /// Which probe a group's perturbed copies hold.
  struct Copies {
    PerturbedViews<typename Policy::value_type> views;
    std::size_t plus_holds = 0;   // probe in the plus view's buffer
    bool minus_holds_one = false; // the minus view's own buffer holds probe 1 (two copies)
  };

  /// The model must enqueue its forwards on the policy's stream (set_stream), or it would read
  /// a perturbed copy before the kernel that writes it has run.
  void check_streams() const {
    if constexpr (SharesStream<Model, Policy>)
      if (!(model_->stream() == policy_->stream()))
        throw ConfigError("stream", "the model runs on another stream than the policy: call "
                                    "model.set_stream(policy.stream()) (or build the policy on the model's stream)");
  }

  double weight_of(const Batch& b) const {
    if constexpr (WeighsBatches<Model>) return model_->batch_weight(b);
    else return 1.0;
  }

  StepNoise noise_for(const Probe& p, double eps, bool final_probe) const {
    StepNoise n{config_.seed, static_cast<std::uint32_t>(step_), eps * p.scale, nullptr};
    n.query = p.query;
    n.final_probe = final_probe;
    return n;
  }

  /// prepare() of group g for the sweep's first probe, applying the owed update unless this
  /// group already has it.
  Copies prepare(GroupIndex g, const std::vector<Probe>& probes, double eps) {
    const PendingUpdate* owed = pending_ && g.value >= owed_applied_ ? &*pending_ : nullptr;
    StepNoise n{config_.seed, static_cast<std::uint32_t>(step_), eps, owed};
    const bool two_copies = !shares_perturbed_copy();
    const bool second_is_minus = probes.size() > 1 && probes[1].query == 0 && probes[1].side == Side::kMinus &&
                                 probes[1].scale == 1.0;
    const bool first_is_prepared = probes[0].query == 0 && probes[0].side == Side::kPlus && probes[0].scale == 1.0;
    n.materialize_follows = probes.size() > 2 || !first_is_prepared ||
                            (probes.size() == 2 && !(two_copies && second_is_minus));
    Copies c{policy_->prepare(g, n)};
    c.minus_holds_one = two_copies && second_is_minus;
    // prepare() writes theta + eps z of query 0; a rank with other queries materializes its own.
    if (!first_is_prepared) c.plus_holds = probes.size();  // holds no probe
    if (owed) owed_applied_ = g.value + 1;
    return c;
  }

  /// The view of group g holding probe k, materializing it into the plus buffer if needed.
  ParamView<const typename Policy::value_type> view_for(GroupIndex g, Copies& c, const std::vector<Probe>& probes,
                                                        std::size_t k, double eps) {
    if (c.plus_holds == k) return c.views.plus;
    if (k == 1 && c.minus_holds_one) return c.views.minus;
    if constexpr (Materializes<Policy>) {
      policy_->materialize(g, noise_for(probes[k], eps, k + 1 == probes.size()), probes[k].side);
      c.plus_holds = k;
      return c.views.plus;
    } else {
      throw Error("ZOOptimizer: the policy cannot materialize a probe");
    }
  }

  /// Runs every probe through the layer stack on `batch`, block by block; returns the losses in
  /// probe order. Applies the owed update to each group it prepares.
  std::vector<double> sweep(const Batch& batch, const std::vector<Probe>& probes, double eps) {
    const ModelLayout& ml = policy_->model_layout();
    const std::size_t n = probes.size();
    if (acts_.size() < n) acts_.resize(n);

    Copies pro = prepare(ml.prologue(), probes, eps);
    for (std::size_t k = 0; k < n; ++k)
      model_->prologue(view_for(ml.prologue(), pro, probes, k, eps), batch, acts_[k], workspace_);
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) {
      Copies b = prepare(ml.block(i), probes, eps);
      for (std::size_t k = 0; k < n; ++k) {
        model_->forward_block(i, view_for(ml.block(i), b, probes, k, eps), acts_[k], next_, workspace_);
        std::swap(acts_[k], next_);
      }
    }
    // The epilogue may read the prologue's copy too (a tied LM head): the last probe first,
    // which the prologue's copy still holds. A model that does not gets an empty view.
    Copies epi = prepare(ml.epilogue(), probes, eps);
    std::vector<double> loss(n);
    const bool reads_prologue = epilogue_reads_prologue(*model_);
    for (std::size_t k = n; k-- > 0;) {
      const auto pv = reads_prologue ? view_for(ml.prologue(), pro, probes, k, eps) : decltype(pro.views.plus){};
      const auto ev = view_for(ml.epilogue(), epi, probes, k, eps);
      loss[k] = model_->epilogue(ev, pv, acts_[k], batch, workspace_);
    }
    // Every group has the owed update now.
    if (pending_ && owed_applied_ >= ml.num_groups()) pending_.reset();
    return loss;
  }

  /// The update a step schedules from its estimates (zo-cons sets its multiple afterwards).
  PendingUpdate make_update(const StepResult& r) const {
    PendingUpdate u{static_cast<std::uint32_t>(step_), 0.0, r.lr, config_.weight_decay};
    u.rule = rule();
    u.num_queries = r.queries;
    for (std::uint32_t i = 0; i < r.queries; ++i) {
      double g = r.query_grads[i];
      if (config_.method == ZOMethod::kSign) g = g > 0 ? 1.0 : g < 0 ? -1.0 : 0.0;
      u.set_coeff(i, r.queries == 1 ? g : g / r.queries);
    }
    if (config_.method == ZOMethod::kConservative) u.g = r.projected_grad;
    u.momentum = config_.momentum;
    u.beta1 = config_.beta1;
    u.beta2 = config_.beta2;
    u.adam_eps = config_.adam_eps;
    const double t = static_cast<double>(updates_ + 1);
    u.step_size = r.lr / (1.0 - std::pow(config_.beta1, t));
    u.inv_sqrt_bc2 = 1.0 / std::sqrt(1.0 - std::pow(config_.beta2, t));
    return u;
  }

  const Model* model_;
  Policy* policy_;
  ZOConfig config_;
  std::uint64_t step_;
  std::uint64_t skipped_ = 0;
  std::uint64_t updates_ = 0;
  std::optional<PendingUpdate> pending_;
  std::size_t owed_applied_ = 0;  // groups [0, owed_applied_) already have pending_ applied
  Communicator* comm_ = nullptr;   // null: one process
  DataParallel parallel_ = DataParallel::kBatch;
  std::vector<Activation> acts_;
  Activation next_;
  typename Model::Workspace workspace_;
};

}  // namespace zo2
