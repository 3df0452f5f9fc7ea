// The packed bf16 format (offload/packed_bf16.hpp): exact round trips of every kind of bf16
// value, escapes, its size, that it rounds floats as the bf16 codec does, and that bad input
// and corrupt blocks are refused with the tensor named.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <zo2/core/philox.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>

using namespace zo2;
using namespace zo2::offload;

namespace {

ParamLayout test_layout() {
  ParamLayout l;
  l.add("fc.weight", {64, 70});  // 4480 elements: its last chunk is partial
  l.add("fc.bias", {64}, false);
  l.add("ln.weight", {33}, false);
  return l;
}

/// OPT-like weights: normal, a scale per tensor.
std::vector<bfloat16> normal_bf16(std::size_t n, double sigma, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, sigma);
  std::vector<bfloat16> v(n);
  for (auto& x : v) x = to_bfloat16(static_cast<float>(d(rng)));
  return v;
}

void check_round_trip(const PackedBf16Group& codec, std::size_t r, const std::vector<bfloat16>& values,
                      std::vector<unsigned char>& block) {
  codec.encode_bf16(r, values, block);
  std::vector<bfloat16> out(values.size());
  codec.decode_bf16(r, block, out);
  std::size_t differ = 0;
  for (std::size_t j = 0; j < values.size(); ++j) differ += out[j].bits != values[j].bits;
  CHECK(differ == 0);
}

}  // namespace

TEST_CASE("packed bf16: OPT-like weights round-trip bit for bit, ~1e-4 of them as escapes") {
  const ParamLayout layout = test_layout();
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  const double sigmas[] = {0.02, 0.01, 0.3};
  std::size_t escapes = 0, elements = 0;
  for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
    CAPTURE(r);
    const auto values = normal_bf16(layout.spec(r).numel(), sigmas[r], 7 + static_cast<unsigned>(r));
    check_round_trip(codec, r, values, block);
    escapes += codec.escape_count(r, block);
    elements += values.size();
  }
  // A larger sample for the rate: a 2^20-element tensor of N(0, 0.02).
  ParamLayout big;
  big.add("w", {1024, 1024});
  const PackedBf16Group big_codec(big);
  std::vector<unsigned char> big_block(big_codec.bytes());
  const auto w = normal_bf16(1 << 20, 0.02, 99);
  check_round_trip(big_codec, 0, w, big_block);
  const double rate = static_cast<double>(big_codec.escape_count(0, big_block)) / static_cast<double>(w.size());
  MESSAGE("escape rate of N(0, 0.02) bf16 weights: " << rate << " (" << escapes << " in the small layout of "
                                                      << elements << ")");
  CHECK(rate > 0.0);   // the list is exercised
  CHECK(rate < 1e-3);  // and stays far inside the room of 0.5%
}

TEST_CASE("packed bf16: zeros, subnormals, extremes of range, inf and NaN, and wide chunks are exact") {
  // 65536 elements (room for 328 escapes): normal weights, with the special values confined to
  // the first 8 chunks (at most 256 escapes).
  ParamLayout layout;
  layout.add("special", {65536});
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  std::vector<bfloat16> v = normal_bf16(65536, 0.02, 4);
  std::mt19937 rng(3);
  for (std::size_t j = 0; j < 256; ++j) {
    switch (j % 8) {
      case 0: v[j] = bfloat16{0x0000}; break;                                             // +0
      case 1: v[j] = bfloat16{0x8000}; break;                                             // -0
      case 2: v[j] = bfloat16{static_cast<std::uint16_t>(0x0001 + rng() % 0x7f)}; break;  // subnormal
      case 3: v[j] = bfloat16{static_cast<std::uint16_t>(0x7f00 | (rng() & 0x7f))}; break;  // near max
      case 4: v[j] = bfloat16{static_cast<std::uint16_t>(0x0080 | (rng() & 0x807f))}; break;  // smallest normals
      case 5: v[j] = bfloat16{static_cast<std::uint16_t>(rng() & 0xffff)}; break;         // any pattern
      default: v[j] = to_bfloat16(std::ldexp(1.0f, static_cast<int>(rng() % 200) - 100)); break;
    }
  }
  v[100] = bfloat16{0x7f80};  // +inf
  v[200] = bfloat16{0xff80};  // -inf
  v[300] = bfloat16{0x7fc1};  // NaN with a payload
  check_round_trip(codec, 0, v, block);
  CHECK(codec.escape_count(0, block) > 50);  // these chunks span far more than 14 binades
}

TEST_CASE("packed bf16: size is 12.25 bits per element plus the escape room") {
  ParamLayout layout;
  layout.add("w", {4096, 4096});
  layout.add("b", {4096}, false);
  const PackedBf16Group codec(layout);
  const double n = static_cast<double>(layout.total_elements());
  const double room = 0.005 * 4096.0 * 4096.0 + 64;  // the weight's 0.5%, the bias's minimum
  const double want = n * 1.5 + n / 32 + 16 + room * 8;
  CHECK(static_cast<double>(codec.bytes()) == doctest::Approx(want).epsilon(1e-4));
  MESSAGE("bits per element: " << 8.0 * static_cast<double>(codec.bytes()) / n << " (bf16: 16)");
  CHECK(8.0 * static_cast<double>(codec.bytes()) / n < 12.6);
}

TEST_CASE("packed bf16: floats are rounded as the bf16 codec rounds them, to nearest and stochastically") {
  const ParamLayout layout = test_layout();
  const PackedBf16Group packed(layout);
  const GroupCodec<Bf16Codec> plain(layout);
  std::vector<unsigned char> pb(packed.bytes()), qb(plain.bytes());
  std::mt19937_64 rng(5);
  std::normal_distribution<double> d(0.0, 0.05);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r) {
    CAPTURE(r);
    const std::size_t n = layout.spec(r).numel();
    std::vector<float> values(n);
    for (auto& x : values) x = static_cast<float>(d(rng));
    std::vector<std::uint32_t> words(n);
    for (std::size_t j = 0; j < n; ++j) words[j] = rounding_bits_at(11, 3, static_cast<std::uint32_t>(r), j);
    for (const bool stochastic : {false, true}) {
      const std::span<const std::uint32_t> w = stochastic ? std::span<const std::uint32_t>(words) : std::span<const std::uint32_t>{};
      packed.encode(r, values, w, pb);
      plain.encode(r, values, w, qb);
      std::vector<float> a(n), b(n);
      packed.decode(r, pb, a);
      plain.decode(r, qb, b);
      CHECK(a == b);
    }
  }
}

TEST_CASE("packed bf16: whole groups, padding encodes as zero") {
  const ParamLayout layout = test_layout();
  const PackedBf16Group codec(layout);
  std::vector<float> flat(layout.total_elements(), 0.0f);
  std::mt19937_64 rng(8);
  std::normal_distribution<double> d(0.0, 0.02);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    for (std::size_t j = 0; j < layout.spec(r).numel(); ++j)
      flat[layout.offset(r) + j] = to_float(to_bfloat16(static_cast<float>(d(rng))));
  std::vector<unsigned char> block(codec.bytes());
  codec.encode_group(flat, block);
  std::vector<float> back(flat.size(), 1.0f);
  codec.decode_group(block, back);
  CHECK(back == flat);
}

TEST_CASE("packed bf16: refuses what it cannot hold, names the tensor, and catches corrupt blocks") {
  ParamLayout layout;
  layout.add("wide.weight", {64, 64});
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  // Every chunk holds one huge value and 31 tiny ones: 3968 escapes, room for 64.
  std::vector<bfloat16> v(4096, to_bfloat16(1e-20f));
  for (std::size_t j = 0; j < v.size(); j += 32) v[j] = to_bfloat16(1e20f);
  CHECK_THROWS_WITH_AS(codec.encode_bf16(0, v, block), doctest::Contains("wide.weight needs 3968 escapes"), Error);
  std::vector<bfloat16> ok = normal_bf16(4096, 0.02, 1);
  ok[33] = to_bfloat16(1e-30f);  // one escape
  codec.encode_bf16(0, ok, block);
  REQUIRE(codec.escape_count(0, block) >= 1);
  std::vector<bfloat16> out(4096);
  auto bad = block;
  bad[codec.entries_offset() + 4] ^= 0x01;  // the first escape's index (high half) now names another element
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("wide.weight element"), Error);
  bad = block;
  bad[codec.counts_offset()] = 0xff;  // 255 escapes recorded, room for 64
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("a corrupt block"), Error);
  std::vector<unsigned char> short_block(codec.bytes() - 1);
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, short_block, out), doctest::Contains("the layout needs"), Error);
  CHECK_THROWS_AS(codec.encode_bf16(1, ok, block), Error);
  // Wrong counts name the tensor and both sizes.
  const std::vector<bfloat16> short_values(4095);
  CHECK_THROWS_WITH_AS(codec.encode_bf16(0, short_values, block),
                       doctest::Contains("encode of wide.weight got 4095 values, expected 4096"), Error);
  std::vector<float> long_floats(4097);
  CHECK_THROWS_WITH_AS(codec.decode(0, block, long_floats),
                       doctest::Contains("decode of wide.weight got 4097 floats, expected 4096"), Error);
}
