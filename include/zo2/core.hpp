// zo2/core.hpp -- the optimizer core's umbrella header (CMake target zo2::core).
//
// Everything a project needs to fine-tune its own layer stack with zeroth-order optimization:
// the configuration and errors, parameter layouts, the parameter store, the LayerStack concept,
// the update rules, ZOOptimizer, the CPU Resident policy and its perturber, and the
// communicator interface. It needs only a C++20 compiler and the standard library: no Eigen,
// no nlohmann-json (those belong to the models and io/, in <zo2/zo2.hpp>, target zo2::models).
//
// Compiled by nvcc, it also includes the CUDA offload engine (backend/cuda/cuda.cuh, target
// zo2::cuda_core), which needs no Eigen either; a C++ compiler never sees it, so a CPU-only
// consumer needs no CUDA toolkit.
#pragma once

#include <zo2/core/communicator.hpp>
#include <zo2/core/config.hpp>
#include <zo2/core/error.hpp>
#include <zo2/core/half_types.hpp>
#include <zo2/core/parallel.hpp>
#include <zo2/core/param_layout.hpp>
#include <zo2/core/philox.hpp>
#include <zo2/core/update_rules.hpp>
#include <zo2/core/zo_element.hpp>

#include <zo2/backend/cpu/perturber.hpp>
#include <zo2/offload/resident.hpp>
#include <zo2/optim/layer_stack.hpp>
#include <zo2/optim/parameter_store.hpp>
#include <zo2/optim/step_types.hpp>
#include <zo2/optim/zo_optimizer.hpp>

#if defined(__CUDACC__) && __has_include(<zo2/backend/cuda/cuda.cuh>)
#include <zo2/backend/cuda/cuda.cuh>
#endif
