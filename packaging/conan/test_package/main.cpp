// Conan test_package: a two-block layer stack of the consumer's own, MeZO-SGD on a fixed batch;
// exits 1 unless the loss falls. With the models (option models=True, the default) it includes the
// whole library through zo2::zo2; with models=False, only <zo2/core.hpp> through zo2::core, and
// Eigen and nlohmann-json must be nowhere.
#if defined(TEST_PACKAGE_ALL)
#include <zo2/zo2.hpp>
#else
#include <zo2/core.hpp>
#if defined(EIGEN_WORLD_VERSION) || defined(NLOHMANN_JSON_VERSION_MAJOR) || __has_include(<Eigen/Core>)
#error "zo2::core brought Eigen or nlohmann-json"
#endif
#endif

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

// y = a * x fitted by a stack of scalar blocks h <- h * w_i; the loss is the mean squared error.
struct ScalarStack {
  using value_type = float;
  struct Batch {
    std::vector<float> x, y;
  };
  using Activation = std::vector<float>;
  struct Workspace {};

  std::size_t num_blocks() const { return 2; }
  zo2::ParamLayout prologue_layout() const {
    zo2::ParamLayout l;
    l.add("scale", {1});
    return l;
  }
  zo2::ParamLayout block_layout() const {
    zo2::ParamLayout l;
    l.add("w", {1});
    return l;
  }
  zo2::ParamLayout epilogue_layout() const {
    zo2::ParamLayout l;
    l.add("bias", {1}, /*weight_decay=*/false);
    return l;
  }
  void prologue(zo2::ParamView<const float> p, const Batch& b, Activation& out, Workspace&) const {
    out.resize(b.x.size());
    for (std::size_t i = 0; i < b.x.size(); ++i) out[i] = p.tensor("scale")[0] * b.x[i];
  }
  void forward_block(std::size_t, zo2::ParamView<const float> p, const Activation& in, Activation& out,
                     Workspace&) const {
    out.resize(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) out[i] = p.tensor("w")[0] * in[i];
  }
  double epilogue(zo2::ParamView<const float> p, zo2::ParamView<const float>, const Activation& in,
                  const Batch& b, Workspace&) const {
    double loss = 0;
    for (std::size_t i = 0; i < in.size(); ++i) {
      const double d = in[i] + p.tensor("bias")[0] - b.y[i];
      loss += d * d;
    }
    return loss / double(in.size());
  }
};
static_assert(zo2::LayerStack<ScalarStack>);

}  // namespace

int main() {
  const ScalarStack model;
  zo2::ParameterStore<float> store(zo2::ModelLayout::of(model));
  for (std::size_t g = 0; g < store.num_groups(); ++g) store.group(zo2::GroupIndex{g}).tensor(0)[0] = 1.0f;
  store.group(zo2::GroupIndex{3}).tensor(0)[0] = 0.0f;  // bias

  ScalarStack::Batch batch;
  for (int i = -4; i <= 4; ++i) {
    batch.x.push_back(0.25f * float(i));
    batch.y.push_back(0.5f * float(i) + 0.1f);  // y = 2x + 0.1
  }

  zo2::Resident<float, float> policy(store);
  zo2::ZOConfig config;
  config.lr = 2e-2;
  config.eps = 1e-3;
  config.seed = 3;
  zo2::ZOOptimizer<ScalarStack> optimizer(model, policy, config);
  const double before = optimizer.evaluate(batch);
  for (int s = 0; s < 100; ++s) optimizer.step(batch);
  const double after = optimizer.evaluate(batch);
  const bool ok = std::isfinite(after) && after < 0.5 * before;
  std::printf("zo2 test_package: loss %.6f -> %.6f: %s\n", before, after, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
