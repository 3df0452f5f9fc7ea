// The offload codecs against float64: round-trip error bounds per codec, unbiasedness of
// stochastic rounding, per-row scales of awkward rows, and argument checking.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>

#include <zo2/core/philox.hpp>
#include <zo2/offload/codecs.hpp>

using namespace zo2;
using namespace zo2::offload;

namespace {

/// Random non-zero values over several orders of magnitude (as weights are: 1e-3 .. 1).
std::vector<double> random_values(std::size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> log_scale(-3.0, 0.0);
  std::vector<double> v(n);
  for (auto& x : v) {
    do x = normal(rng) * std::pow(10.0, log_scale(rng));
    while (x == 0.0);
  }
  return v;
}

std::vector<std::uint32_t> random_words(std::size_t n, std::uint32_t step) {
  std::vector<std::uint32_t> w(n);
  for (std::size_t j = 0; j < n; ++j) w[j] = rounding_bits_at(1234, step, 7, j);
  return w;
}

ParamLayout test_layout() {
  ParamLayout l;
  l.add("weight", {48, 37});  // rows of 37: not a multiple of 4 or 32
  l.add("bias", {48}, false);
  l.add("conv", {3, 4, 5});
  return l;
}

/// Encodes each tensor of a layout from float64 data, decodes, and returns max |err| / bound
/// where bound(j) is the codec's per-element guarantee.
template <class C, class Bound>
double worst_ratio(bool stochastic, Bound bound) {
  const ParamLayout layout = test_layout();
  const GroupCodec<C> codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  double worst = 0;
  for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
    const std::size_t n = layout.spec(r).numel();
    const auto ref = random_values(n, 10 + static_cast<unsigned>(r));
    std::vector<float> values(ref.begin(), ref.end());
    const auto words = stochastic ? random_words(n, static_cast<std::uint32_t>(r)) : std::vector<std::uint32_t>{};
    codec.encode(r, values, words, block);
    std::vector<float> out(n);
    codec.decode(r, block, out);
    const CodecTensor& t = codec.tensor(r);
    for (std::size_t row = 0; row < t.rows; ++row) {
      double absmax = 0;
      for (std::size_t k = 0; k < t.row_len; ++k) absmax = std::max(absmax, std::fabs(ref[row * t.row_len + k]));
      for (std::size_t k = 0; k < t.row_len; ++k) {
        const std::size_t j = row * t.row_len + k;
        worst = std::max(worst, std::fabs(static_cast<double>(out[j]) - ref[j]) / bound(ref[j], absmax));
      }
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("block sizes: payload at the layout's offsets, scales after it") {
  const ParamLayout layout = test_layout();
  CHECK(GroupCodec<Fp32Codec>(layout).bytes() == layout.total_elements() * 4);
  CHECK(GroupCodec<Bf16Codec>(layout).bytes() == layout.total_elements() * 2);
  CHECK(GroupCodec<Fp16Codec>(layout).bytes() == layout.total_elements() * 2);
  const GroupCodec<Int8RowCodec> int8(layout);
  CHECK(int8.total_rows() == 48 + 1 + 3);
  CHECK(int8.scales_offset() == (layout.total_elements() + 15) / 16 * 16);
  CHECK(int8.bytes() == int8.scales_offset() + (52 * 4 + 15) / 16 * 16);
  CHECK(int8.tensor(2).first_row == 49);
  CHECK(int8.tensor(2).row_len == 20);
}

TEST_CASE("round trip vs float64, round to nearest") {
  // float64 -> float costs 2^-24 relative; each format's half ulp comes on top.
  const auto rel = [](double e) { return [e](double v, double) { return std::fabs(v) * (e + 0x1p-24); }; };
  CHECK(worst_ratio<Fp32Codec>(false, rel(0)) <= 1.0);
  CHECK(worst_ratio<Bf16Codec>(false, rel(0x1p-8)) <= 1.0);  // 8 significant bits
  CHECK(worst_ratio<Fp16Codec>(false, [](double v, double) {
          // normal range: half ulp relative; below 2^-14 the subnormal spacing 2^-24 applies.
          return std::fabs(v) * (0x1p-11 + 0x1p-24) + 0x1p-25;
        }) <= 1.0);
  CHECK(worst_ratio<Int8RowCodec>(false, [](double, double absmax) { return absmax / Int8RowCodec::kEncodeCode * (0.5 + 1e-5); }) <= 1.0);
}

TEST_CASE("round trip vs float64, stochastic rounding: strictly within one step of the format") {
  const auto rel = [](double e) { return [e](double v, double) { return std::fabs(v) * (e + 0x1p-24); }; };
  CHECK(worst_ratio<Fp32Codec>(true, rel(0)) <= 1.0);
  CHECK(worst_ratio<Bf16Codec>(true, rel(0x1p-7)) < 1.0);
  CHECK(worst_ratio<Fp16Codec>(true, [](double v, double) { return std::fabs(v) * (0x1p-10 + 0x1p-24) + 0x1p-24; }) < 1.0);
  const double int8 = worst_ratio<Int8RowCodec>(true, [](double, double absmax) { return absmax / Int8RowCodec::kEncodeCode * (1 + 1e-5); });
  CHECK(int8 < 1.0);
  CHECK(int8 > 0.5);  // SR does move values by more than half a step: it is not round-to-nearest
}

TEST_CASE("int8 stochastic rounding is unbiased; round-to-nearest is not") {
  // One row with its absmax fixed at 1 (scale 1/124) and values at fractions of a step.
  ParamLayout layout;
  layout.add("w", {1, 64});
  const GroupCodec<Int8RowCodec> codec(layout);
  std::vector<double> ref(64);
  ref[0] = 1.0;
  for (std::size_t k = 1; k < 64; ++k) ref[k] = (static_cast<double>(k) - 31.7) / 127.0 * 0.93 + 0.0013;
  const std::vector<float> values(ref.begin(), ref.end());
  std::vector<double> sum(64, 0.0);
  std::vector<unsigned char> block(codec.bytes());
  std::vector<float> out(64);
  const int trials = 20000;
  for (int t = 0; t < trials; ++t) {
    codec.encode(0, values, random_words(64, static_cast<std::uint32_t>(t)), block);
    codec.decode(0, block, out);
    for (std::size_t k = 0; k < 64; ++k) sum[k] += out[k];
  }
  const double step = 1.0 / Int8RowCodec::kEncodeCode;
  double worst_sr = 0, worst_rne = 0;
  codec.encode(0, values, {}, block);
  codec.decode(0, block, out);
  for (std::size_t k = 0; k < 64; ++k) {
    // Standard error of the mean is at most step * 0.5 / sqrt(trials) = 0.0035 step.
    worst_sr = std::max(worst_sr, std::fabs(sum[k] / trials - ref[k]) / step);
    worst_rne = std::max(worst_rne, std::fabs(out[k] - ref[k]) / step);
  }
  CHECK(worst_sr < 0.02);
  CHECK(worst_rne > 0.3);
}

TEST_CASE("bf16 stochastic rounding keeps a sub-ulp difference on average") {
  ParamLayout layout;
  layout.add("w", {256});
  const GroupCodec<Bf16Codec> codec(layout);
  const float base = to_float(to_bfloat16(0.02f)), delta = 1e-7f;  // ~1e-3 of a bf16 ulp
  const std::vector<float> values(256, base + delta);
  std::vector<unsigned char> block(codec.bytes());
  std::vector<float> out(256);
  double mean = 0;
  const int trials = 400;
  for (int t = 0; t < trials; ++t) {
    codec.encode(0, values, random_words(256, static_cast<std::uint32_t>(t)), block);
    codec.decode(0, block, out);
    for (float v : out) mean += v;
  }
  mean /= trials * 256.0;
  const double exact = static_cast<double>(base + delta);
  const double ulp = 0x1p-13;
  // 102400 draws with p ~ 0.001 (values base or base + ulp): SE of the mean ~ ulp * 1e-4.
  CHECK(std::fabs(mean - exact) < ulp * 6e-4);
  codec.encode(0, values, {}, block);
  codec.decode(0, block, out);
  CHECK(out[0] == base);  // RNE loses the difference
}

TEST_CASE("int8 scales: all-equal rows, zero rows, tiny rows, subnormal rows") {
  ParamLayout layout;
  layout.add("w", {5, 33});
  const GroupCodec<Int8RowCodec> codec(layout);
  std::vector<float> values(5 * 33);
  for (std::size_t k = 0; k < 33; ++k) {
    values[0 * 33 + k] = 0.731f;                          // all equal, positive
    values[1 * 33 + k] = -2.5e3f;                         // all equal, negative
    values[2 * 33 + k] = 0.0f;                            // all zero
    values[3 * 33 + k] = 1e-30f * (1.0f + 0.01f * k);     // tiny, normal floats
    values[4 * 33 + k] = 3e-44f * static_cast<float>(k % 5);  // subnormal (absmax/127 underflows)
  }
  std::vector<unsigned char> block(codec.bytes());
  std::vector<float> out(values.size());
  for (int stochastic = 0; stochastic < 2; ++stochastic) {
    CAPTURE(stochastic);
    codec.encode(0, values, stochastic ? random_words(values.size(), 3) : std::vector<std::uint32_t>{}, block);
    codec.decode(0, block, out);
    const float* scales = reinterpret_cast<const float*>(block.data() + codec.scales_offset());
    for (std::size_t k = 0; k < 33; ++k) {
      CHECK(out[k] == doctest::Approx(0.731).epsilon(1e-6));  // code 124 * scale
      CHECK(out[33 + k] == doctest::Approx(-2.5e3).epsilon(1e-6));
      CHECK(out[66 + k] == 0.0f);
      CHECK(std::fabs(out[99 + k] - values[99 + k]) <= scales[3] * 1.0001f);
      CHECK(std::isfinite(out[132 + k]));
      CHECK(std::fabs(out[132 + k] - values[132 + k]) <= 2 * scales[4]);
    }
    CHECK(scales[2] == 0.0f);
    CHECK(scales[3] > 0.0f);
    CHECK(scales[4] > 0.0f);
  }
}

TEST_CASE("whole-group encode/decode, padding zeroed") {
  const ParamLayout layout = test_layout();
  const GroupCodec<Int8RowCodec> codec(layout);
  std::vector<float> flat(layout.total_elements(), 0.0f);
  const auto ref = random_values(flat.size(), 5);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    for (std::size_t j = 0; j < layout.spec(r).numel(); ++j) flat[layout.offset(r) + j] = static_cast<float>(ref[layout.offset(r) + j]);
  std::vector<unsigned char> block(codec.bytes(), 0xAB);
  codec.encode_group(flat, block);
  std::vector<float> back(flat.size(), 9.0f);
  codec.decode_group(block, back);
  for (std::size_t j = 0; j < flat.size(); ++j) CHECK(std::fabs(back[j] - flat[j]) <= 0.02f);
  // padding after 'weight' (48 * 37 = 1776 -> 1792) decodes to zero
  CHECK(back[1780] == 0.0f);
}

TEST_CASE("bad arguments throw with a message") {
  const ParamLayout layout = test_layout();
  const GroupCodec<Int8RowCodec> codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  std::vector<float> values(48 * 37, 1.0f);
  std::vector<unsigned char> small(codec.bytes() - 1);
  CHECK_THROWS_WITH_AS(codec.encode(0, values, {}, small), doctest::Contains("block buffer"), Error);
  CHECK_THROWS_WITH_AS(codec.encode(1, values, {}, block), doctest::Contains("expected 48"), Error);
  CHECK_THROWS_WITH_AS(codec.encode(7, values, {}, block), doctest::Contains("out of range"), Error);
  std::vector<std::uint32_t> words(5);
  CHECK_THROWS_WITH_AS(codec.encode(0, values, words, block), doctest::Contains("random words"), Error);
  values[40] = std::nanf("");
  CHECK_THROWS_WITH_AS(codec.encode(0, values, {}, block), doctest::Contains("non-finite"), Error);
  values[40] = INFINITY;
  CHECK_THROWS_AS(codec.encode(0, values, {}, block), Error);
  values[40] = 1.0f;
  values[47 * 37 + 36] = -INFINITY;  // the last element of the last row: past the sweep's 8 lanes
  CHECK_THROWS_WITH_AS(codec.encode(0, values, {}, block), doctest::Contains("row 47"), Error);
  std::vector<float> out(3);
  CHECK_THROWS_AS(codec.decode(0, block, out), Error);
  std::vector<float> flat(10);
  CHECK_THROWS_WITH_AS(codec.encode_group(flat, block), doctest::Contains("elements"), Error);
  const GroupCodec<Bf16Codec> bf16(layout);
  std::vector<float> ok(48 * 37, 1.0f);
  CHECK_THROWS_AS(bf16.encode(0, ok, {}, block), Error);  // an int8-sized buffer
}

TEST_CASE("int8 encode equals a plain transcription (fmax sweep, nearbyint) on rows of every length") {
  // The encoder's absmax sweep runs eight lanes and rounds without libm; this is the same
  // arithmetic written the obvious way, compared byte for byte (codes and scales).
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t len = 1; len <= 70; ++len) {
    ParamLayout layout;
    layout.add("w", {3, len});
    const GroupCodec<Int8RowCodec> codec(layout);
    std::vector<float> values(static_cast<std::size_t>(3 * len));
    for (auto& v : values) v = normal(rng) * (len % 3 == 0 ? 1e-3f : 1.0f);
    values[static_cast<std::size_t>(len) - 1] *= 40.0f;  // the first row's largest is its last element
    std::vector<unsigned char> block(codec.bytes());
    codec.encode(0, values, {}, block);
    std::vector<unsigned char> expected(codec.bytes(), 0);
    for (std::size_t row = 0; row < 3; ++row) {
      float absmax = 0.0f;
      for (std::int64_t k = 0; k < len; ++k) absmax = std::fmax(absmax, std::fabs(values[row * len + k]));
      const float scale = Int8RowCodec::scale_for(absmax);
      std::memcpy(expected.data() + codec.scales_offset() + row * sizeof(float), &scale, sizeof(float));
      for (std::int64_t k = 0; k < len; ++k) {
        const float q = std::clamp(std::nearbyint(values[row * len + k] / scale), -127.0f, 127.0f);
        expected[row * len + k] = static_cast<unsigned char>(static_cast<std::int8_t>(q));
      }
    }
    CHECK_MESSAGE(block == expected, "row length " << len);
  }
}

TEST_CASE("int8 codes and their rounding go half to even like nearbyint, at every half and at the fast path's limits") {
  std::vector<float> xs = {0.0f, -0.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, 126.5f, -126.5f, 127.5f, 1e6f + 0.5f,
                           4194303.5f, -4194303.5f, 4194304.0f, 4194304.5f, -4194304.5f, 8388607.5f, 3e38f, -3e38f,
                           INFINITY, -INFINITY, 1e-40f, -1e-40f, 0.49999997f, -0.49999997f};
  for (int k = -600; k <= 600; ++k) xs.push_back(static_cast<float>(k) * 0.25f);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> wide(-300.0f, 300.0f);
  for (int k = 0; k < 100000; ++k) xs.push_back(wide(rng));
  for (const float x : xs) {
    const float q = std::clamp(std::nearbyint(x), -127.0f, 127.0f);
    CHECK_MESSAGE(Int8RowCodec::code(x, 1.0f, 0u, false) == static_cast<std::int8_t>(q), "x = " << x);
    CHECK_MESSAGE(zo2::offload::detail::rint_f(x) == std::nearbyint(x), "x = " << x);  // -0 == 0: the sign may differ
  }
  CHECK(std::isnan(zo2::offload::detail::rint_f(NAN)));
  for (float x = 4194304.0f; x < 4194400.0f; x += 0.5f) {  // halves just above 2^22
    CHECK(zo2::offload::detail::rint_f(x) == std::nearbyint(x));
    CHECK(zo2::offload::detail::rint_f(-x) == std::nearbyint(-x));
  }
}

namespace {
/// Float bits, so that a value compares with its sign of zero and NaN payload.
std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
/// Whether StochasticRowEncoder gives code() and value() of (v, scale, bits), and declines
/// exactly when |v| or the scale lies outside [2^-60, 2^60]; `encoded` counts what it encoded.
bool encoder_agrees(float v, float scale, std::uint32_t bits, long& encoded) {
  const Int8RowCodec::StochasticRowEncoder encoder(scale);
  std::int8_t code = 0;
  float value = 0.0f;
  const auto in_range = [](float a) { return a >= 0x1p-60f && a <= 0x1p+60f; };
  const bool declines = !(in_range(std::fabs(v)) && in_range(scale));
  if (!encoder.accepts(v)) return declines;
  if (declines) return false;
  encoder.encode(v, bits, code, value);
  ++encoded;
  const std::int8_t want = Int8RowCodec::code(v, scale, bits, true);
  return code == want && bits_of(value) == bits_of(Int8RowCodec::value(want, scale));
}
}  // namespace

TEST_CASE("int8 StochasticRowEncoder: code() and value() of every element, or it declines") {
  long encoded = 0, checked = 0;
  std::mt19937_64 rng(21);
  std::uniform_real_distribution<double> exponent(-60.0, 60.0), ratio(-140.0, 140.0), unit(0.0, 1.0);
  // Rows as the int8 pass sees them: values up to a few codes past the scale's range, 16
  // random rounding bits (and the 16 bits above them, which code() ignores).
  for (int k = 0; k < 2'000'000; ++k) {
    const float scale = static_cast<float>(std::exp2(exponent(rng)));
    const float v = static_cast<float>(ratio(rng)) * scale;
    CHECK(encoder_agrees(v, scale, static_cast<std::uint32_t>(rng()), encoded));
    ++checked;
  }
  // Every scale mantissa at one exponent against values on and next to the code grid: the
  // quotient's rounding and the floor's integer boundaries.
  for (std::uint32_t m = 0; m < (1u << 23); m += 97) {
    float scale;
    const std::uint32_t u = 0x3b800000u | m;  // [2^-8, 2^-7)
    std::memcpy(&scale, &u, sizeof scale);
    const int c = static_cast<int>(m % 255) - 127;
    const float on_grid = static_cast<float>(c) * scale;
    for (const float v : {on_grid, std::nextafter(on_grid, 1e30f), std::nextafter(on_grid, -1e30f),
                          on_grid + 0.5f * scale, static_cast<float>(unit(rng)) * scale * 127.0f}) {
      for (const std::uint32_t bits : {0u, 1u, 0x8000u, 0xffffu, static_cast<std::uint32_t>(rng())}) {
        CHECK(encoder_agrees(v, scale, bits, encoded));
        ++checked;
      }
    }
  }
  // Every rounding word for a few values.
  for (const float v : {0.3f, -0.3f, 1.0f / 124.0f, 126.99f / 124.0f}) {
    for (std::uint32_t bits = 0; bits <= 0xffffu; ++bits) CHECK(encoder_agrees(v, 1.0f / 124.0f, bits, encoded));
    checked += 0x10000;
  }
  CHECK(encoded > checked * 95 / 100);  // declined: values 0 and the ends of the exponent range
  // It declines outside [2^-60, 2^60], where the caller's code() and value() decide.
  std::int8_t code = 0;
  float value = 0.0f;
  const Int8RowCodec::StochasticRowEncoder row(0.01f), zero_row(0.0f), tiny_row(1e-20f);
  for (const float v : {0.0f, -0.0f, 1e-19f, -1e-19f, 2e18f, INFINITY, -INFINITY, NAN}) CHECK_FALSE(row.accepts(v));
  CHECK_FALSE(zero_row.accepts(0.5f));
  CHECK_FALSE(tiny_row.accepts(1e-18f));
  REQUIRE(row.accepts(0.5f));
  row.encode(0.5f, 7, code, value);
  CHECK(code == 50);
}

TEST_CASE("int8 rescale after an update: sticky while the row fits, new when it overflows or shrinks") {
  const float s = 1.0f / 127;
  CHECK(Int8RowCodec::rescale(s, 1.0f) == s);
  CHECK(Int8RowCodec::rescale(s, 0.6f) == s);
  CHECK(Int8RowCodec::rescale(s, 1.01f) == Int8RowCodec::scale_for(1.01f));  // would clip
  CHECK(Int8RowCodec::rescale(s, 0.3f) == Int8RowCodec::scale_for(0.3f));    // wastes range
  CHECK(Int8RowCodec::rescale(0.0f, 0.5f) == Int8RowCodec::scale_for(0.5f));
  CHECK(Int8RowCodec::rescale(s, 0.0f) == 0.0f);
}

TEST_CASE("int8 keeps_scale: whenever it holds, the exact rescale keeps the scale; it holds for MeZO-sized updates") {
  // Rows of random codes under a fresh-encode scale, updated with random z (|z| <= the bound);
  // the kernel skips the exact absmax sweep exactly when keeps_scale holds.
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> code(-124, 124);
  std::size_t held = 0, trials = 0;
  for (const double lr : {1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2}) {
    for (int row = 0; row < 200; ++row) {
      const float scale = 0.01f * (1.0f + static_cast<float>(row % 7));
      std::vector<float> theta(96);
      float largest = 0.0f;
      for (auto& t : theta) {
        t = static_cast<float>(code(rng)) * scale;
        largest = std::fmax(largest, std::fabs(t));
      }
      const UpdateCoeffs u{lr, 40.0 * normal(rng), row % 2 ? 0.1 : 0.0};
      float absmax = 0.0f;
      for (auto t : theta) {
        float z = normal(rng) * 2.0f;
        z = std::fmax(-6.66f, std::fmin(6.66f, z));
        absmax = std::fmax(absmax, std::fabs(updated_value<float>(t, z, u)));
      }
      const bool keeps = Int8RowCodec::keeps_scale(scale, largest, u);
      if (keeps) CHECK(Int8RowCodec::rescale(scale, absmax) == scale);
      held += keeps;
      ++trials;
      if (lr <= 1e-5 && largest >= 0.6f * 124 * scale) CHECK(keeps);  // MeZO-sized: no exact sweep
      // where the update could pass the top code, nothing can be proved
      if (largest * (1 + lr * u.wd) + std::fabs(lr * u.g) * 6.67 > 127 * scale * (1 + 1e-4)) CHECK_FALSE(keeps);
    }
  }
  MESSAGE(held << " of " << trials << " rows provably keep their scale");
  CHECK_FALSE(Int8RowCodec::keeps_scale(0.0f, 0.0f, UpdateCoeffs{1e-6, 1.0, 0.0}));  // zero row
  CHECK_FALSE(Int8RowCodec::keeps_scale(0.01f, 1.0f, UpdateCoeffs{1e-6, NAN, 0.0}));  // non-finite g
  CHECK_FALSE(Int8RowCodec::keeps_scale(0.01f, 1.27f, UpdateCoeffs{1e-6, 1.0, 0.0}));  // at the top code
}
