// zo2/backend/cuda/cuda.cuh -- the CUDA umbrella: zo2.hpp includes it when compiled by nvcc.
// A plain list of includes; each CUDA header adds its own line.
#pragma once

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/backend/cuda/perturb.cuh>
#include <zo2/offload/cuda_resident.cuh>
#include <zo2/offload/host_offload.cuh>
