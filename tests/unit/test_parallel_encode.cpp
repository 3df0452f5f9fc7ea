// Encoding and decoding a whole group on all cores (GroupCodec::encode_group / decode_group,
// PackedBf16Group::encode_group): byte for byte what one core writes tensor by tensor, for every
// codec, on a group large enough to be cut into many pieces (rows of odd length, a rank-1
// tensor, packed escapes falling in several pieces).
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <zo2/core/parallel.hpp>
#include <zo2/offload/codecs.hpp>
#include <zo2/offload/packed_bf16.hpp>

using namespace zo2;
using namespace zo2::offload;

namespace {

/// 4.27 M elements: over the size from which host work runs on all cores (threads_for).
ParamLayout large_layout() {
  ParamLayout l;
  l.add("fc1.weight", {1500, 2000});
  l.add("fc1.bias", {1500}, false);
  l.add("fc2.weight", {700, 1801});  // rows of odd length: pieces of whole rows
  l.add("ln.weight", {1001}, false);
  return l;
}

/// Normal weights with a few tiny and a few zero values (packed escapes, zero codes, zero rows).
std::vector<float> weights(const ParamLayout& layout, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::uniform_int_distribution<int> pick(0, 9999);
  std::vector<float> flat(layout.total_elements(), 0.0f);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    for (std::size_t j = 0; j < layout.spec(r).numel(); ++j) {
      const int p = pick(rng);
      flat[layout.offset(r) + j] = p == 0 ? 1e-9f : p == 1 ? 0.0f : normal(rng);
    }
  for (std::size_t k = 0; k < 1801; ++k) flat[layout.offset(2) + 5 * 1801 + k] = 0.0f;  // a zero row
  return flat;
}

template <class C>
void check_codec(const ParamLayout& layout, const std::vector<float>& flat) {
  const GroupCodec<C> codec(layout);
  CHECK(threads_for(codec.total_elements()) == 0u);  // the group is spread over the cores
  std::vector<unsigned char> parallel(codec.bytes(), 0xab), serial(codec.bytes(), 0);
  codec.encode_group(flat, parallel);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    codec.encode(r, std::span<const float>(flat).subspan(layout.offset(r), layout.spec(r).numel()), {}, serial);
  CHECK_MESSAGE(std::memcmp(parallel.data(), serial.data(), serial.size()) == 0, C::name);
  std::vector<float> decoded(flat.size(), 7.0f), one_core(flat.size(), 0.0f);
  codec.decode_group(parallel, decoded);
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    codec.decode(r, serial, std::span<float>(one_core).subspan(layout.offset(r), layout.spec(r).numel()));
  CHECK_MESSAGE(std::memcmp(decoded.data(), one_core.data(), flat.size() * sizeof(float)) == 0, C::name);
}

}  // namespace

TEST_CASE("element codecs: a large group encoded and decoded on all cores equals one core's, byte for byte") {
  const ParamLayout layout = large_layout();
  const std::vector<float> flat = weights(layout, 11);
  check_codec<Fp32Codec>(layout, flat);
  check_codec<Bf16Codec>(layout, flat);
  check_codec<Fp16Codec>(layout, flat);
  check_codec<Int8RowCodec>(layout, flat);
}

TEST_CASE("packed bf16: a large group encoded on all cores equals one core's, escapes joined in order") {
  const ParamLayout layout = large_layout();
  const std::vector<float> flat = weights(layout, 12);
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> parallel(codec.bytes(), 0xab), serial(codec.bytes(), 0);
  codec.encode_group(flat, parallel);
  std::memset(serial.data() + codec.codes_offset(), PackedBf16::kZeroExponent * 0x11,
              codec.exponents_offset() - codec.codes_offset());
  for (std::size_t r = 0; r < layout.num_tensors(); ++r)
    codec.encode(r, std::span<const float>(flat).subspan(layout.offset(r), layout.spec(r).numel()), {}, serial);
  CHECK(codec.escape_count(0, parallel) > 100);  // fc1's escapes lie in several of its pieces
  CHECK(std::memcmp(parallel.data(), serial.data(), serial.size()) == 0);
  std::vector<float> decoded(flat.size());
  codec.decode_group(parallel, decoded);
  std::size_t differ = 0;
  for (std::size_t j = 0; j < flat.size(); ++j) differ += decoded[j] != to_float(to_bfloat16(flat[j]));
  CHECK(differ == 0);
}

TEST_CASE("packed bf16: a tensor whose escapes overflow its room is named, also when encoded on all cores") {
  ParamLayout layout;
  layout.add("dense.weight", {2048, 2048});
  std::vector<float> flat(layout.total_elements(), 0.02f);
  for (std::size_t j = 0; j < flat.size(); j += 64) flat[j] = 1e-12f;  // 65536 escapes, room for 20972
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes());
  CHECK_THROWS_WITH_AS(codec.encode_group(flat, block), doctest::Contains("dense.weight needs 65536 escapes"), Error);
}
