// zo2/backend/cuda/check.cuh -- every CUDA, cuBLAS and cuBLASLt call is checked; a failure
// becomes zo2::CudaError naming the call, the file and the line.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include <zo2/core/error.hpp>

namespace zo2::gpu {

class CudaError : public Error {
 public:
  using Error::Error;
};

/// The device ran out of memory; the message says how much was asked for and how much was free.
class OutOfMemory : public CudaError {
 public:
  using CudaError::CudaError;
};

namespace detail {
inline void throw_cuda(cudaError_t status, const char* call, const char* file, int line) {
  std::string msg = std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                    cudaGetErrorString(status) + ") at " + file + ":" + std::to_string(line);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error so the caller can recover
    std::size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
      msg += "; device memory free " + std::to_string(free_b >> 20) + " MiB of " +
             std::to_string(total_b >> 20) + " MiB";
    throw OutOfMemory(msg);
  }
  throw CudaError(msg);
}
inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}
/// A kernel launch failed: the message names the kernel (`kernel`), the error, file and line.
inline void throw_launch(cudaError_t status, const std::string& kernel, const char* file, int line) {
  throw_cuda(status, ("launch of " + kernel).c_str(), file, line);
}
inline void throw_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  throw CudaError(std::string(call) + " failed: " + cublas_status_name(status) + " at " + file +
                  ":" + std::to_string(line));
}
}  // namespace detail

/// True when a CUDA device can be used (tests skip, programs fall back to the CPU, otherwise).
inline bool device_available() {
  int n = 0;
  const cudaError_t s = cudaGetDeviceCount(&n);
  if (s != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

}  // namespace zo2::gpu

#define ZO2_CUDA_CHECK(call)                                                            \
  do {                                                                                  \
    const cudaError_t zo2_status_ = (call);                                             \
    if (zo2_status_ != cudaSuccess)                                                     \
      ::zo2::gpu::detail::throw_cuda(zo2_status_, #call, __FILE__, __LINE__);          \
  } while (0)

/// After a kernel launch: the launch itself (configuration errors) is checked; a failure names
/// the kernel, `what` (a string: "zo2::gpu::layer_norm_kernel").
#define ZO2_CUDA_CHECK_LAUNCH(what)                                                     \
  do {                                                                                  \
    const cudaError_t zo2_status_ = cudaPeekAtLastError();                              \
    if (zo2_status_ != cudaSuccess)                                                     \
      ::zo2::gpu::detail::throw_launch(zo2_status_, (what), __FILE__, __LINE__);       \
  } while (0)

#define ZO2_CUBLAS_CHECK(call)                                                          \
  do {                                                                                  \
    const cublasStatus_t zo2_status_ = (call);                                          \
    if (zo2_status_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::zo2::gpu::detail::throw_cublas(zo2_status_, #call, __FILE__, __LINE__);        \
  } while (0)
