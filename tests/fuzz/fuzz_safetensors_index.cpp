// libFuzzer harness: a sharded checkpoint, model.safetensors.index.json and the two shards it
// may name (input: index, separator, shard 1, separator, shard 2). Shard names that escape the
// directory, missing shards, tensors mapped to the wrong shard and non-string entries must be
// refused; an accepted checkpoint must answer for every name it lists.
#include <set>

#include <zo2/io/safetensors.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto parts = zo2_fuzz::split_parts(data, size, 3);
  zo2_fuzz::write_scratch("model.safetensors.index.json", parts[0]);
  if (parts.size() > 1) zo2_fuzz::write_scratch("model-00001-of-00002.safetensors", parts[1]);
  if (parts.size() > 2) zo2_fuzz::write_scratch("model-00002-of-00002.safetensors", parts[2]);
  try {
    const auto checkpoint = zo2::io::SafetensorsCheckpoint::open(zo2_fuzz::scratch_dir());
    ZO2_FUZZ_CHECK(checkpoint.shards().size() <= 2);
    std::set<std::string> seen;
    for (const std::string& name : checkpoint.names()) {
      ZO2_FUZZ_CHECK(seen.insert(name).second);
      ZO2_FUZZ_CHECK(checkpoint.contains(name));
      const zo2::io::TensorEntry& e = checkpoint.entry(name);
      ZO2_FUZZ_CHECK(e.name == name);
      ZO2_FUZZ_CHECK(e.numel() * zo2::io::dtype_size(e.dtype) == e.bytes.size());
      const zo2::io::Dtype d = e.dtype;
      if (d == zo2::io::Dtype::F32 || d == zo2::io::Dtype::F16 || d == zo2::io::Dtype::BF16 || d == zo2::io::Dtype::F64)
        ZO2_FUZZ_CHECK(checkpoint.read_as_float(name).size() == e.numel());
    }
  } catch (const zo2::Error&) {
  }
  return 0;
}
