// libFuzzer harness: a LLaMA-family config.json (LlamaConfig::from_json_file: llama, qwen2,
// qwen3, mistral, rope_scaling / rope_parameters, layer_types). An accepted config must
// validate, lay out a model without overflow, and survive to_json -> from_json unchanged.
#include <zo2/models/llama/config.hpp>
#include <zo2/models/llama/loader.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2_fuzz::clear_scratch();
  const auto path = zo2_fuzz::write_scratch("config.json", {reinterpret_cast<const char*>(data), size});
  try {
    const zo2::llama::LlamaConfig config = zo2::llama::LlamaConfig::from_json_file(path);
    config.validate();
    const zo2::ModelLayout layout = zo2::llama::model_layout(config);  // sizes only, no allocation
    ZO2_FUZZ_CHECK(layout.num_blocks() == static_cast<std::size_t>(config.num_hidden_layers));
    const auto again = zo2::llama::LlamaConfig::from_json(config.to_json(), "round trip");
    ZO2_FUZZ_CHECK(again == config);
  } catch (const zo2::Error&) {
  }
  return 0;
}
