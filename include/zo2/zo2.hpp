// zo2/zo2.hpp -- the umbrella header.
//
// Host-only parts are always included and need only a C++20 compiler (plus Eigen and
// nlohmann-json for the CPU model and io). The CUDA parts are included only when this header is
// compiled by nvcc, so a CPU-only consumer needs no CUDA toolkit.
#pragma once

#include <zo2/core/config.hpp>
#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/zo_element.hpp>

#include <zo2/backend/cpu/perturber.hpp>
#include <zo2/offload/resident.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#include <zo2/io/bpe_tokenizer.hpp>
#include <zo2/io/dtype.hpp>
#include <zo2/io/safetensors.hpp>
#include <zo2/models/llama/llama.hpp>
#include <zo2/models/opt/opt.hpp>

#if defined(__CUDACC__) && __has_include(<zo2/backend/cuda/cuda.cuh>)
#include <zo2/backend/cuda/cuda.cuh>
#endif
