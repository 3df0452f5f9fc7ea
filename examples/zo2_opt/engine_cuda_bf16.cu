// zo2-opt's CUDA engine with the forward in bf16 (--compute bf16): engine_cuda_impl.cuh's
// templates for OPTCudaModel<zo2::bfloat16> and LlamaCudaModel<zo2::bfloat16>.
#include "engine_cuda_compute.hpp"
#include "engine_cuda_impl.cuh"

namespace zo2_opt {

std::unique_ptr<Engine> make_cuda_engine_bf16(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options) {
  return cuda_engine::make_family_engine<zo2::opt::OPTCudaModel<zo2::bfloat16>>(config, parameters, options);
}

std::unique_ptr<Engine> make_cuda_engine_bf16(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options) {
  return cuda_engine::make_family_engine<zo2::llama::LlamaCudaModel<zo2::bfloat16>>(config, parameters, options);
}

}  // namespace zo2_opt
