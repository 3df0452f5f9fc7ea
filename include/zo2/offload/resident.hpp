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
#include <type_traits>
#include <utility>
#include <vector>

#include <zo2/backend/cpu/perturber.hpp>
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
    const std::uint32_t first_id = store_->model_layout().first_tensor_id(g);
    T* minus = options_.one_perturbed_copy ? nullptr : scratch.minus.data();  // null: one copy
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const std::size_t off = layout.offset(r);
      const std::uint32_t id = first_id + static_cast<std::uint32_t>(r);
      UpdateCoeffs coeffs{};
      NoiseId previous{noise.seed, 0, id};
      if (noise.pending) {
        coeffs = coeffs_for(*noise.pending, layout.spec(r));
        previous.step = noise.pending->step;
      }
      cpu::Perturber<S>::update_and_perturb_into(theta.tensor(r), scratch.plus.data() + off,
                                                 minus ? minus + off : nullptr,
                                                 layout.spec(r).numel(), noise.pending ? &coeffs : nullptr,
                                                 previous, NoiseId{noise.seed, noise.step, id}, noise.eps);
    }
    return {ParamView<const T>(scratch.plus.data(), &layout),
            ParamView<const T>(minus ? minus : scratch.plus.data(), &layout)};
  }

  /// Whether prepare() leaves one copy for both views (ResidentOptions::one_perturbed_copy).
  bool shares_perturbed_copy() const { return options_.one_perturbed_copy; }

  /// Rewrites group g's (single) perturbed copy as theta + eps z or theta - eps z of noise.step.
  void materialize(GroupIndex g, const StepNoise& noise, Side side) {
    ParamView<const S> theta = std::as_const(*store_).group(g);
    const ParamLayout& layout = theta.layout();
    const std::uint32_t first_id = store_->model_layout().first_tensor_id(g);
    const double c = side == Side::kPlus ? noise.eps : -noise.eps;
    for (std::size_t r = 0; r < layout.num_tensors(); ++r)
      cpu::Perturber<S>::add_scaled_noise_into(scratch_for(g).plus.data() + layout.offset(r), theta.tensor(r),
                                               layout.spec(r).numel(),
                                               NoiseId{noise.seed, noise.step, first_id + static_cast<std::uint32_t>(r)},
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
    const std::uint32_t first_id = store_->model_layout().first_tensor_id(g);
    for (std::size_t r = 0; r < layout.num_tensors(); ++r)
      cpu::Perturber<S>::update(theta.tensor(r), layout.spec(r).numel(),
                                NoiseId{seed, pending.step, first_id + static_cast<std::uint32_t>(r)},
                                coeffs_for(pending, layout.spec(r)));
  }

  const ModelLayout& model_layout() const { return store_->model_layout(); }

  static UpdateCoeffs coeffs_for(const PendingUpdate& p, const TensorSpec& spec) {
    return UpdateCoeffs{p.lr, p.g, spec.weight_decay ? p.weight_decay : 0.0};
  }

 private:
  struct Scratch {
    std::vector<T> plus, minus;
  };
  Scratch& scratch_for(GroupIndex g) { return scratch_[g.value == 0 ? 0 : 1]; }

  ParameterStore<S>* store_;
  ResidentOptions options_;
  Scratch scratch_[2];  // [0]: the prologue's, [1]: shared by the blocks and the epilogue
};

}  // namespace zo2
