// zo2-opt: the CUDA engine for each forward precision (--compute), one translation unit each
// (engine_cuda_fp32.cu, engine_cuda_bf16.cu); engine_cuda.cu picks one.
#pragma once

#include <memory>

#include "engine.hpp"

namespace zo2_opt {

std::unique_ptr<Engine> make_cuda_engine_fp32(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options);
std::unique_ptr<Engine> make_cuda_engine_fp32(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options);
std::unique_ptr<Engine> make_cuda_engine_bf16(const zo2::opt::OPTConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options);
std::unique_ptr<Engine> make_cuda_engine_bf16(const zo2::llama::LlamaConfig& config, const ParameterSource& parameters,
                                              const EngineOptions& options);

}  // namespace zo2_opt
