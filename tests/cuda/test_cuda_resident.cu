// CudaResident under the unchanged ZOOptimizer: a user-defined layer stack written with tiny CUDA
// kernels (tests/support/device_dense_tanh_stack.cuh, the device twin of
// tests/support/dense_tanh_stack.hpp) gives the same projected gradients and parameters as the
// CPU Resident run of the CPU stack, and learns with bf16 storage. The rest of the optimizer
// family on the GPU: tests/cuda/test_cuda_family.cu.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"
#include "../support/device_dense_tanh_stack.cuh"

using namespace zo2;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_cuda_resident)\n");
  return ok;
}();

using zo2_test::DeviceDenseTanhStack;
using zo2_test::to_device;

bool close(double a, double b, double rel, double floor = 0.0) {
  return std::fabs(a - b) <= rel * std::max(std::fabs(b), floor);
}

}  // namespace

TEST_CASE("CudaResident<float, float> through ZOOptimizer matches the CPU Resident run step by step" *
          doctest::skip(!kHaveDevice)) {
  zo2_test::DenseTanhStack<float> cpu_model;
  cpu_model.width = 12;
  DeviceDenseTanhStack gpu_model;
  gpu_model.shape = cpu_model;

  ParameterStore<float> cpu_store(ModelLayout::of(cpu_model));
  zo2_test::init_random(cpu_store, 21);
  ParameterStore<float> gpu_store = cpu_store;

  Resident<float, float> cpu_policy(cpu_store);
  gpu::CudaResident<float, float> gpu_policy(gpu_store);
  gpu_model.stream = gpu_policy.stream();

  ZOConfig cfg;
  cfg.lr = 2e-3;
  cfg.eps = 1e-2;  // L+ - L- well above float rounding of L, so g compares at 1e-4
  cfg.weight_decay = 0.05;
  cfg.seed = 1234567;
  ZOOptimizer cpu_opt(cpu_model, cpu_policy, cfg);
  ZOOptimizer gpu_opt(gpu_model, gpu_policy, cfg);

  const auto batch = zo2_test::make_regression_batch<float>(64, cpu_model.d_in, 3);
  const auto d_batch = to_device(batch);

  const double cpu_initial = cpu_opt.evaluate(batch);
  const double gpu_initial = gpu_opt.evaluate(d_batch);
  CHECK(close(gpu_initial, cpu_initial, 1e-5));

  double max_rel_g = 0, sum_abs_g = 0;
  for (int t = 0; t < 12; ++t) {
    const StepResult c = cpu_opt.step(batch);
    const StepResult g = gpu_opt.step(d_batch);
    CAPTURE(t);
    CHECK(close(g.loss_plus, c.loss_plus, 1e-5));
    CHECK(close(g.loss_minus, c.loss_minus, 1e-5));
    CHECK(close(g.projected_grad, c.projected_grad, 1e-4, 1.0));
    sum_abs_g += std::fabs(c.projected_grad);
    max_rel_g = std::max(max_rel_g, std::fabs(g.projected_grad - c.projected_grad) /
                                        std::max(std::fabs(c.projected_grad), 1.0));
  }
  MESSAGE("max relative difference of g over 12 steps: " << max_rel_g);

  cpu_opt.flush();
  gpu_opt.flush();
  gpu_policy.download(gpu_store);
  // theta moved by lr * sum_t g_t z_t: its rounding differences scale with that path, not with
  // the final |theta| (an element can end near zero).
  const double path = cfg.lr * sum_abs_g * 4.0;
  std::size_t bad = 0, differ = 0;
  const ModelLayout& ml = cpu_store.model_layout();
  for (std::size_t gi = 0; gi < ml.num_groups(); ++gi) {
    const auto a = std::as_const(cpu_store).group(GroupIndex{gi});
    const auto b = std::as_const(gpu_store).group(GroupIndex{gi});
    for (std::size_t r = 0; r < a.layout().num_tensors(); ++r)
      for (std::size_t j = 0; j < a.numel(r); ++j) {
        const float x = a.tensor(r)[j], y = b.tensor(r)[j];
        if (x != y) ++differ;
        if (!(std::fabs(x - y) <= 1e-5 * (std::fabs(x) + path))) ++bad;
      }
  }
  MESSAGE("theta elements that differ from the CPU run (within rounding): " << differ);
  CHECK(bad == 0);
  CHECK(close(gpu_opt.evaluate(d_batch), cpu_opt.evaluate(batch), 1e-5));
  CHECK(gpu_opt.evaluate(d_batch) < gpu_initial);
}

TEST_CASE("CudaResident<bfloat16, float>: learns, and its first steps match the CPU bf16 run" *
          doctest::skip(!kHaveDevice)) {
  zo2_test::DenseTanhStack<float> cpu_model;
  cpu_model.width = 12;
  DeviceDenseTanhStack gpu_model;
  gpu_model.shape = cpu_model;

  ParameterStore<bfloat16> cpu_store(ModelLayout::of(cpu_model));
  zo2_test::init_random(cpu_store, 5);
  ParameterStore<bfloat16> gpu_store = cpu_store;
  Resident<bfloat16, float> cpu_policy(cpu_store);
  gpu::CudaResident<bfloat16, float> gpu_policy(gpu_store);
  gpu_model.stream = gpu_policy.stream();

  ZOConfig cfg;
  cfg.lr = 2e-3;
  cfg.eps = 1e-2;
  cfg.seed = 99;
  ZOOptimizer cpu_opt(cpu_model, cpu_policy, cfg);
  ZOOptimizer gpu_opt(gpu_model, gpu_policy, cfg);
  const auto batch = zo2_test::make_regression_batch<float>(64, cpu_model.d_in, 5);
  const auto d_batch = to_device(batch);

  for (int t = 0; t < 5; ++t) {
    const StepResult c = cpu_opt.step(batch);
    const StepResult g = gpu_opt.step(d_batch);
    CAPTURE(t);
    CHECK(close(g.projected_grad, c.projected_grad, 1e-4, 1.0));
  }
  cpu_opt.flush();
  gpu_opt.flush();
  gpu_policy.download(gpu_store);
  std::size_t differ = 0, far = 0, total = 0;
  const ModelLayout& ml = cpu_store.model_layout();
  for (std::size_t gi = 0; gi < ml.num_groups(); ++gi) {
    const auto a = std::as_const(cpu_store).group(GroupIndex{gi});
    const auto b = std::as_const(gpu_store).group(GroupIndex{gi});
    for (std::size_t r = 0; r < a.layout().num_tensors(); ++r)
      for (std::size_t j = 0; j < a.numel(r); ++j) {
        const std::uint16_t x = a.tensor(r)[j].bits, y = b.tensor(r)[j].bits;
        ++total;
        if (x != y) ++differ;
        if (x != y && ((x ^ y) & 0x8000u || (x > y ? x - y : y - x) > 1)) ++far;
      }
  }
  MESSAGE("bf16 theta after 5 steps: " << differ << " of " << total << " elements differ from the CPU run");
  CHECK(far == 0);
  CHECK(differ * 100 <= total);

  // Learning: the loss falls with bf16 master weights (stochastic rounding keeps small updates).
  const double initial = gpu_opt.evaluate(d_batch);
  for (int t = 0; t < 1500; ++t) gpu_opt.step(d_batch);
  const double final_loss = gpu_opt.evaluate(d_batch);
  MESSAGE("bf16 loss " << initial << " -> " << final_loss << " in 1500 steps");
  CHECK(std::isfinite(final_loss));
  CHECK(final_loss < 0.5 * initial);
}

TEST_CASE("CudaResident uploads and downloads the master copy exactly and refuses another layout" *
          doctest::skip(!kHaveDevice)) {
  zo2_test::DenseTanhStack<float> model;
  ParameterStore<float16> store(ModelLayout::of(model));
  zo2_test::init_random(store, 8);
  gpu::CudaResident<float16, float16> policy(store);
  ParameterStore<float16> back(ModelLayout::of(model));
  policy.download(back);
  CHECK(back == store);

  // current() of a 16-bit master read as 16-bit is the master itself, on the device.
  const auto cur = policy.current(GroupIndex{1});
  CHECK(cur.data() == policy.master(GroupIndex{1}).data());

  zo2_test::DenseTanhStack<float> wider;
  wider.width = 16;
  ParameterStore<float16> other(ModelLayout::of(wider));
  CHECK_THROWS_AS(policy.download(other), ConfigError);
  CHECK_THROWS_AS(policy.upload(other), ConfigError);
}
