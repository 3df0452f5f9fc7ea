// Built only when zo2's cuda component was found: proves zo2::cuda brings the CUDA headers and
// libraries. Plain C++ (no nvcc needed); not run, as the CI machine has no GPU.
#include <zo2/zo2.hpp>

#include <cstdio>
#include <cublas_v2.h>
#include <cuda_runtime.h>

int main() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  cublasHandle_t handle = nullptr;
  const bool have_blas = cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS;
  if (have_blas) cublasDestroy(handle);
  std::printf("CUDA runtime %d, cuBLAS %s\n", runtime, have_blas ? "ok" : "unavailable");
  return 0;
}
