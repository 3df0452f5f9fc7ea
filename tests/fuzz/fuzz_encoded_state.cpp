// libFuzzer harness: the safetensors files a checkpoint saves beside the weights
// (examples/zo2_opt/checkpoint.cpp): offload_state.safetensors (read_encoded_state: the
// offload engine's encoded masters, U8 "group.<g>" tensors, codec and group count in
// __metadata__) and optimizer_state.safetensors (read_rule_state: F32 rule state). The same
// bytes are offered as both. Accepted int8 groups of the size of a small layout are decoded
// with the int8 row codec, as a restore would hand them to the engine.
#include <cmath>

#include <zo2/offload/codecs.hpp>

#include "checkpoint.hpp"
#include "fuzz_common.hpp"

namespace {

/// A group layout like one OPT block's, small: rows of several lengths, a rank-1 tensor.
const zo2::ParamLayout& small_layout() {
  static const zo2::ParamLayout layout = [] {
    zo2::ParamLayout l;
    l.add("q.weight", {4, 8});
    l.add("q.bias", {4}, false);
    l.add("fc.weight", {3, 33});
    return l;
  }();
  return layout;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  zo2_fuzz::write_scratch(zo2_opt::kEncodedStateFile, bytes);
  zo2_fuzz::write_scratch(zo2_opt::kRuleStateFile, bytes);
  try {
    const auto encoded = zo2_opt::read_encoded_state(zo2_fuzz::scratch_dir());
    ZO2_FUZZ_CHECK(encoded.has_value());
    std::size_t total = 0;
    for (const auto& g : encoded->groups) total += g.size();
    ZO2_FUZZ_CHECK(total <= size);
    if (encoded->codec == "int8") {
      const zo2::offload::GroupCodec<zo2::offload::Int8RowCodec> codec(small_layout());
      std::vector<float> flat(small_layout().total_elements());
      for (const auto& g : encoded->groups) {
        if (g.size() != codec.bytes()) continue;
        codec.decode_group(g, flat);
      }
    }
  } catch (const zo2::Error&) {
  }
  try {
    const auto rule = zo2_opt::read_rule_state(zo2_fuzz::scratch_dir());
    ZO2_FUZZ_CHECK(rule.has_value());
    std::size_t total = 0;
    for (const auto& g : rule->groups) total += g.size() * sizeof(float);
    ZO2_FUZZ_CHECK(total <= size);
    ZO2_FUZZ_CHECK(rule->slots <= 8);
  } catch (const zo2::Error&) {
  }
  return 0;
}
