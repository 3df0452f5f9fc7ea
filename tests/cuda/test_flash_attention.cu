// The fused causal attention (flash_attention.cuh) against a float64 reference of HF's eager
// attention (causal + padding mask, flat average of V for query rows that see no key) and
// against the materialized path (attention.cuh), on random data: bf16 and fp16, head_dim 64 and
// 128, sequence lengths below, at and across the 64-row tile (1, 37, 64, 130, 200, 257), left
// padding spanning whole tiles, a masked key inside a sequence, a fully padded sequence.
// Outputs are poisoned before every run. Last, a timing of both paths at OPT's shapes (seq 2048).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/flash_attention.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/zo2.hpp>

#include "../support/attention_reference.hpp"
#include "../support/cuda_test_data.cuh"

using namespace zo2_test::cuda_data;
using zo2_test::attention_reference;

using namespace zo2;

namespace {

const bool kHaveDevice = [] {
  const bool ok = zo2::cuda::device_available();
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

using zo2::cuda::FlashKernel;

/// Both kernels where the build and the device have wgmma (sm_90a on Hopper), else mma.sync alone.
std::vector<FlashKernel> flash_kernels() {
  if (zo2::cuda::flash_wgmma_available()) return {FlashKernel::kMmaSync, FlashKernel::kWgmma};
  std::printf("SKIPPED: the wgmma flash kernel (needs a Hopper GPU and a build for sm_90a): mma.sync only\n");
  return {FlashKernel::kMmaSync};
}

template <class T>
void check_cases() {
  const std::vector<FlashKernel> kernels = flash_kernels();
  std::mt19937 rng(2026 + sizeof(T) + (std::is_same_v<T, bfloat16> ? 100 : 0));
  zo2::cuda::Gemm gemm;
  zo2::cuda::AttentionScratch<T> scratch;
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
    zo2::cuda::DeviceBuffer<T> flash(n), materialized(n);
    ZO2_CUDA_CHECK(cudaMemset(materialized.data(), 0xff, n * sizeof(T)));
    REQUIRE(zo2::cuda::flash_attention_supported<T>(c.hd, c.seq, c.heads, c.batch, dq.data(), dk.data(), dv.data(),
                                                    flash.data()));
    const std::uint8_t* mask_ptr = c.padding ? dm.data() : nullptr;
    zo2::cuda::causal_attention<T>(gemm, dq.data(), dk.data(), dv.data(), mask_ptr, materialized.data(), c.batch,
                                   c.seq, c.heads, c.hd, scratch, nullptr);
    const auto old = download(materialized.data(), n);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v), mask, c.batch, c.seq, c.heads, c.hd);
    const double err_old = rel_error(old, ref);
    for (const FlashKernel kernel : kernels) {
      CAPTURE(zo2::cuda::flash_kernel_name(kernel));
      ZO2_CUDA_CHECK(cudaMemset(flash.data(), 0xff, n * sizeof(T)));  // NaN patterns: unwritten fails
      zo2::cuda::flash_causal_attention<T>(dq.data(), dk.data(), dv.data(), mask_ptr, flash.data(), c.batch, c.seq,
                                           c.heads, c.hd, nullptr, kernel);
      ZO2_CUDA_CHECK(cudaGetLastError());
      const auto out = download(flash.data(), n);
      const double err = rel_error(out, ref), err_vs_old = rel_error(out, as_double(old));
      const double max_abs = max_abs_error(out, ref);
      MESSAGE(zo2::cuda::type_name<T>() << " " << zo2::cuda::flash_kernel_name(kernel) << " b" << c.batch
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
  zo2::cuda::Gemm gemm;
  {
    zo2::cuda::AttentionScratch<float> scratch;
    const Case c{2, 70, 2, 64, 1.0, 1};
    const std::int64_t n = c.batch * c.seq * c.heads * c.hd;
    const auto q = random_values<float>(n, rng, 1.0), k = random_values<float>(n, rng, 1.0);
    const auto v = random_values<float>(n, rng, 1.0);
    const auto mask = make_mask(c, rng);
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::cuda::DeviceBuffer<float> out(n);
    ZO2_CUDA_CHECK(cudaMemset(out.data(), 0xff, n * sizeof(float)));
    const bool fused = zo2::cuda::causal_attention_dispatch<float>(gemm, dq.data(), dk.data(), dv.data(), dm.data(),
                                                                   out.data(), c.batch, c.seq, c.heads, c.hd, scratch,
                                                                   nullptr);
    CHECK(!fused);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v),
                                         mask, c.batch, c.seq, c.heads, c.hd);
    CHECK(rel_error(download(out.data(), n), ref) <= 1e-5);
  }
  {
    zo2::cuda::AttentionScratch<bfloat16> scratch;
    const Case c{1, 45, 3, 32, 1.0, 1};
    const std::int64_t n = c.batch * c.seq * c.heads * c.hd;
    const auto q = random_values<bfloat16>(n, rng, 1.0), k = random_values<bfloat16>(n, rng, 1.0);
    const auto v = random_values<bfloat16>(n, rng, 1.0);
    const auto mask = make_mask(c, rng);
    auto dq = upload(q), dk = upload(k), dv = upload(v);
    auto dm = upload(mask);
    zo2::cuda::DeviceBuffer<bfloat16> out(n);
    ZO2_CUDA_CHECK(cudaMemset(out.data(), 0xff, n * sizeof(bfloat16)));
    const bool fused = zo2::cuda::causal_attention_dispatch<bfloat16>(gemm, dq.data(), dk.data(), dv.data(), dm.data(),
                                                                      out.data(), c.batch, c.seq, c.heads, c.hd,
                                                                      scratch, nullptr);
    CHECK(!fused);
    const auto ref = attention_reference(as_double(q), as_double(k), as_double(v), mask, c.batch, c.seq, c.heads, c.hd);
    CHECK(rel_error(download(out.data(), n), ref) <= 3e-2);
  }
  CHECK_THROWS_AS(zo2::cuda::flash_causal_attention<bfloat16>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 8, 1, 96,
                                                              nullptr),
                  ShapeError);
}

// Timing lives in the benchmark: zo2_bench --extras prints flash vs materialized at OPT's shapes.
