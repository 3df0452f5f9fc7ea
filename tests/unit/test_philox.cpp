// Philox4x32-10 against Random123's published known-answer vectors, and the statistics of the
// normals built from it.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <zo2/core/philox.hpp>

using zo2::Philox4x32;

TEST_CASE("philox4x32-10 reproduces Random123's known-answer vectors") {
  struct Kat {
    Philox4x32 ctr;
    std::uint32_t k0, k1;
    Philox4x32 expected;
  };
  // Random123 kat_vectors: "philox4x32 10 CTR[4] KEY[2] EXPECTED[4]".
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
      {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}}, 0xffffffff, 0xffffffff,
       {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
      {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}, 0xa4093822, 0x299f31d0,
       {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
  };
  for (const Kat& k : kats) {
    const Philox4x32 out = zo2::philox4x32_10(k.ctr, k.k0, k.k1);
    for (int i = 0; i < 4; ++i) CHECK(out.v[i] == k.expected.v[i]);
  }
}

TEST_CASE("philox_words lays the counter out as documented") {
  const std::uint64_t seed = 0x0123456789abcdefULL, quad = 0x0000000500000007ULL;
  const Philox4x32 a = zo2::philox_words(seed, 42, 17, quad);
  const Philox4x32 b = zo2::philox4x32_10(Philox4x32{{7, 5, 17, 42}}, 0x89abcdef, 0x01234567);
  for (int i = 0; i < 4; ++i) CHECK(a.v[i] == b.v[i]);
}

TEST_CASE("rounding bits: 16 per element, eight elements per call of the rounding stream") {
  const std::uint64_t seed = 0x0123456789abcdefULL;
  const std::uint32_t step = 42, tensor = 17;
  // Element j: half j % 2 of word (j / 2) % 4 at counter j / 8, stream tensor | kRoundingStream.
  for (std::uint64_t j : {0ull, 1ull, 6ull, 7ull, 8ull, 13ull, 0x0000000500000007ull * 8 + 5}) {
    CAPTURE(j);
    const Philox4x32 w = zo2::philox4x32_10(
        Philox4x32{{static_cast<std::uint32_t>(j / 8), static_cast<std::uint32_t>(j / 8 >> 32),
                    tensor | zo2::kRoundingStream, step}},
        0x89abcdef, 0x01234567);
    const std::uint32_t want = (w.v[(j / 2) % 4] >> (16 * (j % 2))) & 0xffffu;
    CHECK(zo2::rounding_bits_at(seed, step, tensor, j) == want);
    CHECK(zo2::rounding_bits(zo2::rounding_words(seed, step, tensor, j / 8), j % 8) == want);
  }
  // All 16 bits vary, the two halves of a word independently: means of 2^15 - 0.5 over 10^5
  // elements, and each bit set half the time.
  const std::size_t n = 100000;
  double mean = 0;
  std::size_t set[16] = {};
  for (std::size_t j = 0; j < n; ++j) {
    const std::uint32_t b = zo2::rounding_bits_at(7, 3, 2, j);
    REQUIRE(b <= 0xffffu);
    mean += b;
    for (int i = 0; i < 16; ++i) set[i] += (b >> i) & 1u;
  }
  mean /= n;
  CHECK(std::abs(mean - 32767.5) < 5 * 18918.6 / std::sqrt(static_cast<double>(n)));  // sd of U{0..65535}
  for (int i = 0; i < 16; ++i) CHECK(std::abs(static_cast<double>(set[i]) / n - 0.5) < 0.01);
}

TEST_CASE("normals over 10^6 draws: mean, variance, tails and Kolmogorov-Smirnov") {
  const std::size_t n = 1'000'000;
  std::vector<double> z(n);
  for (std::size_t j = 0; j < n; ++j) z[j] = zo2::normal_at(1234, 7, 3, j);
  double mean = 0, m2 = 0, m4 = 0;
  for (double v : z) mean += v;
  mean /= n;
  for (double v : z) {
    m2 += (v - mean) * (v - mean);
    m4 += std::pow(v - mean, 4);
  }
  const double var = m2 / n, kurt = m4 / n / (var * var);
  // Standard errors: mean 1e-3, variance sqrt(2/n) = 1.4e-3, kurtosis sqrt(24/n) = 4.9e-3.
  CHECK(std::abs(mean) < 5e-3);
  CHECK(std::abs(var - 1.0) < 7e-3);
  CHECK(std::abs(kurt - 3.0) < 2.5e-2);

  std::sort(z.begin(), z.end());
  double d = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const double cdf = 0.5 * std::erfc(-z[j] / std::sqrt(2.0));
    d = std::max({d, std::abs(cdf - double(j) / n), std::abs(cdf - double(j + 1) / n)});
  }
  // KS critical value at alpha = 0.001 is 1.95 / sqrt(n).
  CHECK(d < 1.95 / std::sqrt(double(n)));
  CHECK(std::isfinite(z.front()));
  CHECK(std::isfinite(z.back()));
  CHECK(z.back() > 4.0);  // tails exist: P(max of 1e6 < 4) ~ e^-32
}

TEST_CASE("the same element drawn in any order, from any quad, gives the same value") {
  std::vector<float> forward(1000), backward(1000);
  for (std::size_t j = 0; j < 1000; ++j) forward[j] = zo2::normal_at(99, 5, 11, j);
  for (std::size_t j = 1000; j-- > 0;) backward[j] = zo2::normal_at(99, 5, 11, j);
  CHECK(forward == backward);
  const zo2::Normal4 q = zo2::normal4(99, 5, 11, 10);
  for (int k = 0; k < 4; ++k) CHECK(q.z[k] == forward[40 + k]);
  // Different tensor, step or seed give different noise.
  CHECK(zo2::normal_at(99, 5, 12, 0) != forward[0]);
  CHECK(zo2::normal_at(99, 6, 11, 0) != forward[0]);
  CHECK(zo2::normal_at(98, 5, 11, 0) != forward[0]);
}

TEST_CASE("box_muller stays finite at the extremes of its inputs") {
  float z0, z1;
  for (std::uint32_t a : {0u, 1u, 0x7fffffffu, 0xfffffffeu, 0xffffffffu})
    for (std::uint32_t b : {0u, 0x40000000u, 0xffffffffu}) {
      zo2::box_muller(a, b, z0, z1);
      CHECK(std::isfinite(z0));
      CHECK(std::isfinite(z1));
    }
  zo2::box_muller(0, 0, z0, z1);  // u1 = 2^-32: the largest radius, sqrt(2 ln 2^32) = 6.66
  CHECK(z0 == doctest::Approx(6.6604).epsilon(1e-4));
}
