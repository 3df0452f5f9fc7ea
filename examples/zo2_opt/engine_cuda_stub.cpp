// Built when ZO2_ENABLE_CUDA is off: --device cuda is a clear one-line error.
#include "cli.hpp"
#include "engine.hpp"

namespace zo2_opt {

bool cuda_built() { return false; }

std::unique_ptr<Engine> make_cuda_engine(const zo2::opt::OPTConfig&, const ParameterSource&, const EngineOptions&) {
  throw UsageError("--device cuda: this zo2-opt was built without CUDA (configure with -DZO2_ENABLE_CUDA=ON)");
}

std::unique_ptr<Engine> make_cuda_engine(const zo2::llama::LlamaConfig&, const ParameterSource&, const EngineOptions&) {
  throw UsageError("--device cuda: this zo2-opt was built without CUDA (configure with -DZO2_ENABLE_CUDA=ON)");
}

}  // namespace zo2_opt

#include "options.hpp"

namespace zo2_opt {

bool cuda_device_present() { return false; }

void check_device_available(const std::string& device) {
  if (device == "cuda")
    throw UsageError("--device cuda: this zo2-opt was built without CUDA (configure with -DZO2_ENABLE_CUDA=ON)");
}

}  // namespace zo2_opt
