// A small user-defined layer stack, written the way a library user would write one: it is test
// code, not library code. Regression with a tanh MLP:
//   prologue  h = x W_in^T + b_in                      (d_in -> width)
//   block i   h = tanh(h W_i^T + b_i) + h              (width -> width, residual)
//   epilogue  y_hat = h w_out + b_out; loss = mean (y_hat - y)^2
#pragma once

#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include <zo2/zo2.hpp>

namespace zo2_test {

template <class T>
struct DenseTanhStack {
  using value_type = T;
  struct Batch {
    std::size_t rows = 0;
    std::vector<T> x;  // rows x d_in
    std::vector<T> y;  // rows
  };
  struct Activation {
    std::vector<T> h;  // rows x width
  };
  struct Workspace {};

  std::size_t d_in = 4, width = 8, blocks = 3;

  std::size_t num_blocks() const { return blocks; }
  zo2::ParamLayout prologue_layout() const {
    zo2::ParamLayout l;
    l.add("in.weight", {(long)width, (long)d_in});
    l.add("in.bias", {(long)width}, false);
    return l;
  }
  zo2::ParamLayout block_layout() const {
    zo2::ParamLayout l;
    l.add("weight", {(long)width, (long)width});
    l.add("bias", {(long)width}, false);
    return l;
  }
  zo2::ParamLayout epilogue_layout() const {
    zo2::ParamLayout l;
    l.add("out.weight", {1, (long)width});
    l.add("out.bias", {1}, false);
    return l;
  }

  void prologue(zo2::ParamView<const T> p, const Batch& b, Activation& out, Workspace&) const {
    const T* W = p.tensor(0);
    const T* bias = p.tensor(1);
    out.h.assign(b.rows * width, T{});
    for (std::size_t r = 0; r < b.rows; ++r)
      for (std::size_t o = 0; o < width; ++o) {
        T acc = bias[o];
        for (std::size_t i = 0; i < d_in; ++i) acc += W[o * d_in + i] * b.x[r * d_in + i];
        out.h[r * width + o] = acc;
      }
  }
  void forward_block(std::size_t, zo2::ParamView<const T> p, const Activation& in, Activation& out,
                     Workspace&) const {
    const T* W = p.tensor(0);
    const T* bias = p.tensor(1);
    const std::size_t rows = in.h.size() / width;
    out.h.assign(in.h.size(), T{});
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t o = 0; o < width; ++o) {
        T acc = bias[o];
        for (std::size_t i = 0; i < width; ++i) acc += W[o * width + i] * in.h[r * width + i];
        out.h[r * width + o] = std::tanh(acc) + in.h[r * width + o];
      }
  }
  double epilogue(zo2::ParamView<const T> p, zo2::ParamView<const T>, const Activation& in, const Batch& b, Workspace&) const {
    const T* w = p.tensor(0);
    const T bias = p.tensor(1)[0];
    double loss = 0;
    for (std::size_t r = 0; r < b.rows; ++r) {
      T y_hat = bias;
      for (std::size_t i = 0; i < width; ++i) y_hat += w[i] * in.h[r * width + i];
      const double d = static_cast<double>(y_hat) - static_cast<double>(b.y[r]);
      loss += d * d;
    }
    return loss / static_cast<double>(b.rows);
  }
};

/// Fills every tensor of every group with N(0, scale^2 / fan_in)-ish values (fan_in = last dim).
template <class S>
void init_random(zo2::ParameterStore<S>& store, unsigned seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto& ml = store.model_layout();
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    auto view = store.group(zo2::GroupIndex{g});
    const auto& layout = view.layout();
    for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
      const auto& spec = layout.spec(r);
      const double sd = scale / std::sqrt(static_cast<double>(spec.shape.back()));
      for (std::size_t j = 0; j < spec.numel(); ++j)
        view.tensor(r)[j] = zo2::store_rounded<S>(static_cast<zo2::compute_t<S>>(sd * normal(rng)), 0, false);
    }
  }
}

/// A regression batch: y = sin(x . a) + 0.5 x_0, deterministic from the seed.
template <class T>
typename DenseTanhStack<T>::Batch make_regression_batch(std::size_t rows, std::size_t d_in, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  typename DenseTanhStack<T>::Batch b;
  b.rows = rows;
  for (std::size_t r = 0; r < rows; ++r) {
    double dot = 0;
    for (std::size_t i = 0; i < d_in; ++i) {
      const double x = u(rng);
      b.x.push_back(static_cast<T>(x));
      dot += x * (0.5 + 0.25 * static_cast<double>(i));
    }
    b.y.push_back(static_cast<T>(std::sin(dot) + 0.5 * static_cast<double>(b.x[r * d_in])));
  }
  return b;
}

}  // namespace zo2_test
