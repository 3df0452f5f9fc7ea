// A layer stack of your own, fine-tuned with zo2's MeZO-SGD in a few dozen lines.
//
// The task: fit y = sin(3x) on [-1, 1] with a stack of residual tanh layers. A layer stack is a
// prologue (here: lift x to `width` features), N blocks sharing one parameter layout (the part
// zo2 can stream through a GPU), and an epilogue ending in a scalar loss. The model owns no
// parameters: zo2 hands each function a view of its group's flat buffer.
#include <cmath>
#include <cstdio>
#include <vector>

#include <zo2/zo2.hpp>

struct SineStack {
  using value_type = float;
  struct Batch { std::vector<float> x, y; };
  struct Activation { std::vector<float> h; };  // [rows, width]
  struct Workspace {};
  std::size_t width = 16, blocks = 3;

  std::size_t num_blocks() const { return blocks; }
  zo2::ParamLayout prologue_layout() const { return layer("in", 1); }
  zo2::ParamLayout block_layout() const { return layer("hidden", width); }
  zo2::ParamLayout epilogue_layout() const {
    zo2::ParamLayout l;
    l.add("out.weight", {1, (long)width});
    l.add("out.bias", {1}, /*weight_decay=*/false);
    return l;
  }
  zo2::ParamLayout layer(const char* name, std::size_t in) const {
    zo2::ParamLayout l;
    l.add(std::string(name) + ".weight", {(long)width, (long)in});
    l.add(std::string(name) + ".bias", {(long)width}, false);
    return l;
  }
  // h_out[r] = act(W h_in[r] + b) (+ h_in[r] for the residual blocks)
  void affine(zo2::ParamView<const float> p, const float* in, std::size_t in_width, std::size_t rows,
              std::vector<float>& out, bool residual) const {
    out.assign(rows * width, 0.0f);
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t o = 0; o < width; ++o) {
        float a = p.tensor(1)[o];
        for (std::size_t i = 0; i < in_width; ++i) a += p.tensor(0)[o * in_width + i] * in[r * in_width + i];
        out[r * width + o] = std::tanh(a) + (residual ? in[r * in_width + o] : 0.0f);
      }
  }
  void prologue(zo2::ParamView<const float> p, const Batch& b, Activation& out, Workspace&) const {
    affine(p, b.x.data(), 1, b.x.size(), out.h, false);
  }
  void forward_block(std::size_t, zo2::ParamView<const float> p, const Activation& in, Activation& out, Workspace&) const {
    affine(p, in.h.data(), width, in.h.size() / width, out.h, true);
  }
  double epilogue(zo2::ParamView<const float> p, zo2::ParamView<const float>, const Activation& in, const Batch& b,
                  Workspace&) const {
    double loss = 0;
    for (std::size_t r = 0; r < b.x.size(); ++r) {
      float y = p.tensor(1)[0];
      for (std::size_t i = 0; i < width; ++i) y += p.tensor(0)[i] * in.h[r * width + i];
      loss += (y - b.y[r]) * (y - b.y[r]);
    }
    return loss / static_cast<double>(b.x.size());
  }
};
static_assert(zo2::LayerStack<SineStack>);

int main() {
  SineStack model;
  zo2::ParameterStore<float> store(zo2::ModelLayout::of(model));
  for (std::size_t g = 0; g < store.num_groups(); ++g) {  // small random start
    auto view = store.group(zo2::GroupIndex{g});
    for (std::size_t r = 0; r < view.layout().num_tensors(); ++r)
      for (std::size_t j = 0; j < view.numel(r); ++j) view.tensor(r)[j] = 0.5f * zo2::normal_at(7, 0, g * 8 + r, j);
  }
  SineStack::Batch data;
  for (int i = 0; i < 64; ++i) {
    data.x.push_back(-1.0f + 2.0f * i / 63.0f);
    data.y.push_back(std::sin(3.0f * data.x.back()));
  }
  zo2::Resident<float, float> policy(store);
  zo2::ZOConfig config;
  config.lr = 2e-3;
  config.eps = 1e-3;
  config.seed = 42;
  zo2::ZOOptimizer optimizer(model, policy, config);
  const double start = optimizer.evaluate(data);
  for (int step = 1; step <= 4000; ++step) {
    const zo2::StepResult r = optimizer.step(data);
    if (step % 1000 == 0) std::printf("step %4d  loss %.4f\n", step, 0.5 * (r.loss_plus + r.loss_minus));
  }
  const double end = optimizer.evaluate(data);
  std::printf("loss %.4f -> %.4f\n", start, end);
  return end < 0.5 * start ? 0 : 1;  // the tests run this: the loss must fall
}
