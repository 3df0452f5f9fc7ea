// zo2-opt's CUDA engine with the forward in fp32 (--compute fp32): engine_cuda_impl.cuh's
// templates for OPTCudaModel<float> and LlamaCudaModel<float>.
#include "engine_cuda_compute.hpp"
#include "engine_cuda_impl.cuh"

namespace zo2_opt {

std::unique_ptr<Engine> make_cuda_engine_fp32(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options) {
  return cuda_engine::make_family_engine<zo2::opt::OPTCudaModel<float>>(config, parameters, options);
}

std::unique_ptr<Engine> make_cuda_engine_fp32(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options) {
  return cuda_engine::make_family_engine<zo2::llama::LlamaCudaModel<float>>(config, parameters, options);
}

}  // namespace zo2_opt
