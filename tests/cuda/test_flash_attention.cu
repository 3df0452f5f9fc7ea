// The fused causal attention (flash_attention.cuh) against a float64 reference of HF's eager
// attention (causal + padding mask, flat average of V for query rows that see no key) and
// against the materialized path (attention.cuh), on random data: bf16 and fp16, head_dim 64 and
// 128, sequence lengths below, at and across the 64-row tile (1, 37, 64, 130, 200, 257), left
// padding spanning whole tiles, a masked key inside a sequence, a fully padded sequence.
// Outputs are poisoned before every run. Then grouped-query attention (the LLaMA family): kv heads
// shared by groups of query heads (GQA, MQA), Q/K/V as column slices of one fused projection,
// an output row stride wider than its heads, sliding windows (skipped tiles, window edges inside a
// tile, rows whose window holds only padding), against a float64 reference of HF's eager
// attention, by both fused kernels and by the cuBLASLt path (fp32 too).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/flash_attention.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/zo2.hpp>

#include "../support/attention_reference.hpp"
#include "../support/cuda_test_data.cuh"
#include "../support/grouped_attention_reference.hpp"

using namespace zo2_test::cuda_data;
using zo2_test::attention_reference;

using namespace zo2;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::gpu::device_available();
  if (!ok) std::printf("SKIPPED: no CUDA device (test_flash_attention)\n");
  return ok;
}();

template <class T>
double max_abs_error(const std::vector<T>& out, const std::vector<double>& ref) {
  double m = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double o = static_cast<double>(to_float(out[i]));
    if (!std::isfinite(o)) return std::numeric_limits<double>::infinity();
    m = std::max(m, std::fabs(o - ref[i]));
  }
  return m;
}


struct Case {
  std::int64_t batch, seq, heads, hd;
  double qk_scale;  // std of q and k: larger spreads the softmax (exercises the running max)
  int padding;      // 0 none, 1 left padding (+ a masked key inside), 2 heavy: > one tile, and a sequence all padding
};

std::vector<std::uint8_t> make_mask(const Case& c, std::mt19937& rng) {
  std::vector<std::uint8_t> mask(c.batch * c.seq, 1);
  if (c.padding == 0) return mask;
  for (std::int64_t b = 0; b < c.batch; ++b) {
    std::int64_t pad = 0;
    if (c.padding == 1) pad = (b * 7) % std::max<std::int64_t>(c.seq, 1);
    else pad = b == c.batch - 1 ? c.seq : std::min<std::int64_t>(c.seq, 70 + 13 * b);  // last: all padding
    for (std::int64_t s = 0; s < pad; ++s) mask[b * c.seq + s] = 0;
    if (c.seq > pad + 3) mask[b * c.seq + pad + 1 + static_cast<std::int64_t>(rng() % (c.seq - pad - 2))] = 0;
  }
  return mask;
}

template <class T>
double tolerance() {
  return std::is_same_v<T, bfloat16> ? 1e-2 : 2e-3;
}

using zo2::gpu::FlashKernel;

/// Both kernels where the build and the device have wgmma (sm_90a on Hopper), else mma.sync alone.
std::vector<FlashKernel> flash_kernels() {
  if (zo2::gpu::flash_wgmma_available()) return {FlashKernel::kMmaSync, FlashKernel::kWgmma};
  std::printf("SKIPPED: the wgmma flash kernel (needs a Hopper GPU and a build for sm_90a): mma.sync only\n");
  return {FlashKernel::kMmaSync};
}

template <class T>
void check_cases() {
  const std::vector<FlashKernel> kernels = flash_kernels();
  std::mt19937 rng(2026 + sizeof(T) + (std::is_same_v<T, bfloat16> ? 100 : 0));
  zo2::gpu::Gemm gemm;
  zo2::gpu::AttentionScratch<T> scratch;
  const std::vector<Case> cases = {
      {1, 1, 2, 64, 1.0, 0},   {2, 37, 3, 64, 1.0, 1},  {1, 64, 2, 128, 1.0, 0}, {3, 130, 2, 64, 1.0, 2},
      {3, 130, 2, 128, 1.0, 2}, {2, 200, 2, 128, 2.0, 1}, {1, 257, 3, 64, 2.5, 1}, {2, 257, 2, 128, 1.0, 0},
      {2, 100, 4, 64, 1.0, 2},
  };
  for (const Case& c : cases) {
    CAPTURE(c.batch);
    CAPTURE(c.seq);
    CAPTURE(c.heads);
    CAPTURE(c.hd);
    CAPTURE(c.padding);
    const std::int64_t hidden = c.heads * c.hd, n = c.batch * c.seq * hidden;
    const auto q = random_values<T>(n, rng, c.qk_scale), k = random_values<T>(n, rng, c.qk_scale);
    const auto v = random_values<T>(n, rng, 1.0);
    const auto mask = make_mask(c, rng);
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::gpu::DeviceBuffer<T> flash(n), materialized(n);
    ZO2_CUDA_CHECK(cudaMemset(materialized.data(), 0xff, n * sizeof(T)));
    REQUIRE(zo2::gpu::flash_attention_supported<T>(c.hd, c.seq, c.heads, c.batch, dq.data(), dk.data(), dv.data(),
                                                    flash.data()));
    const std::uint8_t* mask_ptr = c.padding ? dm.data() : nullptr;
    zo2::gpu::causal_attention<T>(gemm, dq.data(), dk.data(), dv.data(), mask_ptr, materialized.data(), c.batch,
                                   c.seq, c.heads, c.hd, scratch, nullptr);
    const auto old = download(materialized.data(), n);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v), mask, c.batch, c.seq, c.heads, c.hd);
    const double err_old = rel_error(old, ref);
    for (const FlashKernel kernel : kernels) {
      CAPTURE(zo2::gpu::flash_kernel_name(kernel));
      ZO2_CUDA_CHECK(cudaMemset(flash.data(), 0xff, n * sizeof(T)));  // NaN patterns: unwritten fails
      zo2::gpu::flash_causal_attention<T>(dq.data(), dk.data(), dv.data(), mask_ptr, flash.data(), c.batch, c.seq,
                                           c.heads, c.hd, nullptr, kernel);
      ZO2_CUDA_CHECK(cudaGetLastError());
      const auto out = download(flash.data(), n);
      const double err = rel_error(out, ref), err_vs_old = rel_error(out, as_double(old));
      const double max_abs = max_abs_error(out, ref);
      MESSAGE(zo2::gpu::type_name<T>() << " " << zo2::gpu::flash_kernel_name(kernel) << " b" << c.batch
                                        << " s" << c.seq << " h" << c.heads << " d" << c.hd << " pad" << c.padding
                                        << ": flash vs f64 " << err << " (max abs " << max_abs
                                        << "), materialized vs f64 " << err_old << ", flash vs materialized "
                                        << err_vs_old);
      CHECK(err <= tolerance<T>());
      CHECK(max_abs <= 10 * tolerance<T>());
      CHECK(err_vs_old <= err_old + 2 * tolerance<T>());  // the materialized path rounds scores to T
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("flash_causal_attention vs float64 and vs the materialized path (padding, ragged tiles)" *
                       doctest::skip(!kHaveDevice),
                   T, zo2::bfloat16, zo2::float16) {
  check_cases<T>();
}

TEST_CASE("causal_attention_dispatch falls back for fp32 and other head dims, and matches float64" *
          doctest::skip(!kHaveDevice)) {
  std::mt19937 rng(5);
  zo2::gpu::Gemm gemm;
  {
    zo2::gpu::AttentionScratch<float> scratch;
    const Case c{2, 70, 2, 64, 1.0, 1};
    const std::int64_t n = c.batch * c.seq * c.heads * c.hd;
    const auto q = random_values<float>(n, rng, 1.0), k = random_values<float>(n, rng, 1.0);
    const auto v = random_values<float>(n, rng, 1.0);
    const auto mask = make_mask(c, rng);
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::gpu::DeviceBuffer<float> out(n);
    ZO2_CUDA_CHECK(cudaMemset(out.data(), 0xff, n * sizeof(float)));
    const bool fused = zo2::gpu::causal_attention_dispatch<float>(gemm, dq.data(), dk.data(), dv.data(), dm.data(),
                                                                   out.data(), c.batch, c.seq, c.heads, c.hd, scratch,
                                                                   nullptr);
    CHECK(!fused);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v),
                                         mask, c.batch, c.seq, c.heads, c.hd);
    CHECK(rel_error(download(out.data(), n), ref) <= 1e-5);
  }
  {
    zo2::gpu::AttentionScratch<bfloat16> scratch;
    const Case c{1, 45, 3, 32, 1.0, 1};
    const std::int64_t n = c.batch * c.seq * c.heads * c.hd;
    const auto q = random_values<bfloat16>(n, rng, 1.0), k = random_values<bfloat16>(n, rng, 1.0);
    const auto v = random_values<bfloat16>(n, rng, 1.0);
    const auto mask = make_mask(c, rng);
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::gpu::DeviceBuffer<bfloat16> out(n);
    ZO2_CUDA_CHECK(cudaMemset(out.data(), 0xff, n * sizeof(bfloat16)));
    const bool fused = zo2::gpu::causal_attention_dispatch<bfloat16>(gemm, dq.data(), dk.data(), dv.data(), dm.data(),
                                                                      out.data(), c.batch, c.seq, c.heads, c.hd,
                                                                      scratch, nullptr);
    CHECK(!fused);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v), mask, c.batch, c.seq, c.heads, c.hd);
    CHECK(rel_error(download(out.data(), n), ref) <= 3e-2);
  }
  CHECK_THROWS_AS(zo2::gpu::flash_causal_attention<bfloat16>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 8, 1, 96,
                                                              nullptr),
                  ShapeError);
}

// ---- grouped-query attention with sliding windows ------------------------------------------------

namespace {

struct GqaCase {
  std::int64_t batch, seq, heads, kv_heads, hd, window;
  int padding;      // 0 none; 1 left padding + a hole; 2 > one tile of padding, last sequence all padding;
                    // 3 a run of padding longer than the window inside each sequence
  bool fused;       // q, k, v as column slices of one [tokens, (heads + 2 kv) hd] matrix
  bool wide_out;    // output rows 64 elements wider than the heads (the extra columns must stay as they were)
};

std::string describe(const GqaCase& c) {
  return "b" + std::to_string(c.batch) + " s" + std::to_string(c.seq) + " h" + std::to_string(c.heads) + "/" +
         std::to_string(c.kv_heads) + " d" + std::to_string(c.hd) + " w" + std::to_string(c.window) + " pad" +
         std::to_string(c.padding) + (c.fused ? " fused" : "") + (c.wide_out ? " wide" : "");
}

std::vector<std::uint8_t> make_gqa_mask(const GqaCase& c, std::mt19937& rng) {
  std::vector<std::uint8_t> mask(c.batch * c.seq, 1);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    std::uint8_t* m = mask.data() + b * c.seq;
    if (c.padding == 1 || c.padding == 2) {
      const std::int64_t pad = c.padding == 1 ? (b * 7) % c.seq
                               : b == c.batch - 1 ? c.seq
                                                  : std::min<std::int64_t>(c.seq, 70 + 13 * b);
      for (std::int64_t s = 0; s < pad; ++s) m[s] = 0;
      if (c.seq > pad + 3) m[pad + 1 + static_cast<std::int64_t>(rng() % (c.seq - pad - 2))] = 0;
    } else if (c.padding == 3) {
      const std::int64_t run = std::max<std::int64_t>(c.window, 1) + 11, start = std::min(c.seq / 3 + b, c.seq);
      for (std::int64_t s = start; s < std::min(c.seq, start + run); ++s) m[s] = 0;
    }
  }
  return mask;
}

/// Grouped attention by `run` (a fused kernel or the cuBLASLt path) against the float64 reference;
/// returns the relative error (infinity if an output is not finite or a column past the heads was
/// written).
template <class T, class Run>
double check_gqa(const GqaCase& c, std::mt19937& rng, Run&& run, const char* what) {
  const std::int64_t tokens = c.batch * c.seq, qw = c.heads * c.hd, kvw = c.kv_heads * c.hd;
  const std::int64_t ld_q = c.fused ? qw + 2 * kvw : qw, ld_kv = c.fused ? qw + 2 * kvw : kvw;
  const std::int64_t ld_out = qw + (c.wide_out ? 64 : 0);
  std::vector<T> q, k, v;
  std::vector<T> fused;
  if (c.fused) {
    fused = random_values<T>(tokens * ld_q, rng, 1.0);
  } else {
    q = random_values<T>(tokens * qw, rng, 1.0), k = random_values<T>(tokens * kvw, rng, 1.0);
    v = random_values<T>(tokens * kvw, rng, 1.0);
  }
  const auto mask = make_gqa_mask(c, rng);
  auto dm = upload(mask);
  zo2::gpu::DeviceBuffer<T> df, dq, dk, dv;
  const T *pq, *pk, *pv;
  std::vector<double> Q, K, V;
  if (c.fused) {
    df = upload(fused);
    pq = df.data(), pk = df.data() + qw, pv = df.data() + qw + kvw;
    Q = K = V = as_double(fused);
  } else {
    dq = upload(q), dk = upload(k), dv = upload(v);
    pq = dq.data(), pk = dk.data(), pv = dv.data();
    Q = as_double(q), K = as_double(k), V = as_double(v);
  }
  zo2::gpu::DeviceBuffer<T> out(tokens * ld_out);
  poison(out.data(), out.size());
  zo2::gpu::AttentionDims d;
  d.batch = c.batch, d.seq = c.seq, d.heads = c.heads, d.kv_heads = c.kv_heads, d.head_dim = c.hd;
  d.ld_q = ld_q, d.ld_kv = ld_kv, d.ld_out = ld_out, d.window = c.window;
  const std::uint8_t* mask_ptr = c.padding ? dm.data() : nullptr;
  run(pq, pk, pv, mask_ptr, out.data(), d);
  ZO2_CUDA_CHECK(cudaGetLastError());
  const auto got = download(out.data(), out.size());
  // The reference reads K and V from column 0 of their matrix: in the fused layout, from their slices.
  const std::vector<double> expected =
      c.fused ? zo2_test::grouped_attention_reference(Q, std::vector<double>(K.begin() + qw, K.end()),
                                                      std::vector<double>(V.begin() + qw + kvw, V.end()), mask, c.batch,
                                                      c.seq, c.heads, c.kv_heads, c.hd, c.window, ld_q, ld_kv)
              : zo2_test::grouped_attention_reference(Q, K, V, mask, c.batch, c.seq, c.heads, c.kv_heads, c.hd,
                                                      c.window, ld_q, ld_kv);
  std::vector<T> dense(tokens * qw);
  std::size_t touched = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < qw; ++j) dense[t * qw + j] = got[t * ld_out + j];
    for (std::int64_t j = qw; j < ld_out; ++j) {
      std::uint16_t bits[sizeof(T) / 2];
      std::memcpy(bits, &got[t * ld_out + j], sizeof(T));
      for (auto b : bits) touched += b != 0xffff;
    }
  }
  const double err = rel_error(dense, expected);
  MESSAGE(zo2::gpu::type_name<T>() << " " << what << " " << describe(c) << ": vs f64 " << err << " (max abs "
                                    << max_abs_error(dense, expected) << ")");
  CHECK(touched == 0);
  return touched ? std::numeric_limits<double>::infinity() : err;
}

const std::vector<GqaCase> kGqaCases = {
    {1, 1, 4, 2, 64, 0, 0, false, false},     {2, 37, 4, 2, 64, 0, 1, true, false},
    {2, 130, 4, 1, 128, 0, 2, false, true},   {1, 257, 8, 2, 128, 100, 0, true, false},
    {3, 200, 6, 2, 64, 64, 2, false, false},  {2, 300, 4, 4, 64, 37, 3, true, true},
    {2, 260, 6, 3, 128, 20, 3, false, false}, {1, 150, 2, 1, 64, 1, 1, false, false},
    {2, 129, 4, 2, 128, 500, 1, true, false},  // a window longer than the sequence: none at all
    {1, 450, 3, 1, 128, 130, 1, true, true},  // the wgmma block (192 rows) spans the window's edge
};

}  // namespace

TEST_CASE_TEMPLATE("flash_grouped_attention: GQA/MQA, fused Q/K/V strides, wide output, sliding windows vs float64" *
                       doctest::skip(!kHaveDevice),
                   T, zo2::bfloat16, zo2::float16) {
  std::mt19937 rng(77 + sizeof(T));
  for (const FlashKernel kernel : flash_kernels()) {
    CAPTURE(zo2::gpu::flash_kernel_name(kernel));
    for (const GqaCase& c : kGqaCases) {
      CAPTURE(describe(c));
      const double err = check_gqa<T>(
          c, rng,
          [&](const T* q, const T* k, const T* v, const std::uint8_t* m, T* out, const zo2::gpu::AttentionDims& d) {
            REQUIRE(zo2::gpu::flash_attention_supported<T>(d.resolved(), q, k, v, out));
            zo2::gpu::flash_grouped_attention<T>(q, k, v, m, out, d, nullptr, kernel);
          },
          zo2::gpu::flash_kernel_name(kernel));
      CHECK(err <= tolerance<T>());
    }
  }
}

TEST_CASE_TEMPLATE("grouped_causal_attention (cuBLASLt) on the same cases vs float64, fp32 included" *
                       doctest::skip(!kHaveDevice),
                   T, float, zo2::bfloat16, zo2::float16) {
  std::mt19937 rng(78 + sizeof(T));
  zo2::gpu::Gemm gemm;
  zo2::gpu::AttentionScratch<T> scratch;
  std::vector<GqaCase> cases = kGqaCases;
  cases.push_back({2, 90, 6, 2, 24, 10, 3, true, true});  // a head dim no fused kernel takes
  cases.push_back({2, 70, 4, 2, 16, 0, 1, false, false});
  for (const GqaCase& c : cases) {
    CAPTURE(describe(c));
    const double err = check_gqa<T>(
        c, rng,
        [&](const T* q, const T* k, const T* v, const std::uint8_t* m, T* out, const zo2::gpu::AttentionDims& d) {
          const bool fused = zo2::gpu::grouped_attention_dispatch<T>(gemm, q, k, v, m, out, d, scratch, nullptr,
                                                                      /*use_flash=*/false);
          CHECK_FALSE(fused);
        },
        "cuBLASLt");
    CHECK(err <= (std::is_same_v<T, float> ? 1e-5 : 3 * (std::is_same_v<T, bfloat16> ? 1e-2 : 2e-3)));
  }
}

TEST_CASE("OPT's attention through the grouped entry points is the same kernels, bit for bit" *
          doctest::skip(!kHaveDevice)) {
  std::mt19937 rng(79);
  zo2::gpu::Gemm gemm;
  zo2::gpu::AttentionScratch<bfloat16> scratch;
  const Case c{2, 130, 3, 64, 1.0, 1};
  const std::int64_t n = c.batch * c.seq * c.heads * c.hd;
  const auto q = random_values<bfloat16>(n, rng), k = random_values<bfloat16>(n, rng), v = random_values<bfloat16>(n, rng);
  const auto mask = make_mask(c, rng);
  auto dq = upload(q), dk = upload(k), dv = upload(v);
  auto dm = upload(mask);
  zo2::gpu::DeviceBuffer<bfloat16> a(n), b(n);
  zo2::gpu::AttentionDims d;
  d.batch = c.batch, d.seq = c.seq, d.heads = c.heads, d.kv_heads = c.heads, d.head_dim = c.hd;
  for (const FlashKernel kernel : flash_kernels()) {
    poison(a.data(), n), poison(b.data(), n);
    zo2::gpu::flash_causal_attention<bfloat16>(dq.data(), dk.data(), dv.data(), dm.data(), a.data(), c.batch, c.seq,
                                                c.heads, c.hd, nullptr, kernel);
    zo2::gpu::flash_grouped_attention<bfloat16>(dq.data(), dk.data(), dv.data(), dm.data(), b.data(), d, nullptr,
                                                 kernel);
    const auto x = download(a.data(), n), y = download(b.data(), n);
    CHECK(std::memcmp(x.data(), y.data(), n * sizeof(bfloat16)) == 0);
  }
  poison(a.data(), n), poison(b.data(), n);
  zo2::gpu::causal_attention<bfloat16>(gemm, dq.data(), dk.data(), dv.data(), dm.data(), a.data(), c.batch, c.seq,
                                        c.heads, c.hd, scratch, nullptr);
  zo2::gpu::grouped_causal_attention<bfloat16>(gemm, dq.data(), dk.data(), dv.data(), dm.data(), b.data(), d, scratch,
                                                nullptr);
  const auto x = download(a.data(), n), y = download(b.data(), n);
  CHECK(std::memcmp(x.data(), y.data(), n * sizeof(bfloat16)) == 0);
  // Bad shapes name the problem.
  d.kv_heads = 2;
  CHECK_THROWS_WITH_AS(zo2::gpu::grouped_causal_attention<bfloat16>(gemm, dq.data(), dk.data(), dv.data(), nullptr,
                                                                     b.data(), d, scratch, nullptr),
                       doctest::Contains("multiple of kv_heads"), ShapeError);
}

// Timing lives in the benchmark: zo2_bench --extras prints flash vs materialized at OPT's shapes.
