// libFuzzer harness: the packed bf16 decoder (offload/packed_bf16.hpp) on corrupt blocks. The
// input's first byte picks a layout (one to three tensors of 1..100 elements), the rest is the
// block (cut or zero-padded to its size). A block the decoder accepts must re-encode from its
// decoded values and decode to the same bits (the format is exact for every bf16 value).
#include <algorithm>
#include <cstring>

#include <zo2/offload/packed_bf16.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  using zo2::offload::PackedBf16Group;
  zo2::ParamLayout layout;
  const unsigned pick = data[0];
  static constexpr std::int64_t kSizes[] = {1, 31, 32, 33, 64, 100, 17, 96};
  const unsigned tensors = 1 + pick % 3;
  for (unsigned r = 0; r < tensors; ++r) {
    const std::int64_t n = kSizes[(pick >> (2 + 2 * r)) & 7];
    if (r == 1) layout.add("t" + std::to_string(r) + ".weight", {n / 8 + 1, 8});
    else layout.add("t" + std::to_string(r) + ".weight", {n});
  }
  const PackedBf16Group codec(layout);
  std::vector<unsigned char> block(codec.bytes(), 0);
  std::memcpy(block.data(), data + 1, std::min(size - 1, block.size()));
  std::vector<std::vector<zo2::bfloat16>> decoded(codec.num_tensors());
  for (std::size_t r = 0; r < codec.num_tensors(); ++r) {
    decoded[r].resize(codec.tensor(r).numel);
    try {
      codec.decode_bf16(r, block, decoded[r]);
    } catch (const zo2::Error&) {
      return 0;
    }
  }
  std::vector<unsigned char> again(codec.bytes(), 0);
  std::vector<zo2::bfloat16> back;
  for (std::size_t r = 0; r < codec.num_tensors(); ++r) {
    codec.encode_bf16(r, decoded[r], again);  // no more escapes than the accepted block had
    back.assign(decoded[r].size(), zo2::bfloat16{});
    codec.decode_bf16(r, again, back);
    for (std::size_t j = 0; j < back.size(); ++j) ZO2_FUZZ_CHECK(back[j].bits == decoded[r][j].bits);
  }
  // The float path of the whole group decodes the same values.
  std::vector<float> flat(layout.total_elements());
  codec.decode_group(block, flat);
  for (std::size_t r = 0; r < codec.num_tensors(); ++r)
    for (std::size_t j = 0; j < decoded[r].size(); ++j) {
      const float v = flat[codec.tensor(r).offset + j], w = zo2::to_float(decoded[r][j]);
      ZO2_FUZZ_CHECK(std::memcmp(&v, &w, sizeof v) == 0);
    }
  return 0;
}
