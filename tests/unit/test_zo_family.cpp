// The ZO optimizer family (zo-sgd, zo-sign, zo-mmt, zo-adam, zo-cons; q queries; one- and
// two-side estimates; accumulation) against a float64 transcription of ZO-Bench's formulas, and
// the properties a run relies on: defaults unchanged, bit-exact resume, retry after a throw.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"
#include "../support/thread_ranks.hpp"

using namespace zo2;
using zo2_test::ThreadRanks;
using zo2_test::DenseTanhStack;
using zo2_test::init_random;
using zo2_test::make_regression_batch;

namespace {

using Stack = DenseTanhStack<double>;

/// theta of every group in double, the reference's own copy.
using Groups = std::vector<std::vector<double>>;

Groups groups_of(const ParameterStore<double>& store) {
  const ModelLayout& ml = store.model_layout();
  Groups g(ml.num_groups());
  for (std::size_t i = 0; i < ml.num_groups(); ++i) {
    auto v = store.group(GroupIndex{i});
    g[i].assign(v.data(), v.data() + v.layout().total_elements());
  }
  return g;
}

/// Calls f(group, tensor spec, flat offset, global tensor id) for every tensor, ids in the
/// documented order (prologue, blocks, epilogue).
template <class F>
void for_each_tensor(const ModelLayout& ml, F&& f) {
  std::uint32_t id = 0;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const ParamLayout& l = ml.layout(GroupIndex{g});
    for (std::size_t r = 0; r < l.num_tensors(); ++r, ++id) f(g, l.spec(r), l.offset(r), id);
  }
}

/// L(theta + c z(step, query)), all in double.
double loss_at(const Stack& model, const ModelLayout& ml, const Groups& theta, const Stack::Batch& batch,
               std::uint64_t seed, std::uint32_t step, std::uint32_t query, double c) {
  Groups x = theta;
  for_each_tensor(ml, [&](std::size_t g, const TensorSpec& spec, std::size_t off, std::uint32_t id) {
    for (std::size_t j = 0; j < spec.numel(); ++j) x[g][off + j] += c * normal_at(seed, step, id, j, query);
  });
  auto view = [&](std::size_t g) { return ParamView<const double>(x[g].data(), &ml.layout(GroupIndex{g})); };
  Stack::Activation a, b;
  Stack::Workspace ws;
  model.prologue(view(0), batch, a, ws);
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    model.forward_block(i, view(1 + i), a, b, ws);
    std::swap(a, b);
  }
  return model.epilogue(view(ml.num_groups() - 1), view(0), a, batch, ws);
}

/// The family's step, transcribed from ZO-Bench's definitions in double (state included).
struct ReferenceRun {
  const Stack& model;
  const ModelLayout& ml;
  ZOConfig cfg;
  Groups theta, m, v;  // m: momentum buffer or Adam's first moment; v: Adam's second
  std::uint64_t updates = 0;

  ReferenceRun(const Stack& mdl, const ModelLayout& layout, const ZOConfig& c, Groups start)
      : model(mdl), ml(layout), cfg(c), theta(std::move(start)) {
    m = v = theta;
    for (auto& g : m) std::fill(g.begin(), g.end(), 0.0);
    for (auto& g : v) std::fill(g.begin(), g.end(), 0.0);
  }

  /// Returns the per-query projected gradients.
  std::vector<double> step(std::uint32_t t, const Stack::Batch& batch) {
    const unsigned q = cfg.queries;
    const bool one_side = cfg.estimator == ZOEstimator::kOneSide;
    const double l0 = loss_at(model, ml, theta, batch, cfg.seed, t, 0, 0.0);
    std::vector<double> g(q);
    for (unsigned i = 0; i < q; ++i) {
      const double lp = loss_at(model, ml, theta, batch, cfg.seed, t, i, cfg.eps);
      g[i] = one_side ? (lp - l0) / cfg.eps
                      : (lp - loss_at(model, ml, theta, batch, cfg.seed, t, i, -cfg.eps)) / (2 * cfg.eps);
    }
    double s = 1;  // zo-cons: multiple of -lr g z kept
    if (cfg.method == ZOMethod::kConservative) {
      const double l1 = loss_at(model, ml, theta, batch, cfg.seed, t, 0, -cfg.lr * g[0]);
      const double l2 = loss_at(model, ml, theta, batch, cfg.seed, t, 0, cfg.lr * g[0]);
      if (l1 > l0) s = l0 < l2 ? 0 : -1;
      else s = l1 < l2 ? 1 : -1;
    }
    ++updates;
    const double bc1 = 1 - std::pow(cfg.beta1, static_cast<double>(updates));
    const double bc2 = 1 - std::pow(cfg.beta2, static_cast<double>(updates));
    for_each_tensor(ml, [&](std::size_t grp, const TensorSpec& spec, std::size_t off, std::uint32_t id) {
      const double lambda = spec.weight_decay ? cfg.weight_decay : 0.0;
      for (std::size_t j = 0; j < spec.numel(); ++j) {
        double d = 0;
        for (unsigned i = 0; i < q; ++i) {
          double c = g[i];
          if (cfg.method == ZOMethod::kSign) c = c > 0 ? 1 : c < 0 ? -1 : 0;
          d += c / q * normal_at(cfg.seed, t, id, j, i);
        }
        d *= s;
        double& th = theta[grp][off + j];
        const double e = d + lambda * th;
        switch (cfg.method) {
          case ZOMethod::kMomentum: {
            double& b = m[grp][off + j];
            b = cfg.momentum * b + e;
            th -= cfg.lr * b;
            break;
          }
          case ZOMethod::kAdam: {
            double& mm = m[grp][off + j];
            double& vv = v[grp][off + j];
            mm = cfg.beta1 * mm + (1 - cfg.beta1) * e;
            vv = cfg.beta2 * vv + (1 - cfg.beta2) * e * e;
            th -= cfg.lr * (mm / bc1) / (std::sqrt(vv / bc2) + cfg.adam_eps);
            break;
          }
          default: th -= cfg.lr * e;
        }
      }
    });
    return g;
  }
};

double max_rel_diff(const Groups& a, const ParameterStore<double>& store) {
  const Groups b = groups_of(store);
  double worst = 0;
  for (std::size_t g = 0; g < a.size(); ++g)
    for (std::size_t j = 0; j < a[g].size(); ++j)
      worst = std::max(worst, std::abs(a[g][j] - b[g][j]) / std::max(1e-3, std::abs(a[g][j])));
  return worst;
}

ZOConfig family_config(ZOMethod method, unsigned queries, ZOEstimator estimator) {
  ZOConfig cfg;
  cfg.method = method;
  cfg.queries = queries;
  cfg.estimator = estimator;
  cfg.lr = method == ZOMethod::kAdam ? 1e-3 : 2e-2;
  cfg.eps = 1e-3;
  cfg.weight_decay = method == ZOMethod::kConservative ? 0.0 : 0.05;
  cfg.momentum = 0.8;
  cfg.seed = 9001;
  return cfg;
}

template <class S>
std::uint64_t fnv1a(const ParameterStore<S>& store) {
  std::uint64_t h = 1469598103934665603ull;
  const ModelLayout& ml = store.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto v = store.group(GroupIndex{g});
    const auto* p = reinterpret_cast<const unsigned char*>(v.data());
    for (std::size_t i = 0; i < v.layout().total_elements() * sizeof(S); ++i) {
      h ^= p[i];
      h *= 1099511628211ull;
    }
  }
  return h;
}

template <class S>
std::uint64_t default_run_hash(bool one_copy) {
  DenseTanhStack<float> model;
  ParameterStore<S> store(ModelLayout::of(model));
  init_random(store, 11);
  Resident<S, float> policy(store, ResidentOptions{one_copy});
  ZOConfig cfg;
  cfg.lr = 2e-2;
  cfg.eps = 1e-3;
  cfg.weight_decay = 0.1;
  cfg.seed = 20261206;
  ZOOptimizer opt(model, policy, cfg);
  for (unsigned t = 0; t < 6; ++t) opt.step(make_regression_batch<float>(8, model.d_in, 300 + t));
  opt.flush();
  return fnv1a(store);
}

}  // namespace

TEST_CASE("defaults (zo-sgd, one query, two-side) are bit-identical to the MeZO-SGD before the family") {
  // Hashes of the parameters after six steps, computed by the code of commit dd7c238 (the last
  // without the optimizer family) from this same program.
  CHECK(default_run_hash<float>(false) == 0x1df7b911b206ca3full);
  CHECK(default_run_hash<float>(true) == 0x1df7b911b206ca3full);
  CHECK(default_run_hash<bfloat16>(false) == 0xf7eef8ca3a98b8cbull);
  CHECK(default_run_hash<float16>(true) == 0x3ec69b1f17359964ull);
}

TEST_CASE("query 0 draws the words of a counter without queries; other queries draw others") {
  for (std::uint64_t quad : {0ull, 7ull, (1ull << 32) + 5}) {
    const Philox4x32 a = philox_words(3, 9, 4, quad);
    const Philox4x32 b = philox_words(3, 9, 4, quad, 0);
    const Philox4x32 c = philox_words(3, 9, 4, quad, 1);
    CHECK(std::memcmp(&a, &b, sizeof a) == 0);
    CHECK(std::memcmp(&a, &c, sizeof a) != 0);
  }
  CHECK(normal_at(1, 2, 3, 5, 1) != normal_at(1, 2, 3, 5, 2));
}

TEST_CASE("every rule, estimator and query count equals its float64 transcription") {
  const Stack model;
  struct Case {
    ZOMethod method;
    unsigned queries;
    ZOEstimator estimator;
  };
  const Case cases[] = {
      {ZOMethod::kSgd, 1, ZOEstimator::kTwoSide},       {ZOMethod::kSgd, 3, ZOEstimator::kTwoSide},
      {ZOMethod::kSgd, 2, ZOEstimator::kOneSide},       {ZOMethod::kSign, 2, ZOEstimator::kTwoSide},
      {ZOMethod::kMomentum, 1, ZOEstimator::kTwoSide},  {ZOMethod::kMomentum, 2, ZOEstimator::kOneSide},
      {ZOMethod::kAdam, 1, ZOEstimator::kTwoSide},      {ZOMethod::kAdam, 2, ZOEstimator::kTwoSide},
      {ZOMethod::kConservative, 1, ZOEstimator::kTwoSide}, {ZOMethod::kConservative, 1, ZOEstimator::kOneSide},
  };
  for (const Case& c : cases) {
    for (bool one_copy : {false, true}) {
      CAPTURE(std::string(method_name(c.method)));
      CAPTURE(c.queries);
      CAPTURE(std::string(estimator_name(c.estimator)));
      CAPTURE(one_copy);
      ParameterStore<double> store(ModelLayout::of(model));
      init_random(store, 5);
      const ZOConfig cfg = family_config(c.method, c.queries, c.estimator);
      ReferenceRun ref(model, store.model_layout(), cfg, groups_of(store));
      Resident<double, double> policy(store, ResidentOptions{one_copy});
      ZOOptimizer opt(model, policy, cfg);
      int kept[3] = {0, 0, 0};
      for (std::uint32_t t = 0; t < 5; ++t) {
        const auto batch = make_regression_batch<double>(12, model.d_in, 40 + t);
        const std::vector<double> g = ref.step(t, batch);
        const StepResult r = opt.step(batch);
        REQUIRE_FALSE(r.skipped);
        CHECK(r.queries == c.queries);
        double mean = 0;
        for (unsigned i = 0; i < c.queries; ++i) {
          CHECK(r.query_grads[i] == doctest::Approx(g[i]).epsilon(1e-7));
          mean += r.query_grads[i] / c.queries;
        }
        CHECK(r.projected_grad == doctest::Approx(mean).epsilon(1e-12));
        if (c.method == ZOMethod::kConservative) ++kept[r.conservative_choice + 1];
      }
      opt.flush();
      CHECK(max_rel_diff(ref.theta, store) < 1e-8);
      CHECK(max_rel_diff(ref.theta, store) >= 0);
      if (c.method == ZOMethod::kAdam || c.method == ZOMethod::kMomentum) {
        // The state the policy holds is the reference's (first slot: momentum / m).
        const auto s = policy.rule_state(GroupIndex{1});
        double worst = 0;
        for (std::size_t j = 0; j < ref.m[1].size(); ++j)
          worst = std::max(worst, std::abs(s[j] - ref.m[1][j]) / std::max(1e-6, std::abs(ref.m[1][j])));
        CHECK(worst < 1e-6);
      }
    }
  }
}

TEST_CASE("q = 2: each query's estimate is its own two-point difference; the update follows their mean") {
  const Stack model;
  ParameterStore<double> store(ModelLayout::of(model));
  init_random(store, 8);
  ZOConfig cfg = family_config(ZOMethod::kSgd, 2, ZOEstimator::kTwoSide);
  const Groups before = groups_of(store);
  Resident<double, double> policy(store);
  ZOOptimizer opt(model, policy, cfg);
  const auto batch = make_regression_batch<double>(12, model.d_in, 77);
  const StepResult r = opt.step(batch);
  for (std::uint32_t i = 0; i < 2; ++i) {
    const double lp = loss_at(model, store.model_layout(), before, batch, cfg.seed, 0, i, cfg.eps);
    const double lm = loss_at(model, store.model_layout(), before, batch, cfg.seed, 0, i, -cfg.eps);
    CHECK(r.query_grads[i] == doctest::Approx((lp - lm) / (2 * cfg.eps)).epsilon(1e-9));
  }
  CHECK(r.query_grads[0] != doctest::Approx(r.query_grads[1]));  // independent z
  opt.flush();
  // theta moved along (g0 z0 + g1 z1) / 2: check one decayed weight exactly.
  const std::uint32_t id = static_cast<std::uint32_t>(store.model_layout().first_tensor_id(GroupIndex{1}));
  const double t0 = before[1][3];
  const double d = r.query_grads[0] / 2 * normal_at(cfg.seed, 0, id, 3, 0) + r.query_grads[1] / 2 * normal_at(cfg.seed, 0, id, 3, 1);
  CHECK(store.group(GroupIndex{1}).data()[3] == doctest::Approx(t0 - cfg.lr * (d + cfg.weight_decay * t0)).epsilon(1e-12));
}

TEST_CASE("accumulating two micro-batches equals one step on their concatenation, to rounding") {
  const Stack model;
  for (ZOMethod method : {ZOMethod::kSgd, ZOMethod::kAdam}) {
    CAPTURE(std::string(method_name(method)));
    ParameterStore<double> a(ModelLayout::of(model)), b(ModelLayout::of(model));
    init_random(a, 3);
    init_random(b, 3);
    const ZOConfig cfg = family_config(method, 2, ZOEstimator::kTwoSide);
    Resident<double, double> pa(a), pb(b);
    ZOOptimizer oa(model, pa, cfg), ob(model, pb, cfg);
    for (std::uint32_t t = 0; t < 4; ++t) {
      const auto h1 = make_regression_batch<double>(6, model.d_in, 500 + 2 * t);
      const auto h2 = make_regression_batch<double>(6, model.d_in, 501 + 2 * t);
      Stack::Batch whole = h1;
      whole.rows += h2.rows;
      whole.x.insert(whole.x.end(), h2.x.begin(), h2.x.end());
      whole.y.insert(whole.y.end(), h2.y.begin(), h2.y.end());
      const std::vector<Stack::Batch> micro{h1, h2};
      const StepResult ra = oa.step_accumulated(micro);
      const StepResult rb = ob.step(whole);
      CHECK(ra.projected_grad == doctest::Approx(rb.projected_grad).epsilon(1e-8));
      CHECK(ra.loss_plus == doctest::Approx(rb.loss_plus).epsilon(1e-12));
    }
    oa.flush();
    ob.flush();
    CHECK(max_rel_diff(groups_of(a), b) < 1e-9);
  }
}

TEST_CASE("every rule resumes bit-exactly from (theta, state, step)") {
  DenseTanhStack<float> model;
  for (ZOMethod method : {ZOMethod::kSgd, ZOMethod::kSign, ZOMethod::kMomentum, ZOMethod::kAdam, ZOMethod::kConservative}) {
    CAPTURE(std::string(method_name(method)));
    ZOConfig cfg = family_config(method, method == ZOMethod::kConservative ? 1 : 2, ZOEstimator::kTwoSide);
    auto batch = [&](std::uint32_t t) { return make_regression_batch<float>(8, model.d_in, 900 + t); };
    // Uninterrupted.
    ParameterStore<bfloat16> straight(ModelLayout::of(model));
    init_random(straight, 21);
    Resident<bfloat16, float> ps(straight, ResidentOptions{true});
    ZOOptimizer os(model, ps, cfg);
    for (std::uint32_t t = 0; t < 6; ++t) os.step(batch(t));
    os.flush();
    // Three steps, a checkpoint (theta, state, optimizer state), a fresh optimizer, three more.
    ParameterStore<bfloat16> first(ModelLayout::of(model));
    init_random(first, 21);
    Resident<bfloat16, float> p1(first, ResidentOptions{true});
    ZOOptimizer o1(model, p1, cfg);
    for (std::uint32_t t = 0; t < 3; ++t) o1.step(batch(t));
    o1.flush();
    const OptimizerState saved = o1.state();
    std::vector<std::vector<float>> state(first.model_layout().num_groups());
    for (std::size_t g = 0; g < state.size(); ++g) {
      state[g].resize(p1.rule_state(GroupIndex{g}).size());
      p1.get_rule_state(GroupIndex{g}, state[g]);
    }
    ParameterStore<bfloat16> second = first;
    Resident<bfloat16, float> p2(second, ResidentOptions{false});
    ZOOptimizer o2(model, p2, cfg, saved.step);
    o2.restore(saved);
    for (std::size_t g = 0; g < state.size(); ++g) p2.set_rule_state(GroupIndex{g}, state[g]);
    for (std::uint32_t t = 3; t < 6; ++t) o2.step(batch(t));
    o2.flush();
    CHECK(fnv1a(second) == fnv1a(straight));
    CHECK(o2.state().updates == os.state().updates);
  }
}

TEST_CASE("each rule lowers the loss of a small regression") {
  DenseTanhStack<float> model;
  for (ZOMethod method : {ZOMethod::kSgd, ZOMethod::kSign, ZOMethod::kMomentum, ZOMethod::kAdam, ZOMethod::kConservative}) {
    CAPTURE(std::string(method_name(method)));
    ParameterStore<float> store(ModelLayout::of(model));
    init_random(store, 4);
    Resident<float, float> policy(store);
    ZOConfig cfg = family_config(method, 1, ZOEstimator::kTwoSide);
    cfg.lr = method == ZOMethod::kAdam ? 3e-3 : method == ZOMethod::kMomentum ? 3e-4 : 1e-3;
    cfg.momentum = 0.5;
    cfg.weight_decay = 0;
    ZOOptimizer opt(model, policy, cfg);
    const auto eval = make_regression_batch<float>(64, model.d_in, 1);
    const double before = opt.evaluate(eval);
    for (std::uint32_t t = 0; t < 300; ++t) opt.step(make_regression_batch<float>(16, model.d_in, 10 + t % 8));
    const double after = opt.evaluate(eval);
    MESSAGE(std::string(method_name(method)), ": ", before, " -> ", after);
    CHECK(after < 0.8 * before);
  }
}

TEST_CASE("a step that throws part-way can be retried without applying an update twice") {
  // A stack whose block 1 throws once on request: the owed update has reached the prologue and
  // block 0 by then.
  struct Throwing : DenseTanhStack<double> {
    mutable bool armed = false;
    void forward_block(std::size_t i, ParamView<const double> p, const Activation& in, Activation& out,
                       Workspace& ws) const {
      if (armed && i == 1) {
        armed = false;
        throw std::runtime_error("injected");
      }
      DenseTanhStack<double>::forward_block(i, p, in, out, ws);
    }
  };
  Throwing model;
  for (ZOMethod method : {ZOMethod::kSgd, ZOMethod::kAdam}) {
    CAPTURE(std::string(method_name(method)));
    const ZOConfig cfg = family_config(method, 2, ZOEstimator::kTwoSide);
    ParameterStore<double> a(ModelLayout::of(model)), b(ModelLayout::of(model));
    init_random(a, 6);
    init_random(b, 6);
    Resident<double, double> pa(a), pb(b);
    ZOOptimizer oa(model, pa, cfg), ob(model, pb, cfg);
    for (std::uint32_t t = 0; t < 4; ++t) {
      const auto batch = make_regression_batch<double>(8, model.d_in, 60 + t);
      if (t == 2) {
        model.armed = true;
        CHECK_THROWS_AS(oa.step(batch), std::runtime_error);
      }
      const StepResult ra = oa.step(batch);
      const StepResult rb = ob.step(batch);
      CHECK(ra.projected_grad == rb.projected_grad);
    }
    // A throw, then flush instead of a retry: the update still lands once.
    model.armed = true;
    CHECK_THROWS_AS(oa.step(make_regression_batch<double>(8, model.d_in, 99)), std::runtime_error);
    oa.flush();
    ob.flush();
    CHECK(fnv1a(a) == fnv1a(b));
  }
}

TEST_CASE("bad combinations are refused naming the field") {
  ZOConfig cfg;
  cfg.method = ZOMethod::kConservative;
  cfg.queries = 2;
  CHECK_THROWS_WITH_AS(cfg.validate(), doctest::Contains("queries"), ConfigError);
  cfg.queries = 1;
  cfg.weight_decay = 0.1;
  CHECK_THROWS_WITH_AS(cfg.validate(), doctest::Contains("weight_decay"), ConfigError);
  cfg = ZOConfig{};
  cfg.queries = 17;
  CHECK_THROWS_AS(cfg.validate(), ConfigError);
  cfg = ZOConfig{};
  cfg.beta2 = 1.0;
  CHECK_THROWS_WITH_AS(cfg.validate(), doctest::Contains("beta2"), ConfigError);
  CHECK_THROWS_WITH_AS(parse_method("zo-lion"), doctest::Contains("zo-lion"), ConfigError);
  CHECK(parse_method("zo-mmt") == ZOMethod::kMomentum);
  CHECK(parse_estimator("one-side") == ZOEstimator::kOneSide);
}

TEST_CASE("a model on another stream than its policy is refused, at construction and at a step") {
  struct StreamStack : DenseTanhStack<double> {
    int on = 1;
    int stream() const { return on; }
  };
  struct StreamResident : Resident<double, double> {
    using Resident<double, double>::Resident;
    int stream() const { return 1; }
  };
  StreamStack model;
  ParameterStore<double> store(ModelLayout::of(model));
  init_random(store, 2);
  StreamResident policy(store);
  ZOConfig cfg;
  model.on = 2;
  CHECK_THROWS_WITH_AS(ZOOptimizer(model, policy, cfg), doctest::Contains("set_stream"), ConfigError);
  model.on = 1;
  ZOOptimizer opt(model, policy, cfg);
  const auto batch = make_regression_batch<double>(4, model.d_in, 1);
  opt.step(batch);
  model.on = 3;  // the model moved to another stream after construction
  CHECK_THROWS_AS(opt.step(batch), ConfigError);
}


TEST_CASE("data parallel: shards on 2 ranks step as the whole batch on one; split queries as all queries on one") {
  const Stack model;
  for (DataParallel mode : {DataParallel::kBatch, DataParallel::kQueries}) {
    CAPTURE(static_cast<int>(mode));
    const ZOConfig cfg = family_config(ZOMethod::kAdam, 2, ZOEstimator::kTwoSide);
    ParameterStore<double> one(ModelLayout::of(model));
    init_random(one, 12);
    std::vector<ParameterStore<double>> replicas(2, one);
    auto batch = [&](std::uint32_t t, int part) { return make_regression_batch<double>(6, model.d_in, 700 + 2 * t + part); };
    // One process: the whole batch (kBatch) or the one batch (kQueries).
    Resident<double, double> p1(one);
    ZOOptimizer o1(model, p1, cfg);
    std::vector<double> g1;
    for (std::uint32_t t = 0; t < 3; ++t) {
      Stack::Batch b = batch(t, 0);
      if (mode == DataParallel::kBatch) {
        const Stack::Batch h = batch(t, 1);
        b.rows += h.rows;
        b.x.insert(b.x.end(), h.x.begin(), h.x.end());
        b.y.insert(b.y.end(), h.y.begin(), h.y.end());
      }
      g1.push_back(o1.step(b).projected_grad);
    }
    o1.flush();
    // Two ranks as threads.
    ThreadRanks ranks(2);
    std::vector<double> g2[2];
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        ThreadRanks::Rank comm(&ranks, r);
        Resident<double, double> p(replicas[r]);
        ZOOptimizer o(model, p, cfg);
        o.set_communicator(&comm, mode);
        for (std::uint32_t t = 0; t < 3; ++t)
          g2[r].push_back(o.step(batch(t, mode == DataParallel::kBatch ? r : 0)).projected_grad);
        o.flush();
      });
    for (auto& th : threads) th.join();
    for (std::uint32_t t = 0; t < 3; ++t) {
      CHECK(g2[0][t] == g2[1][t]);
      CHECK(g2[0][t] == doctest::Approx(g1[t]).epsilon(1e-9));
    }
    CHECK(fnv1a(replicas[0]) == fnv1a(replicas[1]));  // replicas identical
    CHECK(max_rel_diff(groups_of(replicas[0]), one) < 1e-9);
  }
}
