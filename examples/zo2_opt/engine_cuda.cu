// The CUDA engine's entry points (built when ZO2_ENABLE_CUDA is on): whether a GPU is there, and
// make_cuda_engine, which picks the forward's precision (EngineOptions::compute, --compute) and
// calls the instantiation for it: engine_cuda_fp32.cu or engine_cuda_bf16.cu
// (engine_cuda_impl.cuh has the engine).
#include <cuda_runtime.h>

#include <memory>
#include <string>

#include <zo2/backend/cuda/check.cuh>

#include "cli.hpp"
#include "engine.hpp"
#include "engine_cuda_compute.hpp"
#include "options.hpp"

namespace zo2_opt {

bool cuda_built() { return true; }

bool cuda_device_present() { return zo2::gpu::device_available(); }

void check_device_available(const std::string& device) {
  if (device != "cuda") return;
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess || count == 0)
    throw UsageError(std::string("--device cuda: no CUDA GPU is present (") +
                     (rc != cudaSuccess ? cudaGetErrorString(rc) : "cudaGetDeviceCount found 0 devices") + ")");
}


namespace {

template <class Config>
std::unique_ptr<Engine> make_for_compute(const Config& config, const ParameterSource& parameters,
                                         const EngineOptions& options) {
  if (options.compute == "fp32") return make_cuda_engine_fp32(config, parameters, options);
  if (options.compute == "bf16") return make_cuda_engine_bf16(config, parameters, options);
  throw UsageError("--compute must be fp32 or bf16, got '" + options.compute + "'");
}

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                         const EngineOptions& options) {
  return make_for_compute(config, parameters, options);
}

std::unique_ptr<Engine> make_cuda_engine(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                         const EngineOptions& options) {
  return make_for_compute(config, parameters, options);
}

}  // namespace zo2_opt
