// A user-defined layer stack (tests/support/dense_tanh_stack.hpp, not library code) learns a
// regression task with MeZO-SGD on the CPU.
#include <doctest/doctest.h>

#include <zo2/zo2.hpp>

#include "../support/dense_tanh_stack.hpp"

TEST_CASE("a small dense+tanh stack learns a regression task: loss falls by 10x in 3000 steps") {
  zo2_test::DenseTanhStack<float> model;
  model.width = 12;
  zo2::ParameterStore<float> store(zo2::ModelLayout::of(model));
  zo2_test::init_random(store, 1);
  zo2::Resident<float, float> policy(store);
  zo2::ZOConfig cfg;
  cfg.lr = 2e-3;
  cfg.eps = 1e-3;
  cfg.seed = 17;
  zo2::ZOOptimizer opt(model, policy, cfg);
  const auto train = zo2_test::make_regression_batch<float>(64, model.d_in, 5);
  const auto held_out = zo2_test::make_regression_batch<float>(64, model.d_in, 6);
  const double initial = opt.evaluate(train);
  const double initial_held_out = opt.evaluate(held_out);
  for (int t = 0; t < 3000; ++t) opt.step(train);
  const double final_loss = opt.evaluate(train);
  MESSAGE("train loss " << initial << " -> " << final_loss << ", held-out " << initial_held_out
                        << " -> " << opt.evaluate(held_out));
  CHECK(final_loss < initial / 10.0);
  CHECK(opt.evaluate(held_out) < initial_held_out);
}
