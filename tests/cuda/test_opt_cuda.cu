// The OPT forward on the GPU: each kernel against a float64 CPU reference on random data (GEMM
// with bias / ReLU / residual / batches, LayerNorm, embedding and positions, masked softmax
// attention, chunked cross entropy), then the whole OPTCudaModel against Hugging Face's logits
// and losses (tests/fixtures/opt) in fp32, bf16 and fp16, against the CPU OPTModel on the same
// weights, and MeZO steps of ZOOptimizer with the CUDA Resident policy against the CPU ones.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/cross_entropy.cuh>
#include <zo2/backend/cuda/embedding.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/layernorm.cuh>
#include <zo2/models/opt/cuda/opt_cuda_model.cuh>
#include <zo2/models/opt/opt.hpp>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/zo2.hpp>

#include "../support/attention_reference.hpp"
#include "../support/cuda_test_data.cuh"
#include "../support/opt_fixtures.hpp"

using namespace zo2_test::cuda_data;
using zo2_test::attention_reference;

using namespace zo2;
namespace fs = std::filesystem;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_opt_cuda)\n");
  return ok;
}();

// ---- helpers ----------------------------------------------------------------------------------

template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 2e-6;
  else if constexpr (std::is_same_v<T, float16>) return 2e-3;
  else return 1e-2;
}

#define ZO2_KERNEL_TYPES float, zo2::bfloat16, zo2::float16

}  // namespace

// ---- GEMM -------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("Gemm: x W^T + bias, ReLU, residual, batched, shared operand, x W vs float64" *
                       doctest::skip(!kHaveDevice),
                   T, ZO2_KERNEL_TYPES) {
  for (const int autotune : {0, 8}) {
    CAPTURE(autotune);  // 8: each shape's first run times up to 8 algorithms (into scratch) first
    std::mt19937 rng(11);
    zo2::gpu::Gemm gemm;
    gemm.set_autotune(autotune);
    zo2::gpu::Stream stream;
    struct Case {
      std::int64_t m, n, k;
      bool bias, relu, residual, transposed;
      int batch;
      bool shared_x;
    };
    const Case cases[] = {
        {37, 53, 29, false, false, false, true, 1, false}, {64, 96, 128, true, false, false, true, 1, false},
        {40, 72, 56, true, true, false, true, 1, false},   {48, 32, 80, true, false, true, true, 1, false},
        {33, 40, 24, true, true, false, true, 2, false},   {32, 48, 64, true, false, false, true, 3, true},
        {24, 40, 56, false, false, false, false, 4, false}, {16, 24, 8, false, true, false, true, 1, false},
    };
    for (const Case& c : cases) {
      const std::string shape = std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k) +
                                " batch " + std::to_string(c.batch) + (c.bias ? " bias" : "") + (c.relu ? " relu" : "") +
                                (c.residual ? " residual" : "") + (c.transposed ? " xW^T" : " xW");
      CAPTURE(shape);
      const std::int64_t xs = c.shared_x ? 0 : c.m * c.k, ws = c.n * c.k + 32, ys = c.m * c.n, bs = c.n + 8;
      const auto x = random_values<T>(static_cast<std::size_t>(c.shared_x ? c.m * c.k : xs * c.batch), rng);
      const auto w = random_values<T>(static_cast<std::size_t>(ws * c.batch), rng, 0.2);
      const auto bias = random_values<T>(static_cast<std::size_t>(bs * c.batch), rng);
      const auto resid = random_values<T>(static_cast<std::size_t>(ys * c.batch), rng);
      auto dx = upload(x), dw = upload(w), db = upload(bias), dr = upload(resid);
      zo2::gpu::DeviceBuffer<T> dy(static_cast<std::size_t>(ys * c.batch));
      poison(dy.data(), dy.size());
      zo2::gpu::GemmArgs<T, T> a;
      a.m = c.m, a.n = c.n, a.k = c.k;
      a.x = dx.data(), a.ldx = c.k, a.stride_x = xs;
      a.w = dw.data(), a.ldw = c.transposed ? c.k : c.n, a.stride_w = ws, a.w_transposed = c.transposed;
      a.y = dy.data(), a.ldy = c.n, a.stride_y = ys;
      if (c.bias) a.bias = db.data(), a.stride_bias = bs;
      if (c.residual) a.c = dr.data(), a.beta = 1.0f;
      a.relu = c.relu;
      a.batch = c.batch;
      gemm.run(a, stream);
      const auto y = download(dy.data(), dy.size());
      const auto X = as_double(x), W = as_double(w), B = as_double(bias), R = as_double(resid);
      std::vector<double> ref(y.size());
      for (int b = 0; b < c.batch; ++b)
        for (std::int64_t i = 0; i < c.m; ++i)
          for (std::int64_t j = 0; j < c.n; ++j) {
            double s = 0;
            for (std::int64_t k = 0; k < c.k; ++k) {
              const double wv = c.transposed ? W[b * ws + j * c.k + k] : W[b * ws + k * c.n + j];
              s += X[b * xs + i * c.k + k] * wv;
            }
            if (c.residual) s += R[b * ys + i * c.n + j];
            if (c.bias) s += B[b * bs + j];
            if (c.relu) s = std::max(s, 0.0);
            ref[b * ys + i * c.n + j] = s;
          }
      CHECK(rel_error(y, ref) <= tolerance<T>());
    }
    CHECK(gemm.cached_plans() == std::size(cases));
  }
}

TEST_CASE("Gemm autotuning: an in-place residual (y = x W^T + y) is applied once" * doctest::skip(!kHaveDevice)) {
  std::mt19937 rng(12);
  zo2::gpu::Gemm gemm;
  gemm.set_autotune(8);
  zo2::gpu::Stream stream;
  const std::int64_t m = 96, n = 128, k = 64;
  const auto x = random_values<float>(static_cast<std::size_t>(m * k), rng);
  const auto w = random_values<float>(static_cast<std::size_t>(n * k), rng, 0.2);
  const auto y0 = random_values<float>(static_cast<std::size_t>(m * n), rng);
  auto dx = upload(x), dw = upload(w), dy = upload(y0);
  gemm.linear<float>(dx.data(), dw.data(), nullptr, dy.data(), m, n, k, stream.get(), false, dy.data());
  stream.synchronize();
  const auto y = download(dy.data(), dy.size());
  std::vector<double> ref(y.size());
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = y0[i * n + j];
      for (std::int64_t q = 0; q < k; ++q) s += static_cast<double>(x[i * k + q]) * w[j * k + q];
      ref[i * n + j] = s;
    }
  CHECK(rel_error(y, ref) <= tolerance<float>());
}

TEST_CASE("Gemm: bf16 inputs to fp32 outputs with alpha; TF32 is opt-in" * doctest::skip(!kHaveDevice)) {
  std::mt19937 rng(12);
  zo2::gpu::Gemm gemm;
  const std::int64_t m = 70, n = 50, k = 90;
  const auto x = random_values<bfloat16>(m * k, rng), w = random_values<bfloat16>(n * k, rng);
  auto dx = upload(x), dw = upload(w);
  zo2::gpu::DeviceBuffer<float> dy(m * n);
  poison(dy.data(), dy.size());
  zo2::gpu::GemmArgs<bfloat16, float> a;
  a.m = m, a.n = n, a.k = k, a.x = dx.data(), a.ldx = k, a.w = dw.data(), a.ldw = k, a.y = dy.data(), a.ldy = n;
  a.alpha = 0.125f;
  gemm.run(a, nullptr);
  const auto y = download(dy.data(), dy.size());
  const auto X = as_double(x), W = as_double(w);
  std::vector<double> ref(m * n);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t q = 0; q < k; ++q) s += X[i * k + q] * W[j * k + q];
      ref[i * n + j] = 0.125 * s;
    }
  CHECK(rel_error(y, ref) <= 1e-6);  // exact products of bf16 values, fp32 accumulation
  CHECK_FALSE(gemm.allow_tf32());
  CHECK_THROWS_AS(gemm.linear<float>(nullptr, nullptr, nullptr, nullptr, 4, 4, 4, nullptr), ShapeError);
}

// ---- LayerNorm ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("layer_norm vs float64, with and without affine, wide rows, offset mean" *
                       doctest::skip(!kHaveDevice),
                   T, ZO2_KERNEL_TYPES) {
  std::mt19937 rng(13);
  // 16-byte multiples take the register-row kernel (12288: 6 vectors a thread in bf16), 1003 and
  // fp32's 12288 (12 vectors a thread) the three-pass one.
  for (std::int64_t cols : {32, 768, 1000, 1003, 5120, 12288}) {
    for (bool affine : {true, false}) {
      CAPTURE(cols);
      CAPTURE(affine);
      const std::int64_t rows = 37;
      const auto x = random_values<T>(rows * cols, rng, 2.0, 5.0);
      const auto g = random_values<T>(cols, rng, 0.1, 1.0), b = random_values<T>(cols, rng, 0.1);
      auto dx = upload(x), dg = upload(g), db = upload(b);
      zo2::gpu::DeviceBuffer<T> dy(rows * cols);
      poison(dy.data(), dy.size());
      zo2::gpu::layer_norm<T>(dx.data(), affine ? dg.data() : nullptr, affine ? db.data() : nullptr, dy.data(), rows, cols,
                          1e-5f, nullptr);
      const auto y = download(dy.data(), dy.size());
      const auto X = as_double(x), G = as_double(g), B = as_double(b);
      std::vector<double> ref(x.size());
      for (std::int64_t r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (std::int64_t i = 0; i < cols; ++i) mean += X[r * cols + i];
        mean /= cols;
        for (std::int64_t i = 0; i < cols; ++i) var += (X[r * cols + i] - mean) * (X[r * cols + i] - mean);
        var /= cols;
        for (std::int64_t i = 0; i < cols; ++i) {
          double v = (X[r * cols + i] - mean) / std::sqrt(var + 1e-5);
          if (affine) v = v * G[i] + B[i];
          ref[r * cols + i] = v;
        }
      }
      CHECK(rel_error(y, ref) <= tolerance<T>() + 1e-6);
    }
  }
}

// ---- embedding -----------------------------------------------------------------------------------

TEST_CASE("positions from the mask (offset 2, left padding) and the embedding gather" * doctest::skip(!kHaveDevice)) {
  const std::int64_t batch = 3, seq = 300, width = 40, vocab = 17;
  std::vector<std::uint8_t> mask(batch * seq, 1);
  for (int s = 0; s < 5; ++s) mask[seq + s] = 0;         // row 1: 5 pads on the left
  for (int s = 0; s < 290; ++s) mask[2 * seq + s] = 0;   // row 2: 290 pads
  mask[2 * seq + 295] = 0;                               // and a hole
  std::vector<std::int32_t> ids(batch * seq);
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int32_t>((t * 7) % vocab);
  std::mt19937 rng(14);
  const auto tokens = random_values<float>(vocab * width, rng), table = random_values<float>((seq + 2) * width, rng);
  auto dmask = upload(mask);
  auto dids = upload(ids);
  auto dtok = upload(tokens), dtab = upload(table);
  zo2::gpu::DeviceBuffer<std::int32_t> dpos(batch * seq);
  poison(dpos.data(), dpos.size());
  zo2::gpu::positions_from_mask(dmask.data(), dpos.data(), batch, seq, 2, nullptr);
  const auto pos = download(dpos.data(), dpos.size());
  std::vector<std::int32_t> expected(batch * seq);
  for (std::int64_t b = 0; b < batch; ++b) {
    int cumulative = 0;
    for (std::int64_t s = 0; s < seq; ++s) {
      cumulative += mask[b * seq + s];
      expected[b * seq + s] = cumulative * mask[b * seq + s] - 1 + 2;
    }
  }
  CHECK(pos == expected);
  zo2::gpu::DeviceBuffer<float> dout(batch * seq * width);
  poison(dout.data(), dout.size());
  zo2::gpu::embed<float>(dids.data(), dtok.data(), dpos.data(), dtab.data(), dout.data(), batch * seq, width, nullptr);
  const auto out = download(dout.data(), dout.size());
  std::vector<double> ref(out.size());
  for (std::int64_t t = 0; t < batch * seq; ++t)
    for (std::int64_t i = 0; i < width; ++i)
      ref[t * width + i] = double(tokens[ids[t] * width + i] + table[expected[t] * width + i]);
  CHECK(rel_error(out, ref) <= 1e-7);
}

// ---- attention -----------------------------------------------------------------------------------


TEST_CASE_TEMPLATE("causal_attention with padding (fully masked rows flat, no NaN) vs float64" *
                       doctest::skip(!kHaveDevice),
                   T, ZO2_KERNEL_TYPES) {
  std::mt19937 rng(15);
  zo2::gpu::Gemm gemm;
  zo2::gpu::AttentionScratch<T> scratch;
  // seq 130: three query chunks of 64, and padding rows spanning the first two.
  for (auto [batch, seq, heads, hd] : {std::array<std::int64_t, 4>{3, 45, 4, 16}, {2, 130, 2, 64}, {1, 200, 3, 32}}) {
    CAPTURE(seq);
    CAPTURE(hd);
    const std::int64_t hidden = heads * hd, n = batch * seq * hidden;
    const auto q = random_values<T>(n, rng, 1.0), k = random_values<T>(n, rng, 1.0), v = random_values<T>(n, rng);
    std::vector<std::uint8_t> mask(batch * seq, 1);
    if (batch == 3) {
      for (int s = 0; s < 7; ++s) mask[seq + s] = 0;   // left padding
      for (int s = 0; s < 30; ++s) mask[2 * seq + s] = 0;
      mask[2 * seq + 40] = 0;                           // a masked key inside a sequence
    } else if (batch == 2) {
      for (int s = 0; s < 70; ++s) mask[seq + s] = 0;  // fully masked rows in chunks 0 and 1
      mask[seq + 100] = 0;
    }
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::gpu::DeviceBuffer<T> dc(n);
    poison(dc.data(), dc.size());
    zo2::gpu::causal_attention<T>(gemm, dq.data(), dk.data(), dv.data(), dm.data(), dc.data(), batch, seq, heads, hd,
                              scratch, nullptr);
    const auto c = download(dc.data(), dc.size());
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v), mask, batch, seq, heads, hd);
    CHECK(rel_error(c, ref) <= 3 * tolerance<T>());
  }
}

// ---- cross entropy ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cross_entropy_loss over several vocabulary chunks vs float64; per-row log-probs" *
                       doctest::skip(!kHaveDevice),
                   T, ZO2_KERNEL_TYPES) {
  std::mt19937 rng(16);
  zo2::gpu::Gemm gemm;
  zo2::gpu::CrossEntropyScratch scratch;
  const std::int64_t rows = 50, width = 48, vocab = 1003;
  const auto f = random_values<T>(rows * width, rng), e = random_values<T>(vocab * width, rng, 0.5);
  std::vector<std::int32_t> targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) targets[r] = static_cast<std::int32_t>((r * 97 + 5) % vocab);
  targets[3] = 0;
  targets[4] = static_cast<std::int32_t>(vocab - 1);
  auto df = upload(f), de = upload(e);
  auto dt = upload(targets);
  const auto F = as_double(f), E = as_double(e);
  std::vector<double> ref_lp(rows);
  double ref_loss = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    std::vector<double> logit(vocab);
    double mx = -INFINITY;
    for (std::int64_t v = 0; v < vocab; ++v) {
      double s = 0;
      for (std::int64_t i = 0; i < width; ++i) s += F[r * width + i] * E[v * width + i];
      logit[v] = s;
      mx = std::max(mx, s);
    }
    double sum = 0;
    for (double l : logit) sum += std::exp(l - mx);
    ref_lp[r] = logit[targets[r]] - mx - std::log(sum);
    ref_loss -= ref_lp[r];
  }
  ref_loss /= rows;
  for (std::int64_t chunk : {100, 256, 1003, 5000}) {
    CAPTURE(chunk);
    zo2::gpu::DeviceBuffer<double> dloss(1);
    zo2::gpu::DeviceBuffer<float> dlp(rows);
    poison(dlp.data(), dlp.size());
    poison(dloss.data(), 1);
    zo2::gpu::cross_entropy_loss<T>(gemm, df.data(), de.data(), dt.data(), rows, width, vocab, chunk, scratch, dloss.data(),
                                dlp.data(), nullptr);
    const double loss = download(dloss.data(), 1)[0];
    const auto lp = download(dlp.data(), rows);
    // Logits are fp32 products of the T inputs: the error is fp32 accumulation alone.
    CHECK(loss == doctest::Approx(ref_loss).epsilon(1e-5));
    CHECK(rel_error(lp, ref_lp) <= 1e-5);
  }
}

// ---- the whole model on Hugging Face fixtures ---------------------------------------------------

namespace {

using namespace zo2_test::opt_fixtures;
using HostBatch = Expected::Batch;

struct LogitErrors {
  double max_abs = 0, rel = 0;
  bool finite = true;
};

/// Over positions with mask 1 (or all): max |ours - HF| and ||ours - HF|| / ||HF||.
LogitErrors logit_errors(const std::vector<float>& ours, const std::vector<float>& hf, const HostBatch& batch,
                         std::size_t vocab, bool include_padding = false) {
  REQUIRE(ours.size() == hf.size());
  LogitErrors e;
  double num = 0, den = 0;
  for (std::size_t t = 0; t < batch.batch * batch.seq; ++t) {
    if (!include_padding && !batch.attention_mask.empty() && batch.attention_mask[t] == 0) continue;
    for (std::size_t v = 0; v < vocab; ++v) {
      const double o = ours[t * vocab + v], r = hf[t * vocab + v];
      if (!std::isfinite(o)) e.finite = false;
      e.max_abs = std::max(e.max_abs, std::abs(o - r));
      num += (o - r) * (o - r);
      den += r * r;
    }
  }
  e.rel = std::sqrt(num / den);
  return e;
}

template <class T>
struct CudaFixture {
  opt::OPTConfig config;
  ParameterStore<T> store;
  zo2::gpu::Stream stream;
  zo2::gpu::CudaResident<T, T> policy;
  opt::OPTCudaModel<T> model;

  CudaFixture(opt::LoadedCheckpoint<T> loaded, opt::OPTCudaOptions options = {})
      : config(loaded.config), store(std::move(loaded.store)), policy(store, stream.get()),
        model(config, stream.get(), options) {}

  typename opt::OPTCudaModel<T>::Params params() {
    const ModelLayout& ml = policy.model_layout();
    typename opt::OPTCudaModel<T>::Params p{policy.current(ml.prologue()), {}, policy.current(ml.epilogue())};
    for (std::size_t i = 0; i < ml.num_blocks(); ++i) p.blocks.push_back(policy.current(ml.block(i)));
    return p;
  }
};

template <class T>
void check_fixture(const std::string& name, double logit_tol, bool relative, double loss_tol,
                   opt::OPTCudaOptions options = {}) {
  CAPTURE(name);
  CAPTURE(zo2::gpu::type_name<T>());
  CudaFixture<T> f(opt::load_opt_checkpoint<T>(fixture(name)), options);
  const Expected x = read_expected(name);
  const auto vocab = static_cast<std::size_t>(f.config.vocab_size);
  typename opt::OPTCudaModel<T>::Workspace ws;
  const auto params = f.params();

  const auto batch = f.model.make_batch(x.batch);
  const auto logits = f.model.logits(params, batch, ws);
  const LogitErrors e = logit_errors(logits, x.logits, x.batch, vocab);
  const LogitErrors all = logit_errors(logits, x.logits, x.batch, vocab, true);
  CHECK(e.finite);
  CHECK(all.finite);  // padded query rows included: no NaN from fully masked rows
  CHECK((relative ? e.rel : e.max_abs) <= logit_tol);
  const double loss = f.model.loss(params, batch, ws);
  CHECK(std::abs(loss - x.loss) / x.loss <= loss_tol);
  MESSAGE(name << " " << std::string(zo2::gpu::type_name<T>()) << ": logits max|d| " << e.max_abs << " rel " << e.rel
               << " (padding included: max|d| " << all.max_abs << "), loss " << loss << " vs HF " << x.loss
               << " rel " << std::abs(loss - x.loss) / x.loss);

  const auto unpadded = f.model.make_batch(x.unpadded);
  const auto logits1 = f.model.logits(params, unpadded, ws);
  const LogitErrors e1 = logit_errors(logits1, x.logits_unpadded, x.unpadded, vocab);
  CHECK((relative ? e1.rel : e1.max_abs) <= logit_tol);
  const double loss1 = f.model.loss(params, unpadded, ws);
  CHECK(std::abs(loss1 - x.loss_unpadded) / x.loss_unpadded <= loss_tol);

  // Candidate scoring: prompt + candidate per row (right padding), labels on candidate tokens.
  HostBatch cb;
  std::size_t longest = 0;
  for (const auto& c : x.candidates) longest = std::max(longest, c.size());
  cb.batch = x.candidates.size();
  cb.seq = x.prompt.size() + longest;
  cb.input_ids.assign(cb.batch * cb.seq, 1);
  cb.attention_mask.assign(cb.batch * cb.seq, 0);
  cb.labels.assign(cb.batch * cb.seq, -100);
  for (std::size_t c = 0; c < cb.batch; ++c) {
    for (std::size_t s = 0; s < x.prompt.size() + x.candidates[c].size(); ++s) {
      const std::int32_t id = s < x.prompt.size() ? x.prompt[s] : x.candidates[c][s - x.prompt.size()];
      cb.input_ids[c * cb.seq + s] = id;
      cb.attention_mask[c * cb.seq + s] = 1;
      if (s >= x.prompt.size()) cb.labels[c * cb.seq + s] = id;
    }
  }
  const auto cbatch = f.model.make_batch(cb);
  const auto lp = f.model.label_log_probs(params, cbatch, ws);
  std::size_t r = 0;
  for (std::size_t c = 0; c < x.candidates.size(); ++c) {
    double score = 0;
    for (std::size_t k = 0; k < x.candidates[c].size(); ++k) score += lp.at(r++);
    CAPTURE(c);
    CHECK(std::abs(score - x.candidate_scores[c]) <= loss_tol * std::abs(x.candidate_scores[c]) + 1e-5);
  }
  CHECK(r == lp.size());
}

}  // namespace

TEST_CASE("OPTCudaModel fp32 matches HF transformers: logits (<= 1e-4 abs), loss, candidate scores" *
          doctest::skip(!kHaveDevice)) {
  opt::OPTCudaOptions small_chunks;
  small_chunks.vocab_chunk = 100;  // 384-token vocabulary: four chunks, the last partial
  for (const char* name : {"opt_preln", "opt_postln_proj", "opt_nobias_bf16"}) {
    check_fixture<float>(name, 1e-4, false, 1e-5, small_chunks);
    check_fixture<float>(name, 1e-4, false, 1e-5);  // one chunk
  }
  opt::OPTCudaOptions unfused;
  unfused.fused_qkv = false;
  check_fixture<float>("opt_preln", 1e-4, false, 1e-5, unfused);
}

TEST_CASE("OPTCudaModel bf16 and fp16 match HF transformers within 2e-2 relative" * doctest::skip(!kHaveDevice)) {
  for (const char* name : {"opt_preln", "opt_postln_proj", "opt_nobias_bf16"}) {
    check_fixture<bfloat16>(name, 2e-2, true, 2e-2);
    check_fixture<float16>(name, 2e-2, true, 2e-2);
  }
}

TEST_CASE("OPTCudaModel and the CPU OPTModel agree on the loss of the same weights; MeZO steps agree" *
          doctest::skip(!kHaveDevice)) {
  for (const char* name : {"opt_preln", "opt_postln_proj"}) {
    CAPTURE(name);
    auto loaded = opt::load_opt_checkpoint<float>(fixture(name));
    const opt::OPTModel<float> cpu_model(loaded.config);
    const Expected x = read_expected(name);
    opt::OPTModel<float>::Batch cpu_batch{x.batch.batch, x.batch.seq, x.batch.input_ids, x.batch.attention_mask,
                                          x.batch.labels};
    opt::OPTModel<float>::Workspace cpu_ws;
    const double cpu_loss = cpu_model.loss(opt::param_set(loaded.store), cpu_batch, cpu_ws);

    CudaFixture<float> f(opt::load_opt_checkpoint<float>(fixture(name)));
    typename opt::OPTCudaModel<float>::Workspace ws;
    const auto batch = f.model.make_batch(cpu_batch);  // the CPU batch type uploads as is
    const double gpu_loss = f.model.loss(f.params(), batch, ws);
    CHECK(std::abs(gpu_loss - cpu_loss) <= 1e-5 * cpu_loss);

    // Three MeZO steps, CPU Resident vs CUDA Resident, same seed: same losses, same g.
    ZOConfig zc;
    zc.lr = 1e-3, zc.eps = 1e-2, zc.weight_decay = 0.1, zc.seed = 42;
    ParameterStore<float> cpu_store = loaded.store;
    Resident<float, float> cpu_policy(cpu_store);
    ZOOptimizer<opt::OPTModel<float>, Resident<float, float>> cpu_opt(cpu_model, cpu_policy, zc);
    ZOOptimizer<opt::OPTCudaModel<float>, zo2::gpu::CudaResident<float, float>> gpu_opt(f.model, f.policy, zc);
    for (int s = 0; s < 3; ++s) {
      CAPTURE(s);
      const StepResult a = cpu_opt.step(cpu_batch);
      const StepResult b = gpu_opt.step(batch);
      CHECK(b.loss_plus == doctest::Approx(a.loss_plus).epsilon(1e-5));
      CHECK(b.loss_minus == doctest::Approx(a.loss_minus).epsilon(1e-5));
      // g divides a loss difference of ~1e-3 by 2 eps: fp32 rounding of the losses shows.
      CHECK(b.projected_grad == doctest::Approx(a.projected_grad).epsilon(2e-2));
    }
  }
}
