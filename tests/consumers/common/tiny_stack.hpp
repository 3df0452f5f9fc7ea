// tiny_stack.hpp -- the code an outside project writes to use zo2: its own layer stack, a few
// MeZO-SGD steps, and a check that the loss falls. Shared by the consumer projects (find_package,
// core_only, add_subdirectory, FetchContent) so that they differ only in how they get zo2.
//
// The stack: h0 = W_in x (prologue), N residual blocks h <- h + tanh(W h + b), a linear head and a
// mean squared error against a fixed linear teacher (epilogue). Everything is plain loops: the
// point is the integration, not speed.
#pragma once

// The core_only consumer (zo2::core, no Eigen) defines CONSUMER_CORE_ONLY; the others include the
// whole library, as a project that also uses the models would.
#if defined(CONSUMER_CORE_ONLY)
#include <zo2/core.hpp>
#else
#include <zo2/zo2.hpp>
#endif

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <vector>

namespace consumer {

struct TinyStack {
  using value_type = float;
  struct Batch {
    std::size_t rows = 0;
    std::vector<float> x;  // rows x width
    std::vector<float> y;  // rows
  };
  using Activation = std::vector<float>;  // rows x width
  struct Workspace {};

  std::size_t width = 8;
  std::size_t blocks = 2;

  std::size_t num_blocks() const { return blocks; }
  zo2::ParamLayout prologue_layout() const {
    zo2::ParamLayout l;
    l.add("embed.weight", {std::int64_t(width), std::int64_t(width)});
    return l;
  }
  zo2::ParamLayout block_layout() const {
    zo2::ParamLayout l;
    l.add("weight", {std::int64_t(width), std::int64_t(width)});
    l.add("bias", {std::int64_t(width)}, /*weight_decay=*/false);
    return l;
  }
  zo2::ParamLayout epilogue_layout() const {
    zo2::ParamLayout l;
    l.add("head.weight", {std::int64_t(width)});
    l.add("head.bias", {1}, /*weight_decay=*/false);
    return l;
  }

  void prologue(zo2::ParamView<const float> p, const Batch& batch, Activation& out, Workspace&) const {
    const float* w = p.tensor("embed.weight");
    out.assign(batch.rows * width, 0.0f);
    for (std::size_t r = 0; r < batch.rows; ++r)
      for (std::size_t i = 0; i < width; ++i)
        for (std::size_t k = 0; k < width; ++k) out[r * width + i] += w[i * width + k] * batch.x[r * width + k];
  }

  void forward_block(std::size_t, zo2::ParamView<const float> p, const Activation& in, Activation& out,
                     Workspace&) const {
    const float* w = p.tensor("weight");
    const float* b = p.tensor("bias");
    const std::size_t rows = in.size() / width;
    out.resize(in.size());
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t i = 0; i < width; ++i) {
        float acc = b[i];
        for (std::size_t k = 0; k < width; ++k) acc += w[i * width + k] * in[r * width + k];
        out[r * width + i] = in[r * width + i] + std::tanh(acc);
      }
  }

  double epilogue(zo2::ParamView<const float> p, zo2::ParamView<const float> /*prologue*/,
                  const Activation& in, const Batch& batch, Workspace&) const {
    const float* w = p.tensor("head.weight");
    const float bias = p.tensor("head.bias")[0];
    double loss = 0;
    for (std::size_t r = 0; r < batch.rows; ++r) {
      double pred = bias;
      for (std::size_t k = 0; k < width; ++k) pred += double(w[k]) * in[r * width + k];
      loss += (pred - batch.y[r]) * (pred - batch.y[r]);
    }
    return loss / double(batch.rows);
  }
};
static_assert(zo2::LayerStack<TinyStack>, "TinyStack must model zo2::LayerStack");

inline TinyStack::Batch make_batch(const TinyStack& model, std::size_t rows, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  TinyStack::Batch batch;
  batch.rows = rows;
  batch.x.resize(rows * model.width);
  batch.y.assign(rows, 0.0f);
  for (auto& v : batch.x) v = normal(gen);
  for (std::size_t r = 0; r < rows; ++r)  // teacher: y = sum_k (-1)^k x_k / 2
    for (std::size_t k = 0; k < model.width; ++k)
      batch.y[r] += (k % 2 ? -0.5f : 0.5f) * batch.x[r * model.width + k];
  return batch;
}

/// Runs `steps` MeZO-SGD steps from a fixed initialisation; returns 0 when the loss fell to
/// less than half its starting value, 1 otherwise (and prints both).
inline int run(const char* how, int steps = 200) {
  const TinyStack model;
  zo2::ParameterStore<float> store(zo2::ModelLayout::of(model));
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (std::size_t g = 0; g < store.num_groups(); ++g) {
    zo2::ParamView<float> group = store.group(zo2::GroupIndex{g});
    for (std::size_t t = 0; t < group.layout().num_tensors(); ++t)
      for (std::size_t j = 0; j < group.numel(t); ++j) group.tensor(t)[j] = normal(gen);
  }
  zo2::ParamView<float> embed = store.group(zo2::GroupIndex{0});  // W_in starts at identity
  for (std::size_t i = 0; i < model.width; ++i) embed.tensor("embed.weight")[i * model.width + i] += 1.0f;

  zo2::Resident<float, float> policy(store);
  zo2::ZOConfig config;
  config.lr = 5e-3;
  config.eps = 1e-3;
  config.weight_decay = 0.0;
  config.seed = 42;
  zo2::ZOOptimizer<TinyStack> optimizer(model, policy, config);

  const TinyStack::Batch batch = make_batch(model, 32, 7);
  const double before = optimizer.evaluate(batch);
  for (int s = 0; s < steps; ++s) optimizer.step(batch);
  const double after = optimizer.evaluate(batch);
  const bool ok = std::isfinite(after) && after < 0.5 * before;
  std::printf("zo2 consumer (%s): loss %.6f -> %.6f after %d MeZO steps: %s\n", how, before, after, steps,
              ok ? "ok" : "FAILED (loss did not halve)");
  return ok ? 0 : 1;
}

}  // namespace consumer
