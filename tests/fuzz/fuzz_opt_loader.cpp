// libFuzzer harness: an OPT checkpoint directory, config.json and model.safetensors (input:
// config, separator, weights), through load_opt_checkpoint. A config whose sizes disagree with
// the weights must be refused before the store it implies is allocated (libFuzzer's
// -malloc_limit_mb turns a large allocation into a finding).
#include <zo2/models/opt/loader.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto parts = zo2_fuzz::split_parts(data, size, 2);
  zo2_fuzz::write_scratch("config.json", parts[0]);
  if (parts.size() > 1) zo2_fuzz::write_scratch("model.safetensors", parts[1]);
  try {
    const auto loaded = zo2::opt::load_opt_checkpoint<float>(zo2_fuzz::scratch_dir());
    const zo2::ModelLayout& layout = loaded.store.model_layout();
    ZO2_FUZZ_CHECK(layout.num_blocks() == static_cast<std::size_t>(loaded.config.num_hidden_layers));
    // Every weight came from the file: each element is at least a byte of it.
    ZO2_FUZZ_CHECK(layout.total_elements() <= 32 * size);  // tensors pad to 32 elements
  } catch (const zo2::Error&) {
  }
  return 0;
}
