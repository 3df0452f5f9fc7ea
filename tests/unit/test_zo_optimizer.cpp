// ZOOptimizer (MeZO-SGD with ZO2's dual forward and lazy update) against independent references.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"

using namespace zo2;
using zo2_test::DenseTanhStack;
using zo2_test::init_random;
using zo2_test::make_regression_batch;

namespace {

/// Loss of `model` at the parameters held in `store`, each tensor shifted by c * z_step,
/// evaluated in double with z regenerated from the documented id scheme (not the optimizer's).
template <class S>
double shifted_loss(const DenseTanhStack<double>& model, const ParameterStore<S>& store,
                    const DenseTanhStack<double>::Batch& batch, std::uint64_t seed, std::uint32_t step,
                    double c) {
  const ModelLayout& ml = store.model_layout();
  std::vector<std::vector<double>> groups(ml.num_groups());
  std::uint32_t tensor_id = 0;  // prologue tensors, then each block's, then the epilogue's
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto view = store.group(GroupIndex{g});
    const ParamLayout& layout = view.layout();
    groups[g].assign(layout.total_elements(), 0.0);
    for (std::size_t r = 0; r < layout.num_tensors(); ++r, ++tensor_id)
      for (std::size_t j = 0; j < layout.spec(r).numel(); ++j)
        groups[g][layout.offset(r) + j] =
            static_cast<double>(load(view.tensor(r)[j])) + c * normal_at(seed, step, tensor_id, j);
  }
  auto view = [&](std::size_t g) { return ParamView<const double>(groups[g].data(), &ml.layout(GroupIndex{g})); };
  DenseTanhStack<double>::Activation a, b;
  DenseTanhStack<double>::Workspace ws;
  model.prologue(view(0), batch, a, ws);
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    model.forward_block(i, view(1 + i), a, b, ws);
    std::swap(a, b);
  }
  return model.epilogue(view(ml.num_groups() - 1), view(0), a, batch, ws);
}

/// A quadratic, split over blocks: L = sum over blocks and k of 0.5 a_k (theta_k - c_k)^2.
struct QuadraticStack {
  using value_type = double;
  struct Batch {};
  struct Activation {
    double sum = 0;
  };
  struct Workspace {};
  std::size_t dims = 6, blocks = 2;
  std::size_t num_blocks() const { return blocks; }
  ParamLayout prologue_layout() const { return {}; }
  ParamLayout epilogue_layout() const { return {}; }
  ParamLayout block_layout() const {
    ParamLayout l;
    l.add("theta", {(long)dims});
    return l;
  }
  static double curvature(std::size_t k) { return 0.5 + static_cast<double>(k); }
  static double centre(std::size_t i, std::size_t k) { return std::sin(1.0 + i + 0.7 * k); }
  void prologue(ParamView<const double>, const Batch&, Activation& out, Workspace&) const { out.sum = 0; }
  void forward_block(std::size_t i, ParamView<const double> p, const Activation& in, Activation& out,
                     Workspace&) const {
    out.sum = in.sum;
    for (std::size_t k = 0; k < dims; ++k) {
      const double d = p.tensor(0)[k] - centre(i, k);
      out.sum += 0.5 * curvature(k) * d * d;
    }
  }
  double epilogue(ParamView<const double>, ParamView<const double>, const Activation& in, const Batch&,
                  Workspace&) const {
    return in.sum;
  }
};

}  // namespace

TEST_CASE("the projected gradient equals (L(theta+eps z) - L(theta-eps z)) / 2eps recomputed in double") {
  DenseTanhStack<double> model;
  ParameterStore<double> store(ModelLayout::of(model));
  init_random(store, 7);
  Resident<double, double> policy(store);
  ZOConfig cfg;
  cfg.lr = 1e-3;
  cfg.eps = 1e-3;
  cfg.seed = 424242;
  ZOOptimizer opt(model, policy, cfg);
  for (std::uint32_t t = 0; t < 3; ++t) {
    const auto batch = make_regression_batch<double>(16, model.d_in, 100 + t);
    opt.flush();  // the reference below reads the master: bring it to theta_t
    const double lp = shifted_loss(model, store, batch, cfg.seed, t, cfg.eps);
    const double lm = shifted_loss(model, store, batch, cfg.seed, t, -cfg.eps);
    const StepResult r = opt.step(batch);
    CHECK(r.step == t);
    CHECK(r.loss_plus == doctest::Approx(lp).epsilon(1e-12));
    CHECK(r.loss_minus == doctest::Approx(lm).epsilon(1e-12));
    CHECK(r.projected_grad == doctest::Approx((lp - lm) / (2 * cfg.eps)).epsilon(1e-8));
    CHECK(std::abs(r.projected_grad) > 1e-6);  // a real signal, not an accidental zero
  }
}

TEST_CASE("on a quadratic, E[g z] is the true gradient within a statistical bound") {
  QuadraticStack model;
  ParameterStore<double> store(ModelLayout::of(model));
  for (std::size_t i = 0; i < model.blocks; ++i)
    for (std::size_t k = 0; k < model.dims; ++k)
      store.group(GroupIndex{1 + i}).tensor(0)[k] = 0.3 * std::cos(3.0 * i + k);
  Resident<double, double> policy(store);
  ZOConfig cfg;
  cfg.lr = 0;  // theta stays put: every step is an independent sample of g z at the same point
  cfg.eps = 1e-2;
  cfg.seed = 5;
  ZOOptimizer opt(model, policy, cfg);
  const std::size_t steps = 20000, n = model.blocks * model.dims;
  std::vector<double> mean(n, 0.0), grad(n);
  double grad_sq = 0;
  for (std::size_t i = 0; i < model.blocks; ++i)
    for (std::size_t k = 0; k < model.dims; ++k) {
      const double th = store.group(GroupIndex{1 + i}).tensor(0)[k];
      grad[i * model.dims + k] = QuadraticStack::curvature(k) * (th - QuadraticStack::centre(i, k));
      grad_sq += grad[i * model.dims + k] * grad[i * model.dims + k];
    }
  for (std::uint32_t t = 0; t < steps; ++t) {
    const StepResult r = opt.step({});
    for (std::size_t i = 0; i < model.blocks; ++i)
      for (std::size_t k = 0; k < model.dims; ++k)
        mean[i * model.dims + k] += r.projected_grad * normal_at(cfg.seed, t, static_cast<std::uint32_t>(i), k) / steps;
  }
  for (std::size_t j = 0; j < n; ++j) {
    // Var(g z_j) = |grad|^2 + grad_j^2 for g = z . grad (central differences are exact here).
    const double se = std::sqrt((grad_sq + grad[j] * grad[j]) / steps);
    CHECK(std::abs(mean[j] - grad[j]) < 5 * se);
  }
}

TEST_CASE("after one step theta equals the closed-form update (decay on weights, not on biases)") {
  DenseTanhStack<double> model;
  ParameterStore<double> store(ModelLayout::of(model));
  init_random(store, 8);
  const ParameterStore<double> before = store;
  Resident<double, double> policy(store);
  ZOConfig cfg;
  cfg.lr = 0.05;
  cfg.eps = 1e-3;
  cfg.weight_decay = 0.2;
  cfg.seed = 99;
  ZOOptimizer opt(model, policy, cfg);
  const StepResult r = opt.step(make_regression_batch<double>(8, model.d_in, 1));
  CHECK(opt.has_pending_update());
  opt.flush();
  CHECK_FALSE(opt.has_pending_update());
  const ModelLayout& ml = store.model_layout();
  std::uint32_t id = 0;
  std::size_t decayed = 0, not_decayed = 0;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto a = before.group(GroupIndex{g});
    auto b = store.group(GroupIndex{g});
    for (std::size_t r_ = 0; r_ < a.layout().num_tensors(); ++r_, ++id) {
      const bool decay = a.layout().spec(r_).weight_decay;
      (decay ? decayed : not_decayed)++;
      for (std::size_t j = 0; j < a.numel(r_); ++j) {
        const double t0 = a.tensor(r_)[j];
        const double expected = t0 - cfg.lr * (r.projected_grad * normal_at(cfg.seed, 0, id, j) + (decay ? cfg.weight_decay * t0 : 0.0));
        REQUIRE(b.tensor(r_)[j] == doctest::Approx(expected).epsilon(1e-12));
      }
    }
  }
  CHECK(decayed > 0);
  CHECK(not_decayed > 0);
}

TEST_CASE("the lazy fused path gives the same theta as plain three-pass MeZO") {
  DenseTanhStack<float> model;
  ParameterStore<float> lazy(ModelLayout::of(model));
  init_random(lazy, 9);
  ParameterStore<float> plain = lazy;
  Resident<float, float> policy(lazy);
  ZOConfig cfg;
  cfg.lr = 0.02;
  cfg.eps = 1e-2;
  cfg.weight_decay = 0.01;
  cfg.seed = 3;
  ZOOptimizer opt(model, policy, cfg);

  const ModelLayout& ml = plain.model_layout();
  auto for_each_tensor = [&](auto&& f) {
    std::uint32_t id = 0;
    for (std::size_t g = 0; g < ml.num_groups(); ++g) {
      auto v = plain.group(GroupIndex{g});
      for (std::size_t r = 0; r < v.layout().num_tensors(); ++r, ++id) f(v.tensor(r), v.numel(r), id, v.layout().spec(r));
    }
  };
  auto plain_loss = [&](const DenseTanhStack<float>::Batch& batch) {
    DenseTanhStack<float>::Activation a, b;
    DenseTanhStack<float>::Workspace ws;
    auto v = [&](std::size_t g) { return ParamView<const float>(std::as_const(plain).group(GroupIndex{g})); };
    model.prologue(v(0), batch, a, ws);
    for (std::size_t i = 0; i < model.num_blocks(); ++i) {
      model.forward_block(i, v(1 + i), a, b, ws);
      std::swap(a, b);
    }
    return model.epilogue(v(ml.num_groups() - 1), v(0), a, batch, ws);
  };
  for (std::uint32_t t = 0; t < 5; ++t) {
    const auto batch = make_regression_batch<float>(16, model.d_in, 50 + t);
    const StepResult r = opt.step(batch);
    // Plain MeZO: perturb +eps, loss, perturb -2eps, loss, restore +eps, update.
    auto shift = [&](double c) {
      for_each_tensor([&](float* p, std::size_t n, std::uint32_t id, const TensorSpec&) {
        cpu::Perturber<float>::add_scaled_noise(p, n, NoiseId{cfg.seed, t, id}, c);
      });
    };
    shift(cfg.eps);
    const double lp = plain_loss(batch);
    shift(-2 * cfg.eps);
    const double lm = plain_loss(batch);
    shift(cfg.eps);
    const double g = (lp - lm) / (2 * cfg.eps);
    CHECK(r.projected_grad == doctest::Approx(g).epsilon(1e-3));
    for_each_tensor([&](float* p, std::size_t n, std::uint32_t id, const TensorSpec& spec) {
      cpu::Perturber<float>::update(p, n, NoiseId{cfg.seed, t, id},
                                    UpdateCoeffs{cfg.lr, g, spec.weight_decay ? cfg.weight_decay : 0.0});
    });
  }
  opt.flush();
  double max_diff = 0, max_abs = 0;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto a = std::as_const(lazy).group(GroupIndex{g});
    auto b = std::as_const(plain).group(GroupIndex{g});
    for (std::size_t j = 0; j < a.layout().total_elements(); ++j) {
      max_diff = std::max(max_diff, std::abs(double(a.data()[j]) - b.data()[j]));
      max_abs = std::max(max_abs, std::abs(double(b.data()[j])));
    }
  }
  // Float rounding of the in-place round trip theta + ez - 2ez + ez, over five steps.
  CHECK(max_diff < 1e-5 * max_abs);
  CHECK(max_abs > 0.1);
}

TEST_CASE_TEMPLATE("resume from (theta, k, seed) is bit-identical to an uninterrupted run", S, float, bfloat16) {
  DenseTanhStack<float> model;
  ParameterStore<S> initial(ModelLayout::of(model));
  init_random(initial, 10);
  ZOConfig cfg;
  cfg.lr = 0.01;
  cfg.eps = 1e-2;
  cfg.weight_decay = 0.05;
  cfg.seed = 2024;
  cfg.lr_schedule = cosine_schedule(2, 10);
  auto batch_at = [&](std::uint64_t t) { return make_regression_batch<float>(16, model.d_in, 300 + unsigned(t)); };

  ParameterStore<S> straight = initial;
  {
    Resident<S, float> policy(straight);
    ZOOptimizer opt(model, policy, cfg);
    for (std::uint64_t t = 0; t < 10; ++t) opt.step(batch_at(t));
    opt.flush();
  }
  ParameterStore<S> first_half = initial;
  {
    Resident<S, float> policy(first_half);
    ZOOptimizer opt(model, policy, cfg);
    for (std::uint64_t t = 0; t < 4; ++t) opt.step(batch_at(t));
    opt.flush();  // what a checkpoint does before saving
    CHECK(opt.state().step == 4);
  }
  ParameterStore<S> resumed = first_half;  // "saved and loaded"
  {
    Resident<S, float> policy(resumed);
    ZOOptimizer opt(model, policy, cfg, /*start_step=*/4);
    for (std::uint64_t t = 4; t < 10; ++t) opt.step(batch_at(t));
    opt.flush();
  }
  CHECK(resumed == straight);
  CHECK_FALSE(first_half == straight);  // the second half really changed theta
}

TEST_CASE("a non-finite loss skips the step: counted, reported, weights unchanged") {
  DenseTanhStack<float> model;
  ParameterStore<float> store(ModelLayout::of(model));
  init_random(store, 11);
  Resident<float, float> policy(store);
  ZOConfig cfg;
  cfg.lr = 0.01;
  cfg.eps = 1e-2;
  ZOOptimizer opt(model, policy, cfg);
  opt.step(make_regression_batch<float>(8, model.d_in, 1));
  opt.flush();
  const ParameterStore<float> snapshot = store;
  auto bad = make_regression_batch<float>(8, model.d_in, 2);
  bad.y[3] = std::nanf("");
  const StepResult r = opt.step(bad);
  CHECK(r.skipped);
  CHECK_FALSE(opt.has_pending_update());
  opt.flush();
  CHECK(store == snapshot);
  CHECK(opt.state().skipped_steps == 1);
  CHECK_FALSE(opt.step(make_regression_batch<float>(8, model.d_in, 3)).skipped);
}

TEST_CASE("a bad config throws an exception naming the field") {
  DenseTanhStack<float> model;
  ParameterStore<float> store(ModelLayout::of(model));
  Resident<float, float> policy(store);
  auto field_of = [&](ZOConfig cfg) -> std::string {
    try {
      ZOOptimizer opt(model, policy, cfg);
    } catch (const ConfigError& e) {
      CHECK(std::string(e.what()).find(e.field()) != std::string::npos);
      return e.field();
    }
    return "";
  };
  ZOConfig c;
  c.eps = 0;
  CHECK(field_of(c) == "eps");
  c.eps = -1e-3;
  CHECK(field_of(c) == "eps");
  c = {};
  c.lr = std::nan("");
  CHECK(field_of(c) == "lr");
  c = {};
  c.weight_decay = -1;
  CHECK(field_of(c) == "weight_decay");
  c = {};
  CHECK(field_of(c).empty());

  DenseTanhStack<float> empty = model;
  empty.blocks = 0;
  try {
    ModelLayout::of(empty);
    FAIL("zero blocks accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "num_blocks");
  }
}
