// The core + cuda consumer: zo2::core + zo2::cuda_core, compiled by nvcc with no Eigen and none
// of Eigen's nvcc flags. <zo2/core.hpp> under nvcc includes the CUDA engine; the explicit
// instantiations below compile its policies' member functions and the kernels they launch.
// Built, and run only for its CPU part: the CI machine has no GPU.
#include "tiny_stack.hpp"

#if defined(EIGEN_WORLD_VERSION) || defined(NLOHMANN_JSON_VERSION_MAJOR)
#error "<zo2/core.hpp> under nvcc included Eigen or nlohmann-json"
#endif
#if !defined(__CUDACC__)
#error "core_cuda.cu must be compiled by nvcc"
#endif

template class zo2::gpu::CudaResident<float, float>;
template class zo2::gpu::CudaResident<zo2::bfloat16, float>;
template class zo2::gpu::HostOffload<zo2::offload::Fp32Codec, float>;
template class zo2::gpu::HostOffload<zo2::offload::Bf16Codec, float>;
template class zo2::gpu::HostOffload<zo2::offload::Int8RowCodec, float>;

int main() { return consumer::run("core_only + cuda: zo2::core, zo2::cuda_core, no Eigen"); }
