// The device twin of tests/support/dense_tanh_stack.hpp's DenseTanhStack<float>: the same layouts
// and the same float arithmetic (explicit _rn intrinsics, no FMA contraction; the loss summed by
// one thread in the CPU's order, in double), written with tiny CUDA kernels the way a library
// user would write a layer stack for CudaResident. Every kernel runs on `stream`, the policy's.
// Test code, not library code; CUDA tests only.
#pragma once

#include <cstddef>

#include <zo2/zo2.hpp>

#include "dense_tanh_stack.hpp"

namespace zo2_test {
namespace device_stack_detail {
namespace {

__global__ void dense_in_kernel(const float* W, const float* bias, const float* x, float* h, int rows,
                                int d_in, int width) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * width) return;
  const int r = idx / width, o = idx % width;
  float acc = bias[o];
  for (int i = 0; i < d_in; ++i) acc = __fadd_rn(acc, __fmul_rn(W[o * d_in + i], x[r * d_in + i]));
  h[idx] = acc;
}

__global__ void dense_tanh_kernel(const float* W, const float* bias, const float* in, float* out, int rows,
                                  int width) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * width) return;
  const int r = idx / width, o = idx % width;
  float acc = bias[o];
  for (int i = 0; i < width; ++i) acc = __fadd_rn(acc, __fmul_rn(W[o * width + i], in[r * width + i]));
  out[idx] = __fadd_rn(tanhf(acc), in[idx]);
}

// One thread: the CPU's summation order, in double.
__global__ void mse_kernel(const float* w, const float* bias, const float* h, const float* y, int rows,
                           int width, double* loss) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double sum = 0;
  for (int r = 0; r < rows; ++r) {
    float y_hat = bias[0];
    for (int i = 0; i < width; ++i) y_hat = __fadd_rn(y_hat, __fmul_rn(w[i], h[r * width + i]));
    const double d = __dsub_rn(static_cast<double>(y_hat), static_cast<double>(y[r]));
    sum = __dadd_rn(sum, __dmul_rn(d, d));
  }
  *loss = sum / static_cast<double>(rows);
}

}  // namespace
}  // namespace device_stack_detail

/// The device twin of DenseTanhStack<float>.
struct DeviceDenseTanhStack {
  using value_type = float;
  struct Batch {
    std::size_t rows = 0;
    zo2::gpu::DeviceBuffer<float> x, y;
  };
  struct Activation {
    zo2::gpu::DeviceBuffer<float> h;
  };
  struct Workspace {
    zo2::gpu::DeviceBuffer<double> loss;
  };

  DenseTanhStack<float> shape;
  cudaStream_t stream = nullptr;

  std::size_t num_blocks() const { return shape.num_blocks(); }
  zo2::ParamLayout prologue_layout() const { return shape.prologue_layout(); }
  zo2::ParamLayout block_layout() const { return shape.block_layout(); }
  zo2::ParamLayout epilogue_layout() const { return shape.epilogue_layout(); }

  static unsigned blocks_for(std::size_t n) { return static_cast<unsigned>((n + 127) / 128); }

  void prologue(zo2::ParamView<const float> p, const Batch& b, Activation& out, Workspace&) const {
    const std::size_t n = b.rows * shape.width;
    out.h.reserve(n);
    device_stack_detail::dense_in_kernel<<<blocks_for(n), 128, 0, stream>>>(
        p.tensor(0), p.tensor(1), b.x.data(), out.h.data(), static_cast<int>(b.rows), static_cast<int>(shape.d_in),
        static_cast<int>(shape.width));
    ZO2_CUDA_CHECK_LAUNCH("dense_in_kernel");
  }
  void forward_block(std::size_t, zo2::ParamView<const float> p, const Activation& in, Activation& out,
                     Workspace&) const {
    const std::size_t n = in.h.size();
    out.h.reserve(n);
    device_stack_detail::dense_tanh_kernel<<<blocks_for(n), 128, 0, stream>>>(
        p.tensor(0), p.tensor(1), in.h.data(), out.h.data(), static_cast<int>(n / shape.width),
        static_cast<int>(shape.width));
    ZO2_CUDA_CHECK_LAUNCH("dense_tanh_kernel");
  }
  double epilogue(zo2::ParamView<const float> p, zo2::ParamView<const float>, const Activation& in, const Batch& b,
                  Workspace& ws) const {
    ws.loss.reserve(1);
    device_stack_detail::mse_kernel<<<1, 1, 0, stream>>>(p.tensor(0), p.tensor(1), in.h.data(), b.y.data(),
                                                         static_cast<int>(b.rows), static_cast<int>(shape.width),
                                                         ws.loss.data());
    ZO2_CUDA_CHECK_LAUNCH("mse_kernel");
    double loss = 0;
    ZO2_CUDA_CHECK(cudaMemcpyAsync(&loss, ws.loss.data(), sizeof loss, cudaMemcpyDeviceToHost, stream));
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream));
    return loss;
  }
};

/// A host batch of DenseTanhStack<float> on the device.
inline DeviceDenseTanhStack::Batch to_device(const DenseTanhStack<float>::Batch& b) {
  DeviceDenseTanhStack::Batch d;
  d.rows = b.rows;
  d.x = zo2::gpu::DeviceBuffer<float>(b.x.size());
  d.y = zo2::gpu::DeviceBuffer<float>(b.y.size());
  // Landed before the policy's stream reads them.
  zo2::gpu::copy_to_device_blocking(d.x.data(), b.x.data(), b.x.size() * sizeof(float));
  zo2::gpu::copy_to_device_blocking(d.y.data(), b.y.data(), b.y.size() * sizeof(float));
  return d;
}

}  // namespace zo2_test
