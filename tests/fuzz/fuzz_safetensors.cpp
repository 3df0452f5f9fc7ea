// libFuzzer harness: one safetensors file (header length, JSON header, dtypes, shapes,
// data_offsets, overlaps, __metadata__). An accepted file's tensors must be exactly the bytes
// its header names (checked against the input, not through the parser), and convert to float.
#include <cstring>

#include <nlohmann/json.hpp>

#include <zo2/io/safetensors.hpp>

#include "fuzz_common.hpp"

namespace {

void check_accepted(const zo2::io::SafetensorsFile& file, const std::uint8_t* data, std::size_t size) {
  // The parser accepted: re-read the header independently and compare every tensor's bytes.
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | data[i];
  ZO2_FUZZ_CHECK(header_size <= size - 8);
  const auto header = nlohmann::json::parse(data + 8, data + 8 + header_size);
  const std::uint8_t* section = data + 8 + header_size;
  const std::size_t section_size = size - 8 - header_size;
  std::size_t tensors = 0;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    ++tensors;
    ZO2_FUZZ_CHECK(file.contains(name));
    const zo2::io::TensorEntry& e = file.entry(name);
    const auto begin = info["data_offsets"][0].get<std::uint64_t>(), end = info["data_offsets"][1].get<std::uint64_t>();
    ZO2_FUZZ_CHECK(begin <= end && end <= section_size);
    ZO2_FUZZ_CHECK(e.bytes.size() == end - begin);
    ZO2_FUZZ_CHECK(e.bytes.empty() || std::memcmp(e.bytes.data(), section + begin, e.bytes.size()) == 0);
    ZO2_FUZZ_CHECK(e.numel() * zo2::io::dtype_size(e.dtype) == e.bytes.size());
    const zo2::io::Dtype d = e.dtype;
    if (d == zo2::io::Dtype::F32 || d == zo2::io::Dtype::F16 || d == zo2::io::Dtype::BF16 || d == zo2::io::Dtype::F64) {
      const std::vector<float> values = file.read_as_float(name);
      ZO2_FUZZ_CHECK(values.size() == e.numel());
    }
  }
  ZO2_FUZZ_CHECK(tensors == file.entries().size());
  ZO2_FUZZ_CHECK(file.names().size() == tensors);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto path = zo2_fuzz::write_scratch("model.safetensors", {reinterpret_cast<const char*>(data), size});
  try {
    const auto file = zo2::io::SafetensorsFile::open(path);
    check_accepted(file, data, size);
    // The same file through the checkpoint interface (a directory holding model.safetensors).
    const auto checkpoint = zo2::io::SafetensorsCheckpoint::open(zo2_fuzz::scratch_dir());
    ZO2_FUZZ_CHECK(checkpoint.names().size() == file.entries().size());
  } catch (const zo2::Error&) {
  }
  return 0;
}
