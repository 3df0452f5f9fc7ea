// The CPU perturber against float64 formulas, and the 16-bit rounding behaviour it relies on.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <zo2/zo2.hpp>

using namespace zo2;

namespace {
std::vector<double> random_values(std::size_t n, unsigned seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
}  // namespace

TEST_CASE_TEMPLATE("update matches theta - lr (g z + wd theta) computed in double", S, float, double) {
  const std::size_t n = 1001;  // not a multiple of 4: the last quad is partial
  const auto init = random_values(n, 1);
  std::vector<S> theta(init.begin(), init.end());
  const NoiseId id{77, 3, 9};
  const UpdateCoeffs u{1e-2, 3.5, 0.1};
  cpu::Perturber<S>::update(theta.data(), n, id, u);
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-14;
  for (std::size_t j = 0; j < n; ++j) {
    const double t0 = static_cast<double>(static_cast<S>(init[j]));
    const double z = normal_at(77, 3, 9, j);
    const double expected = t0 - 1e-2 * (3.5 * z + 0.1 * t0);
    REQUIRE(static_cast<double>(theta[j]) == doctest::Approx(expected).epsilon(tol).scale(1.0));
  }
}

TEST_CASE_TEMPLATE("add_scaled_noise in place and into a copy agree with theta + c z", S, float, double) {
  const std::size_t n = 257;
  const auto init = random_values(n, 2);
  std::vector<S> theta(init.begin(), init.end());
  std::vector<double> copy(n);
  const NoiseId id{5, 0, 1};
  cpu::Perturber<S>::add_scaled_noise_into(copy.data(), theta.data(), n, id, -0.25);
  cpu::Perturber<S>::add_scaled_noise(theta.data(), n, id, -0.25);
  for (std::size_t j = 0; j < n; ++j) {
    const double expected = static_cast<double>(static_cast<S>(init[j])) - 0.25 * normal_at(5, 0, 1, j);
    CHECK(copy[j] == doctest::Approx(expected).epsilon(1e-6));
    CHECK(static_cast<double>(theta[j]) == doctest::Approx(expected).epsilon(1e-6));
  }
}

TEST_CASE_TEMPLATE("the fused pass equals update followed by two perturbations, bit for bit", S, float,
                   double, bfloat16, float16) {
  const std::size_t n = 203;
  const auto init = random_values(n, 3, 0.05);
  std::vector<S> fused(n), separate(n);
  for (std::size_t j = 0; j < n; ++j) fused[j] = separate[j] = store_rounded<S>(static_cast<compute_t<S>>(init[j]), 0, false);
  const UpdateCoeffs u{1e-3, -2.0, 0.01};
  const NoiseId prev{11, 4, 2}, now{11, 5, 2};
  std::vector<float> plus(n), minus(n), plus2(n), minus2(n);
  cpu::Perturber<S>::update_and_perturb_into(fused.data(), plus.data(), minus.data(), n, &u, prev, now, 1e-3);
  cpu::Perturber<S>::update(separate.data(), n, prev, u);
  cpu::Perturber<S>::add_scaled_noise_into(plus2.data(), separate.data(), n, now, 1e-3);
  cpu::Perturber<S>::add_scaled_noise_into(minus2.data(), separate.data(), n, now, -1e-3);
  CHECK(std::memcmp(fused.data(), separate.data(), n * sizeof(S)) == 0);
  CHECK(plus == plus2);
  CHECK(minus == minus2);
  // Without an owed update the pass only perturbs.
  std::vector<S> untouched = separate;
  cpu::Perturber<S>::update_and_perturb_into(untouched.data(), plus.data(), minus.data(), n, nullptr, prev, now, 1e-3);
  CHECK(std::memcmp(untouched.data(), separate.data(), n * sizeof(S)) == 0);
  CHECK(plus == plus2);
}

TEST_CASE_TEMPLATE("a 16-bit update rounds with the documented rounding bits of each element", S, bfloat16,
                   float16) {
  const std::size_t n = 203;  // not a multiple of 8: the last octet is partial
  const auto init = random_values(n, 5, 0.05);
  std::vector<S> theta(n);
  for (std::size_t j = 0; j < n; ++j) theta[j] = store_rounded<S>(static_cast<float>(init[j]), 0, false);
  const std::vector<S> before = theta;
  const UpdateCoeffs u{1e-2, 3.0, 0.01};
  const NoiseId id{99, 7, 4};
  cpu::Perturber<S>::update(theta.data(), n, id, u);
  std::size_t moved = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const float pre = updated_value<S>(load(before[j]), normal_at(id.seed, id.step, id.tensor, j), u);
    const S want = store_rounded<S>(pre, rounding_bits_at(id.seed, id.step, id.tensor, j), true);
    CHECK(theta[j].bits == want.bits);
    moved += theta[j].bits != before[j].bits;
  }
  CHECK(moved > n / 2);  // the update is large enough to show in most elements
}

TEST_CASE("bf16: round-to-nearest loses a 1e-7 update, stochastic rounding keeps it on average") {
  // A weight of 0.02 has a bf16 ulp of 2^-13 = 1.2e-4; an update of 1e-7 is ~1e-3 ulp.
  const float w = 0.02f;
  const bfloat16 b = to_bfloat16(w);
  const float base = to_float(b);
  CHECK(to_float(to_bfloat16(base - 1e-7f)) == base);  // RNE: the update vanishes, every time

  // Stochastic rounding, over many independent random words, moves by 1e-7 on average.
  const std::size_t trials = 400000;
  double sum = 0;
  for (std::size_t i = 0; i < trials; ++i) {
    const std::uint32_t bits = philox_words(1, 0, 0, i).v[0];
    sum += to_float(to_bfloat16_stochastic(base - 1e-7f, bits));
  }
  const double mean_change = sum / trials - base;
  // Each trial is base or base - ulp with p ~ 1e-7/ulp... the mean's standard error:
  const double ulp = std::ldexp(1.0, -14);  // 0.02 lies in [2^-6, 2^-5): ulp below base is 2^-14
  const double p = 1e-7 / ulp;
  const double se = ulp * std::sqrt(p * (1 - p) / trials);
  CHECK(std::abs(mean_change + 1e-7) < 5 * se);

  // Over a long run of updates the drift accumulates with SR and is zero with RNE.
  std::vector<bfloat16> sr(1, b), rne(1, b);
  for (std::uint32_t t = 0; t < 20000; ++t) {
    const std::uint32_t bits = philox_words(2, t, 0, 0).v[0];
    sr[0] = to_bfloat16_stochastic(to_float(sr[0]) - 1e-7f, bits);
    rne[0] = to_bfloat16(to_float(rne[0]) - 1e-7f);
  }
  CHECK(to_float(rne[0]) == base);
  CHECK(to_float(sr[0]) == doctest::Approx(base - 20000 * 1e-7).epsilon(0.02));
}

TEST_CASE("bf16 and fp16 conversions against double references on random and special values") {
  std::mt19937 rng(4);
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isfinite(f)) continue;
    // bf16: nearest of the two neighbours (ties to even) in double.
    const float r = to_float(to_bfloat16(f));
    const std::uint32_t lo_bits = u & 0xffff0000u;
    float lo, hi;
    std::memcpy(&lo, &lo_bits, 4);
    const std::uint32_t hi_bits = lo_bits + 0x10000u;
    std::memcpy(&hi, &hi_bits, 4);
    const double dl = std::abs(double(f) - lo), dh = std::abs(double(hi) - f);
    if (std::isfinite(hi) && dl != dh) REQUIRE(r == (dl < dh ? lo : hi));
    // fp16, for values in its range: the error is at most half an ulp.
    const double a = std::abs(double(f));
    if (a < 65504.0 && a > 6.2e-5) {
      const double h = to_float(to_float16(f));
      const double ulp = std::ldexp(1.0, std::ilogb(a) - 10);
      REQUIRE(std::abs(h - f) <= 0.5 * ulp);
    }
  }
  CHECK(to_float(to_float16(1.0f)) == 1.0f);
  CHECK(to_float(to_float16(-2.5f)) == -2.5f);
  CHECK(to_float(to_float16(65504.0f)) == 65504.0f);
  CHECK(std::isinf(to_float(to_float16(1e6f))));
  CHECK(std::isnan(to_float(to_float16(NAN))));
  CHECK(std::isnan(to_float(to_bfloat16(NAN))));
  CHECK(to_float(to_float16(5.9604645e-8f)) == 5.9604645e-8f);  // the smallest subnormal
  CHECK(to_float(to_float16(1e-4f)) == doctest::Approx(1e-4).epsilon(1e-3));  // subnormal range
  CHECK(to_float(to_float16(2e-8f)) == 0.0f);  // below half the smallest subnormal
}
