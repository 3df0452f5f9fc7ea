// Packed bf16 (offload/packed_bf16.hpp) at its edges: tensors without escapes (no memcpy from
// or to a null pointer: this test is built with UBSan where the compiler has it), and corrupt
// exponent codes and escape entries, which the decoder refuses naming the tensor and element.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <zo2/offload/packed_bf16.hpp>

using namespace zo2;
using namespace zo2::offload;

namespace {

std::vector<bfloat16> normal_bf16(std::size_t n, double sigma, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, sigma);
  std::vector<bfloat16> v(n);
  for (auto& x : v) x = to_bfloat16(static_cast<float>(d(rng)));
  return v;
}

/// Sets element j's 4-bit code in a block.
void set_code(const PackedBf16Group& codec, std::vector<unsigned char>& block, std::size_t j, unsigned code) {
  unsigned char& byte = block[codec.codes_offset() + j / 2];
  byte = j % 2 ? static_cast<unsigned char>((byte & 0x0fu) | code << 4) : static_cast<unsigned char>((byte & 0xf0u) | code);
}

ParamLayout one_tensor(std::int64_t n) {
  ParamLayout l;
  l.add("t.weight", {n});
  return l;
}

}  // namespace

TEST_CASE("packed bf16: a tensor without escapes encodes and decodes (no null pointer reaches memcpy)") {
  const ParamLayout layout = one_tensor(96);
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  const std::vector<bfloat16> values(96, to_bfloat16(0.5f));
  codec.encode_bf16(0, values, block);
  CHECK(codec.escape_count(0, block) == 0);
  std::vector<bfloat16> out(96);
  codec.decode_bf16(0, block, out);
  for (std::size_t j = 0; j < out.size(); ++j) CHECK(out[j].bits == values[j].bits);
  // The float paths and whole groups, all zeros and escape-free.
  std::vector<float> flat(layout.total_elements(), 0.0f), back(flat.size(), 1.0f);
  codec.encode_group(flat, block);
  codec.decode_group(block, back);
  CHECK(back == flat);
}

TEST_CASE("packed bf16: an exponent code that points outside 1..E is a corrupt block, named") {
  const ParamLayout layout = one_tensor(64);
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  codec.encode_bf16(0, normal_bf16(64, 0.02, 3), block);
  std::vector<bfloat16> out(64);
  REQUIRE_NOTHROW(codec.decode_bf16(0, block, out));

  // Chunk 1's largest exponent field zeroed: its codes 0..13 now name fields below 1.
  auto bad = block;
  bad[codec.exponents_offset() + 1] = 0;
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 32"), Error);
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("a corrupt block"), Error);

  // A chunk of tiny values (exponent fields 1..3): a code of 13 would be field E - 13 < 0.
  std::vector<bfloat16> tiny(64, bfloat16{static_cast<std::uint16_t>(1u << 7)});  // field 1
  tiny[0] = bfloat16{static_cast<std::uint16_t>(3u << 7)};                         // field 3: E = 3
  codec.encode_bf16(0, tiny, block);
  REQUIRE_NOTHROW(codec.decode_bf16(0, block, out));
  bad = block;
  set_code(codec, bad, 5, 13);
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 5"), Error);
  bad = block;
  set_code(codec, bad, 6, 3);  // E - 3 = 0: a nonzero code naming field 0 (zero has code 15)
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 6"), Error);
  std::vector<float> floats(64);
  CHECK_THROWS_AS(codec.decode(0, bad, floats), Error);
}

TEST_CASE("packed bf16: escape entries must hold an exponent the encoder escapes, and none may be left over") {
  const ParamLayout layout = one_tensor(64);
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  std::vector<bfloat16> v = normal_bf16(64, 0.02, 5);
  v[7] = to_bfloat16(1e-30f);  // an escape in chunk 0
  codec.encode_bf16(0, v, block);
  REQUIRE(codec.escape_count(0, block) == 1);
  std::vector<bfloat16> out(64);
  REQUIRE_NOTHROW(codec.decode_bf16(0, block, out));
  CHECK(out[7].bits == v[7].bits);

  const std::size_t entry = codec.entries_offset();
  auto bad = block;
  bad[entry] = block[codec.exponents_offset()];  // the escape's exponent set to its chunk's E
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 7"), Error);
  bad = block;
  bad[entry] = 0;  // exponent field 0 is code 15, never an escape
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 7"), Error);
  bad = block;
  bad[entry + 1] = 1;  // bits above the exponent byte in the low half
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("t.weight element 7"), Error);

  // Two escapes recorded, one code using them.
  bad = block;
  const std::uint32_t two = 2;
  std::memcpy(bad.data() + codec.counts_offset(), &two, sizeof two);
  CHECK_THROWS_WITH_AS(codec.decode_bf16(0, bad, out), doctest::Contains("a corrupt block"), Error);
}
