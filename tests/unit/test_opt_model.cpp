// OPT forward parity with Hugging Face transformers 5.17 (float32, eager attention), on the
// fixtures of tests/fixtures/opt (make_opt_fixtures.py): logits, loss, candidate scores; and
// MeZO-SGD steps of ZOOptimizer over the OPT layer stack.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/models/opt/opt.hpp>
#include <zo2/zo2.hpp>

#include "../support/opt_fixtures.hpp"

namespace {

namespace fs = std::filesystem;
using zo2::opt::OPTConfig;
using Model = zo2::opt::OPTModel<float>;

using namespace zo2_test::opt_fixtures;

/// Max |ours - HF| over positions whose mask is 1, or over all positions.
double max_logit_error(const Model::Matrix& ours, const std::vector<float>& hf, const Model::Batch& batch,
                       bool include_padding = false) {
  REQUIRE(static_cast<std::size_t>(ours.size()) == hf.size());
  const auto vocab = static_cast<std::size_t>(ours.cols());
  double worst = 0;
  for (std::size_t t = 0; t < batch.batch * batch.seq; ++t) {
    if (!include_padding && !batch.attention_mask.empty() && batch.attention_mask[t] == 0) continue;
    for (std::size_t v = 0; v < vocab; ++v)
      worst = std::max(worst, std::abs(static_cast<double>(ours(t, v)) - hf[t * vocab + v]));
  }
  return worst;
}

void check_parity(const std::string& name) {
  CAPTURE(name);
  const auto loaded = zo2::opt::load_opt_checkpoint<float>(fixture(name));
  const Model model(loaded.config);
  const auto params = zo2::opt::param_set(loaded.store);
  const Expected x = read_expected(name);
  Model::Workspace ws;

  const Model::Matrix logits = model.logits(params, x.batch, ws);
  CHECK(logits.rows() == static_cast<Eigen::Index>(x.batch.batch * x.batch.seq));
  CHECK(logits.cols() == loaded.config.vocab_size);
  CHECK(max_logit_error(logits, x.logits, x.batch) <= 1e-4);
  CHECK(logits.allFinite());  // padded query rows included: no NaN from fully masked rows
  // Padded rows follow HF's eager semantics too (flat attention); the loss depends on the last
  // one, which predicts the first real token.
  CHECK(max_logit_error(logits, x.logits, x.batch, /*include_padding=*/true) <= 1e-4);

  const double loss = model.loss(params, x.batch, ws);
  CHECK(std::abs(loss - x.loss) / x.loss <= 1e-5);
  MESSAGE(name << ": max |logit - HF| = " << max_logit_error(logits, x.logits, x.batch, true)
               << ", loss rel. error = " << std::abs(loss - x.loss) / x.loss);

  const Model::Matrix logits1 = model.logits(params, x.unpadded, ws);
  CHECK(max_logit_error(logits1, x.logits_unpadded, x.unpadded) <= 1e-4);
  const double loss1 = model.loss(params, x.unpadded, ws);
  CHECK(std::abs(loss1 - x.loss_unpadded) / x.loss_unpadded <= 1e-5);

  const auto scores = model.score_candidates(params, x.prompt, x.candidates, ws);
  REQUIRE(scores.size() == x.candidate_scores.size());
  for (std::size_t c = 0; c < scores.size(); ++c) {
    CAPTURE(c);
    CHECK(scores[c] == doctest::Approx(x.candidate_scores[c]).epsilon(1e-5));
  }
}

}  // namespace

TEST_CASE("OPT pre-LN matches HF transformers: logits, loss, candidate scores") { check_parity("opt_preln"); }

TEST_CASE("OPT post-LN with project_in/project_out matches HF transformers") { check_parity("opt_postln_proj"); }

TEST_CASE("OPT without biases or LayerNorm affine (bf16 weights) matches HF transformers") {
  check_parity("opt_nobias_bf16");
}

TEST_CASE("OPT through the LayerStack interface: bf16 master, float forward, equals HF loss") {
  // Storage bf16, compute float: Resident converts; the fixture's weights are bf16-exact, so the
  // loss is HF's. This is the path ZOOptimizer::evaluate takes.
  auto loaded = zo2::opt::load_opt_checkpoint<zo2::bfloat16>(fixture("opt_nobias_bf16"));
  const Model model(loaded.config);
  const Expected x = read_expected("opt_nobias_bf16");
  zo2::Resident<zo2::bfloat16, float> policy(loaded.store);
  zo2::ZOOptimizer<Model, zo2::Resident<zo2::bfloat16, float>> optimizer(model, policy, zo2::ZOConfig{});
  CHECK(std::abs(optimizer.evaluate(x.batch) - x.loss) / x.loss <= 1e-5);
}

TEST_CASE("OPT loss is the same whatever the chunk of positions the LM head is computed in") {
  const auto loaded = zo2::opt::load_opt_checkpoint<float>(fixture("opt_postln_proj"));
  const Expected x = read_expected("opt_postln_proj");
  const auto params = zo2::opt::param_set(loaded.store);
  Model::Workspace ws;
  for (std::size_t chunk : {1, 5, 7, 1000}) {
    CAPTURE(chunk);
    const Model model(loaded.config, chunk);
    CHECK(std::abs(model.loss(params, x.batch, ws) - x.loss) / x.loss <= 1e-5);
  }
}

TEST_CASE("OPT batch errors name the field") {
  const Model model(zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln")).config);
  auto loaded = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const auto params = zo2::opt::param_set(loaded.store);
  Model::Workspace ws;
  Model::Batch b;
  b.batch = 1;
  b.seq = 3;
  b.input_ids = {2, 5, 384};
  b.labels = {2, 5, 7};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("input_ids[0][2]"), zo2::ShapeError);
  b.input_ids = {2, 5, 6};
  b.attention_mask = {1, 1};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("attention_mask"), zo2::ShapeError);
  b.attention_mask = {1, 2, 1};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("attention_mask[0][1]"), zo2::ShapeError);
  b.attention_mask.clear();
  b.labels = {2, 5, 999};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("labels[0][2]"), zo2::ShapeError);
  b.labels = {2, 5};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("labels"), zo2::ShapeError);
  b.seq = 49;  // max_position_embeddings is 48
  b.input_ids.assign(49, 5);
  b.labels.assign(49, 5);
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("max_position_embeddings"), zo2::ShapeError);
  b.seq = 48;
  b.input_ids.assign(48, 5);
  b.labels.assign(48, 5);
  CHECK(std::isfinite(model.loss(params, b, ws)));
  b.labels.assign(48, zo2::opt::kIgnoreLabel);
  CHECK(std::isnan(model.loss(params, b, ws)));  // no target: NaN, as HF's mean over nothing
}

TEST_CASE("MeZO-SGD on OPT: one step is finite, a few steps lower the loss on a repeated batch") {
  auto loaded = zo2::opt::load_opt_checkpoint<float>(fixture("opt_preln"));
  const Model model(loaded.config);
  const Expected x = read_expected("opt_preln");
  zo2::Resident<float, float> policy(loaded.store);
  zo2::ZOConfig config;
  config.lr = 1e-3;
  config.eps = 1e-3;
  config.seed = 7;
  zo2::ZOOptimizer<Model> optimizer(model, policy, config);

  const double initial = optimizer.evaluate(x.batch);
  CHECK(std::abs(initial - x.loss) / x.loss <= 1e-5);
  const zo2::StepResult first = optimizer.step(x.batch);
  CHECK(std::isfinite(first.loss_plus));
  CHECK(std::isfinite(first.loss_minus));
  CHECK(std::isfinite(first.projected_grad));
  CHECK_FALSE(first.skipped);
  CHECK(first.loss_plus != first.loss_minus);
  // Both passes sit eps away from theta: their mean is the loss at theta to O(eps^2).
  CHECK(0.5 * (first.loss_plus + first.loss_minus) == doctest::Approx(initial).epsilon(1e-3));

  for (int t = 1; t < 60; ++t) {
    const auto r = optimizer.step(x.batch);
    REQUIRE(std::isfinite(r.projected_grad));
  }
  const double after = optimizer.evaluate(x.batch);
  MESSAGE("loss " << initial << " -> " << after << " after 60 MeZO steps");
  CHECK(after < initial - 0.05);
}

TEST_CASE("MeZO-SGD on OPT (tied LM head): one perturbed copy gives the steps of two, bit for bit") {
  // ZOOptimizer's one-copy schedule: theta - eps z is written over theta + eps z between a
  // group's forwards, and the tied embedding's copy is re-materialized for the epilogue (minus
  // loss first). The weights are stored in bf16, so updates round stochastically too.
  const Expected x = read_expected("opt_preln");
  const auto run = [&](bool one_copy) {
    auto loaded = zo2::opt::load_opt_checkpoint<zo2::bfloat16>(fixture("opt_preln"));
    const Model model(loaded.config);
    using Policy = zo2::Resident<zo2::bfloat16, float>;
    Policy policy(loaded.store, zo2::ResidentOptions{one_copy});
    zo2::ZOConfig config;
    config.lr = 1e-2;
    config.eps = 1e-3;
    config.weight_decay = 0.1;
    config.seed = 11;
    zo2::ZOOptimizer<Model, Policy> optimizer(model, policy, config);
    CHECK(optimizer.shares_perturbed_copy() == one_copy);
    std::vector<zo2::StepResult> steps;
    for (int t = 0; t < 4; ++t) steps.push_back(optimizer.step(x.batch));
    optimizer.flush();
    return std::pair{steps, std::move(loaded.store)};
  };
  const auto [two, theta_two] = run(false);
  const auto [one, theta_one] = run(true);
  for (std::size_t t = 0; t < two.size(); ++t) {
    CAPTURE(t);
    CHECK(one[t].loss_plus == two[t].loss_plus);
    CHECK(one[t].loss_minus == two[t].loss_minus);
    CHECK(one[t].loss_plus != one[t].loss_minus);
  }
  const auto initial = zo2::opt::load_opt_checkpoint<zo2::bfloat16>(fixture("opt_preln"));
  const auto& ml = theta_two.model_layout();
  std::size_t differing = 0, trained = 0;
  for (std::size_t g = 0; g < ml.num_groups(); ++g) {
    const auto a = theta_one.group(zo2::GroupIndex{g});
    const auto b = theta_two.group(zo2::GroupIndex{g});
    const auto before = initial.store.group(zo2::GroupIndex{g});
    const std::size_t bytes = a.layout().total_elements() * sizeof(zo2::bfloat16);
    differing += std::memcmp(a.data(), b.data(), bytes) != 0;
    trained += std::memcmp(a.data(), before.data(), bytes) != 0;
  }
  CHECK(differing == 0);
  CHECK(trained == ml.num_groups());  // every group moved: the comparison is not of untouched weights
}
