// LLaMA-family forward parity with Hugging Face transformers 5 (float32, eager attention), on the
// fixtures of tests/fixtures/llama (make_llama_fixtures.py): per-row losses, the batch loss and a
// slice of the logits, with positions 0..seq-1 (HF's forward) and with generate()'s positions;
// and MeZO-SGD steps of ZOOptimizer over the LLaMA layer stack (the loss falls; a run saved as
// an HF checkpoint and resumed is bit-identical to an uninterrupted one).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include <zo2/models/llama/llama.hpp>
#include <zo2/zo2.hpp>

namespace {

namespace fs = std::filesystem;
using zo2::llama::LlamaConfig;
using Model = zo2::llama::LlamaModel<float>;

const std::vector<std::string> kFixtures = {"llama_gqa",       "llama_mqa_tied_bf16", "llama3_rope_bf16",
                                            "qwen2_bias_bf16", "qwen3_qknorm_fp16",   "mistral_window"};

/// tests/fixtures/llama/<name>; ZO2_TEST_DATA_DIR overrides the compiled-in path.
fs::path fixture(const std::string& name) {
  const char* env = std::getenv("ZO2_TEST_DATA_DIR");
  return fs::path(env ? env : ZO2_TEST_DATA_DIR) / "llama" / name;
}

std::vector<std::int32_t> read_i64(const zo2::io::SafetensorsFile& file, const std::string& name) {
  const auto& e = file.entry(name);
  REQUIRE(e.dtype == zo2::io::Dtype::I64);
  std::vector<std::int32_t> out(e.numel());
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::int64_t v;
    std::memcpy(&v, e.bytes.data() + 8 * i, 8);
    out[i] = static_cast<std::int32_t>(v);
  }
  return out;
}

std::vector<double> read_f64(const zo2::io::SafetensorsFile& file, const std::string& name) {
  const auto& e = file.entry(name);
  REQUIRE(e.dtype == zo2::io::Dtype::F64);
  std::vector<double> out(e.numel());
  std::memcpy(out.data(), e.bytes.data(), 8 * out.size());
  return out;
}

/// HF's inputs and outputs for one fixture.
struct Expected {
  Model::Batch batch;  // left-padded rows 1 and 2, labels
  double loss = 0;
  std::vector<double> row_losses;
  std::vector<float> logits_slice;  // [batch, seq, slice]
  std::size_t slice = 0;
  std::vector<std::int32_t> position_ids;  // generate()'s: cumsum(mask) - 1, pads 1
  std::vector<double> row_losses_positions;
  std::vector<float> logits_slice_positions;
};

Expected read_expected(const std::string& name) {
  const auto file = zo2::io::SafetensorsFile::open(fixture(name) / "expected.safetensors");
  Expected x;
  const auto shape = file.entry("input_ids").shape;
  x.batch.batch = static_cast<std::size_t>(shape[0]);
  x.batch.seq = static_cast<std::size_t>(shape[1]);
  x.batch.input_ids = read_i64(file, "input_ids");
  x.batch.attention_mask = read_i64(file, "attention_mask");
  x.batch.labels = read_i64(file, "labels");
  x.loss = file.read_as_float("loss")[0];
  x.row_losses = read_f64(file, "row_losses");
  x.logits_slice = file.read_as_float("logits_slice");
  x.slice = static_cast<std::size_t>(file.entry("logits_slice").shape[2]);
  x.position_ids = read_i64(file, "position_ids");
  x.row_losses_positions = read_f64(file, "row_losses_positions");
  x.logits_slice_positions = file.read_as_float("logits_slice_positions");
  return x;
}

/// Mean cross entropy of each row over its targets, from full logits [batch * seq, vocab].
std::vector<double> row_losses(const Model::Matrix& logits, const Model::Batch& batch) {
  std::vector<double> out;
  for (std::size_t b = 0; b < batch.batch; ++b) {
    double total = 0;
    std::size_t count = 0;
    for (std::size_t s = 0; s + 1 < batch.seq; ++s) {
      const std::int32_t target = batch.labels[b * batch.seq + s + 1];
      if (target == zo2::llama::kIgnoreLabel) continue;
      const float* row = logits.data() + (b * batch.seq + s) * logits.cols();
      total += zo2::cpu::kernels::log_sum_exp(row, logits.cols()) - static_cast<double>(row[target]);
      ++count;
    }
    out.push_back(total / static_cast<double>(count));
  }
  return out;
}

/// Max |ours - HF| over the slice of every position (padding included).
double max_slice_error(const Model::Matrix& ours, const std::vector<float>& hf, std::size_t slice) {
  REQUIRE(static_cast<std::size_t>(ours.rows()) * slice == hf.size());
  double worst = 0;
  for (Eigen::Index t = 0; t < ours.rows(); ++t)
    for (std::size_t v = 0; v < slice; ++v)
      worst = std::max(worst, std::abs(static_cast<double>(ours(t, static_cast<Eigen::Index>(v))) -
                                       hf[static_cast<std::size_t>(t) * slice + v]));
  return worst;
}

double relative(double a, double b) { return std::abs(a - b) / std::abs(b); }

void check_parity(const std::string& name) {
  CAPTURE(name);
  const auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture(name));
  const Model model(loaded.config);
  const auto params = zo2::llama::param_set(loaded.store);
  const Expected x = read_expected(name);
  Model::Workspace ws;

  // transformers' forward: positions 0..seq-1, left padding included.
  const Model::Matrix logits = model.logits(params, x.batch, ws);
  REQUIRE(logits.rows() == static_cast<Eigen::Index>(x.batch.batch * x.batch.seq));
  CHECK(logits.cols() == loaded.config.vocab_size);
  CHECK(logits.allFinite());
  const double logit_error = max_slice_error(logits, x.logits_slice, x.slice);
  CHECK(logit_error <= 1e-4);
  const std::vector<double> rows = row_losses(logits, x.batch);
  REQUIRE(rows.size() == x.row_losses.size());
  double worst_row = 0;
  for (std::size_t b = 0; b < rows.size(); ++b) {
    CAPTURE(b);
    CHECK(relative(rows[b], x.row_losses[b]) <= 1e-4);
    worst_row = std::max(worst_row, relative(rows[b], x.row_losses[b]));
  }
  const double loss = model.loss(params, x.batch, ws);
  CHECK(relative(loss, x.loss) <= 1e-5);
  MESSAGE(name << ": max |logit - HF| = " << logit_error << ", worst row loss rel. error = " << worst_row
               << ", batch loss rel. error = " << relative(loss, x.loss));

  // Each row alone, through the loss (the epilogue), is that row's loss in the batch.
  for (std::size_t b = 0; b < x.batch.batch; ++b) {
    CAPTURE(b);
    Model::Batch one;
    one.batch = 1;
    one.seq = x.batch.seq;
    auto row = [&](const std::vector<std::int32_t>& v) {
      return std::vector<std::int32_t>(v.begin() + static_cast<std::ptrdiff_t>(b * one.seq),
                                       v.begin() + static_cast<std::ptrdiff_t>((b + 1) * one.seq));
    };
    one.input_ids = row(x.batch.input_ids);
    one.attention_mask = row(x.batch.attention_mask);
    one.labels = row(x.batch.labels);
    CHECK(relative(model.loss(params, one, ws), x.row_losses[b]) <= 1e-4);
  }

  // generate()'s positions (cumsum(mask) - 1) through Batch::position_ids.
  Model::Batch positioned = x.batch;
  positioned.position_ids = x.position_ids;
  const Model::Matrix logits_pos = model.logits(params, positioned, ws);
  CHECK(max_slice_error(logits_pos, x.logits_slice_positions, x.slice) <= 1e-4);
  const std::vector<double> rows_pos = row_losses(logits_pos, positioned);
  for (std::size_t b = 0; b < rows_pos.size(); ++b) {
    CAPTURE(b);
    CHECK(relative(rows_pos[b], x.row_losses_positions[b]) <= 1e-4);
  }
}

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("zo2_test_llama_model_" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

TEST_CASE("LLaMA, GQA, untied head (fp32) matches HF transformers") { check_parity("llama_gqa"); }
TEST_CASE("LLaMA, MQA, tied head, attention and MLP biases, linear rope scaling matches HF") {
  check_parity("llama_mqa_tied_bf16");
}
TEST_CASE("LLaMA with llama3 rope scaling matches HF transformers") { check_parity("llama3_rope_bf16"); }
TEST_CASE("Qwen2 with q/k/v biases, tied head, a sliding-window layer matches HF transformers") {
  check_parity("qwen2_bias_bf16");
}
TEST_CASE("Qwen3 with q/k norm and head_dim != hidden/heads matches HF transformers") {
  check_parity("qwen3_qknorm_fp16");
}
TEST_CASE("Mistral with a sliding window shorter than the sequence matches HF transformers") {
  check_parity("mistral_window");
}

TEST_CASE("The fixtures exercise what their names say") {
  const auto config = [](const std::string& name) { return LlamaConfig::from_json_file(fixture(name) / "config.json"); };
  const LlamaConfig gqa = config("llama_gqa"), mqa = config("llama_mqa_tied_bf16"), l3 = config("llama3_rope_bf16"),
                    qwen2 = config("qwen2_bias_bf16"), qwen3 = config("qwen3_qknorm_fp16"),
                    mistral = config("mistral_window");
  CHECK(gqa.num_key_value_heads == 2);
  CHECK(gqa.num_attention_heads == 4);
  CHECK_FALSE(gqa.tie_word_embeddings);
  CHECK(mqa.num_key_value_heads == 1);
  CHECK(mqa.tie_word_embeddings);
  CHECK(mqa.qkv_bias());
  CHECK(mqa.o_bias());
  CHECK(mqa.has_mlp_bias());
  CHECK(mqa.rope.type == "linear");
  CHECK(l3.rope.type == "llama3");
  CHECK(l3.rope.original_max_position_embeddings == 64);
  // All three llama3 bands: kept (wavelength < 16), smoothed (16..64), divided by 8 (> 64).
  const LlamaConfig l3_plain = [&] {
    LlamaConfig c = l3;
    c.rope = zo2::llama::RopeConfig{};
    c.rope.theta = l3.rope.theta;
    return c;
  }();
  const auto scaled = l3.rope_inv_freq(), plain = l3_plain.rope_inv_freq();
  int kept = 0, smoothed = 0, divided = 0;
  for (std::size_t i = 0; i < scaled.size(); ++i) {
    const double wavelen = 2 * M_PI / plain[i];
    if (wavelen < 16) kept += scaled[i] == plain[i];
    else if (wavelen > 64) divided += std::abs(scaled[i] * 8 - plain[i]) <= 1e-6 * plain[i];
    else smoothed += scaled[i] < plain[i] && scaled[i] > plain[i] / 8;
  }
  CHECK(kept > 0);
  CHECK(smoothed > 0);
  CHECK(divided > 0);
  CHECK(kept + smoothed + divided == static_cast<int>(scaled.size()));
  CHECK(qwen2.qkv_bias());
  CHECK_FALSE(qwen2.o_bias());
  CHECK(qwen2.tie_word_embeddings);
  CHECK(qwen2.layer_window(0) == 0);
  CHECK(qwen2.layer_window(1) == 6);
  CHECK(qwen3.qk_norm());
  CHECK(qwen3.head_dim == 16);
  CHECK(qwen3.head_dim != qwen3.hidden_size / qwen3.num_attention_heads);
  CHECK(mistral.layer_window(0) == 5);
  CHECK(mistral.layer_window(1) == 5);
  CHECK(read_expected("mistral_window").batch.seq > 5);
}

TEST_CASE("LLaMA through the LayerStack interface: bf16 master, float forward, equals HF loss") {
  // The fixture's weights are bf16-exact, so the loss through Resident's conversion is HF's.
  auto loaded = zo2::llama::load_llama_checkpoint<zo2::bfloat16>(fixture("qwen2_bias_bf16"));
  const Model model(loaded.config);
  const Expected x = read_expected("qwen2_bias_bf16");
  zo2::Resident<zo2::bfloat16, float> policy(loaded.store);
  zo2::ZOOptimizer<Model, zo2::Resident<zo2::bfloat16, float>> optimizer(model, policy, zo2::ZOConfig{});
  CHECK(relative(optimizer.evaluate(x.batch), x.loss) <= 1e-5);
}

TEST_CASE("LLaMA loss is the same whatever the chunk of positions the LM head is computed in") {
  const auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture("llama_gqa"));
  const Expected x = read_expected("llama_gqa");
  const auto params = zo2::llama::param_set(loaded.store);
  Model::Workspace ws;
  for (std::size_t chunk : {1, 5, 7, 1000}) {
    CAPTURE(chunk);
    const Model model(loaded.config, chunk);
    CHECK(relative(model.loss(params, x.batch, ws), x.loss) <= 1e-5);
  }
}

TEST_CASE("A workspace shared by two models with different rotary frequencies serves both") {
  const auto a = zo2::llama::load_llama_checkpoint<float>(fixture("llama_gqa"));
  const auto b = zo2::llama::load_llama_checkpoint<float>(fixture("llama3_rope_bf16"));
  const Model ma(a.config), mb(b.config);
  const Expected xa = read_expected("llama_gqa"), xb = read_expected("llama3_rope_bf16");
  Model::Workspace ws;
  for (int round = 0; round < 2; ++round) {
    CHECK(relative(ma.loss(zo2::llama::param_set(a.store), xa.batch, ws), xa.loss) <= 1e-5);
    CHECK(relative(mb.loss(zo2::llama::param_set(b.store), xb.batch, ws), xb.loss) <= 1e-5);
  }
}

TEST_CASE("LLaMA batch errors name the field") {
  auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture("llama_gqa"));
  const Model model(loaded.config);
  const auto params = zo2::llama::param_set(loaded.store);
  Model::Workspace ws;
  Model::Batch b;
  b.batch = 1;
  b.seq = 3;
  b.input_ids = {1, 5, 128};
  b.labels = {1, 5, 7};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("input_ids[0][2]"), zo2::ShapeError);
  CHECK_THROWS_WITH_AS(model.validate_batch(b), doctest::Contains("input_ids[0][2]"), zo2::ShapeError);
  b.input_ids = {1, 5, 6};
  b.attention_mask = {1, 1};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("attention_mask"), zo2::ShapeError);
  b.attention_mask = {1, 2, 1};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("attention_mask[0][1]"), zo2::ShapeError);
  b.attention_mask.clear();
  b.position_ids = {0, 1};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("position_ids"), zo2::ShapeError);
  b.position_ids = {0, -1, 2};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("position_ids[0][1]"), zo2::ShapeError);
  b.position_ids.clear();
  b.labels = {1, 5, 999};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("labels[0][2]"), zo2::ShapeError);
  CHECK_THROWS_WITH_AS(model.validate_batch(b), doctest::Contains("labels[0][2]"), zo2::ShapeError);
  b.labels = {1, 5};
  CHECK_THROWS_WITH_AS(model.loss(params, b, ws), doctest::Contains("labels"), zo2::ShapeError);
  // Positions are not bounded by max_position_embeddings (transformers extrapolates too).
  b.seq = 80;
  b.input_ids.assign(80, 5);
  b.labels.assign(80, 5);
  CHECK(std::isfinite(model.loss(params, b, ws)));
  b.labels.assign(80, zo2::llama::kIgnoreLabel);
  CHECK(std::isnan(model.loss(params, b, ws)));  // no target: NaN, as HF's mean over nothing
  CHECK(model.batch_weight(b) == 0);
  b.labels[7] = 3;
  b.labels[0] = 3;  // position 0 is never a target
  CHECK(model.batch_weight(b) == 1);
}

TEST_CASE("Explicit position_ids 0..seq-1 are the default; other positions change the logits") {
  const auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture("qwen3_qknorm_fp16"));
  const Model model(loaded.config);
  const auto params = zo2::llama::param_set(loaded.store);
  Expected x = read_expected("qwen3_qknorm_fp16");
  Model::Workspace ws;
  const Model::Matrix base = model.logits(params, x.batch, ws);
  x.batch.position_ids.resize(x.batch.batch * x.batch.seq);
  for (std::size_t t = 0; t < x.batch.position_ids.size(); ++t)
    x.batch.position_ids[t] = static_cast<std::int32_t>(t % x.batch.seq);
  CHECK(model.logits(params, x.batch, ws) == base);
  for (auto& p : x.batch.position_ids) p += 3;
  const Model::Matrix shifted = model.logits(params, x.batch, ws);
  // Rotary attention depends on relative positions only: a common shift changes the logits by
  // rounding, not more. Real tokens of row 0 (no padding) barely move.
  CHECK((shifted - base).cwiseAbs().maxCoeff() < 1e-4);
  CHECK((shifted - base).cwiseAbs().maxCoeff() > 0);
}

TEST_CASE("MeZO-SGD on LLaMA-family fixtures lowers the loss on a repeated batch") {
  for (const std::string name : {"llama_gqa", "qwen2_bias_bf16"}) {
    CAPTURE(name);
    auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture(name));
    const Model model(loaded.config);
    const Expected x = read_expected(name);
    zo2::Resident<float, float> policy(loaded.store);
    zo2::ZOConfig config;
    config.lr = 2e-3;
    config.eps = 1e-3;
    config.seed = 7;
    zo2::ZOOptimizer<Model> optimizer(model, policy, config);
    const double initial = optimizer.evaluate(x.batch);
    CHECK(relative(initial, x.loss) <= 1e-5);
    const zo2::StepResult first = optimizer.step(x.batch);
    CHECK(std::isfinite(first.projected_grad));
    CHECK(first.loss_plus != first.loss_minus);
    CHECK(0.5 * (first.loss_plus + first.loss_minus) == doctest::Approx(initial).epsilon(1e-3));
    for (int t = 1; t < 80; ++t) REQUIRE(std::isfinite(optimizer.step(x.batch).projected_grad));
    const double after = optimizer.evaluate(x.batch);
    MESSAGE(name << ": loss " << initial << " -> " << after << " after 80 MeZO steps");
    CHECK(after < initial - 0.05);
  }
}

TEST_CASE("MeZO-SGD on LLaMA resumes bit-exactly from a saved HF checkpoint") {
  // flush, save_hf_checkpoint (F32), load, continue with start_step: bit-identical to a run
  // that never stopped. Weight decay on, tied (qwen2) and untied (llama) heads.
  TempDir tmp;
  for (const std::string name : {"llama_gqa", "qwen2_bias_bf16"}) {
    CAPTURE(name);
    const Expected x = read_expected(name);
    zo2::ZOConfig config;
    config.lr = 2e-3;
    config.eps = 1e-3;
    config.weight_decay = 0.1;
    config.seed = 99;
    constexpr std::uint64_t kSteps = 12, kStop = 5;

    auto straight = zo2::llama::load_llama_checkpoint<float>(fixture(name));
    const Model model(straight.config);
    {
      zo2::Resident<float, float> policy(straight.store);
      zo2::ZOOptimizer<Model> optimizer(model, policy, config);
      for (std::uint64_t t = 0; t < kSteps; ++t) optimizer.step(x.batch);
      optimizer.flush();
    }

    const fs::path saved = tmp.path / name;
    {
      auto first = zo2::llama::load_llama_checkpoint<float>(fixture(name));
      zo2::Resident<float, float> policy(first.store);
      zo2::ZOOptimizer<Model> optimizer(model, policy, config);
      for (std::uint64_t t = 0; t < kStop; ++t) optimizer.step(x.batch);
      optimizer.flush();
      CHECK(optimizer.state().step == kStop);
      zo2::llama::save_hf_checkpoint(saved, first.config, first.store);
    }
    auto resumed = zo2::llama::load_llama_checkpoint<float>(saved);
    CHECK(resumed.config == straight.config);
    {
      zo2::Resident<float, float> policy(resumed.store);
      zo2::ZOOptimizer<Model> optimizer(model, policy, config, /*start_step=*/kStop);
      for (std::uint64_t t = kStop; t < kSteps; ++t) optimizer.step(x.batch);
      optimizer.flush();
    }
    CHECK(resumed.store == straight.store);
    CHECK_FALSE(resumed.store == zo2::llama::load_llama_checkpoint<float>(saved).store);  // it trained on
  }
}

TEST_CASE("MeZO-SGD on a tied LLaMA-family head: one perturbed copy gives the steps of two, bit for bit") {
  const Expected x = read_expected("llama_mqa_tied_bf16");
  const auto run = [&](bool one_copy) {
    auto loaded = zo2::llama::load_llama_checkpoint<zo2::bfloat16>(fixture("llama_mqa_tied_bf16"));
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
  }
  CHECK(theta_one == theta_two);
}

TEST_CASE("Accumulated micro-batches weigh by targets: the step of their concatenation") {
  // Rows 0 and 1-2 of the fixture batch as two micro-batches: the weighted mean of their losses
  // is the loss of the whole batch, so the projected gradient is the same (to float rounding).
  const Expected x = read_expected("mistral_window");
  auto slice_rows = [&](std::size_t first, std::size_t count) {
    Model::Batch b;
    b.batch = count;
    b.seq = x.batch.seq;
    auto part = [&](const std::vector<std::int32_t>& v) {
      return std::vector<std::int32_t>(v.begin() + static_cast<std::ptrdiff_t>(first * b.seq),
                                       v.begin() + static_cast<std::ptrdiff_t>((first + count) * b.seq));
    };
    b.input_ids = part(x.batch.input_ids);
    b.attention_mask = part(x.batch.attention_mask);
    b.labels = part(x.batch.labels);
    return b;
  };
  const std::vector<Model::Batch> micro = {slice_rows(0, 1), slice_rows(1, 2)};
  zo2::ZOConfig config;
  config.lr = 1e-3;
  config.eps = 1e-3;
  config.seed = 5;
  auto run = [&](bool accumulate) {
    auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture("mistral_window"));
    const Model model(loaded.config);
    zo2::Resident<float, float> policy(loaded.store);
    zo2::ZOOptimizer<Model> optimizer(model, policy, config);
    CHECK(model.batch_weight(micro[0]) + model.batch_weight(micro[1]) == model.batch_weight(x.batch));
    return accumulate ? optimizer.step_accumulated(micro) : optimizer.step(x.batch);
  };
  const zo2::StepResult whole = run(false), parts = run(true);
  CHECK(parts.loss_plus == doctest::Approx(whole.loss_plus).epsilon(1e-6));
  CHECK(parts.loss_minus == doctest::Approx(whole.loss_minus).epsilon(1e-6));
  CHECK(parts.projected_grad == doctest::Approx(whole.projected_grad).epsilon(1e-3));
}

TEST_CASE("Candidate scores are the log-probabilities of the logits of each prompt + candidate") {
  const auto loaded = zo2::llama::load_llama_checkpoint<float>(fixture("qwen2_bias_bf16"));
  const Model model(loaded.config);
  const auto params = zo2::llama::param_set(loaded.store);
  Model::Workspace ws;
  const std::vector<std::int32_t> prompt = {1, 17, 45, 99, 23};
  const std::vector<std::vector<std::int32_t>> candidates = {{40}, {50, 60}, {7, 8, 9}};
  const std::vector<double> scores = model.score_candidates(params, prompt, candidates, ws);
  REQUIRE(scores.size() == candidates.size());
  for (std::size_t c = 0; c < candidates.size(); ++c) {
    CAPTURE(c);
    Model::Batch b;
    b.batch = 1;
    b.input_ids = prompt;
    b.input_ids.insert(b.input_ids.end(), candidates[c].begin(), candidates[c].end());
    b.seq = b.input_ids.size();
    const Model::Matrix logits = model.logits(params, b, ws);
    double expected = 0;
    for (std::size_t k = 0; k < candidates[c].size(); ++k) {
      const Eigen::Index row = static_cast<Eigen::Index>(prompt.size() - 1 + k);
      expected += static_cast<double>(logits(row, candidates[c][k])) -
                  zo2::cpu::kernels::log_sum_exp(logits.data() + row * logits.cols(), logits.cols());
    }
    CHECK(scores[c] == doctest::Approx(expected).epsilon(1e-5));
  }
}
