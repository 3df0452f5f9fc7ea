// zo2/backend/cuda/cross_entropy.cuh -- causal-LM cross entropy through a tied LM head, with the
// vocabulary processed in chunks so at most one chunk of logits ([rows, chunk] fp32) exists.
//
// For rows r (the positions whose shifted label is not -100, gathered beforehand) with features
// f_r and targets t_r: loss = mean_r (logsumexp_v(f_r . E_v) - f_r . E_{t_r}). Each chunk's GEMM
// is followed by one kernel that folds the chunk into a running (max, sum of exp) per row (an
// online log-sum-exp) and picks up the target's logit when it falls in the chunk; a last
// kernel reduces the rows in double. Logits are fp32 GEMM outputs whatever T is.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>

namespace zo2::gpu {

namespace detail {

struct MaxSum {
  float m, l;  // running max and sum of exp(x - m)
};
struct MaxSumOp {
  __device__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.l * __expf(a.m - m) + b.l * __expf(b.m - m)};
  }
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) lse_chunk_kernel(const float* __restrict__ logits, int chunk_cols,
                                                             int chunk_begin, const std::int32_t* __restrict__ targets,
                                                             float* __restrict__ row_max, float* __restrict__ row_sum,
                                                             float* __restrict__ target_logit, bool first) {
  using Reduce = cub::BlockReduce<MaxSum, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const std::int64_t row = blockIdx.x;
  const float* x = logits + row * chunk_cols;
  MaxSum local{-INFINITY, 0.0f};
  for (int j = threadIdx.x; j < chunk_cols; j += kThreads) {
    const float v = x[j];
    if (v > local.m) {
      local.l = local.l * __expf(local.m - v) + 1.0f;
      local.m = v;
    } else {
      local.l += __expf(v - local.m);
    }
  }
  const MaxSum chunk = Reduce(temp).Reduce(local, MaxSumOp{});
  if (threadIdx.x == 0) {
    const MaxSum merged = first ? chunk : MaxSumOp{}(MaxSum{row_max[row], row_sum[row]}, chunk);
    row_max[row] = merged.m;
    row_sum[row] = merged.l;
    const int t = targets[row] - chunk_begin;
    if (t >= 0 && t < chunk_cols) target_logit[row] = x[t];
  }
}

/// loss = mean over rows of (max + log(sum) - target); log_probs[r] = target - max - log(sum).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) ce_finish_kernel(const float* __restrict__ row_max,
                                                             const float* __restrict__ row_sum,
                                                             const float* __restrict__ target_logit, int rows,
                                                             double* __restrict__ loss, float* __restrict__ log_probs) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  double total = 0.0;
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const double lse = static_cast<double>(row_max[r]) + log(static_cast<double>(row_sum[r]));
    const double nll = lse - static_cast<double>(target_logit[r]);
    total += nll;
    if (log_probs) log_probs[r] = static_cast<float>(-nll);
  }
  total = Reduce(temp).Sum(total);
  if (threadIdx.x == 0) *loss = total / static_cast<double>(rows);
}

}  // namespace detail

/// Scratch of the chunked cross entropy; grows, never shrinks.
struct CrossEntropyScratch {
  DeviceBuffer<float> chunk_logits, row_max, row_sum, target_logit;
  DeviceBuffer<double> loss;
};

/// Mean cross entropy of `rows` feature rows features[rows, width] against targets[rows], the
/// logits being features . embedding^T with embedding [vocab, width] (HF's tied LM head), the
/// vocabulary taken `chunk` columns at a time. Writes the mean to *loss_device (device double)
/// and, if log_probs is set, each row's log-probability of its target. rows must be > 0.
template <class T>
void cross_entropy_loss(Gemm& gemm, const T* features, const T* embedding, const std::int32_t* targets,
                        std::int64_t rows, std::int64_t width, std::int64_t vocab, std::int64_t chunk,
                        CrossEntropyScratch& scratch, double* loss_device, float* log_probs, cudaStream_t stream) {
  if (rows <= 0 || width <= 0 || vocab <= 0) throw ShapeError("cross_entropy_loss: rows, width and vocab must be > 0");
  if (rows > 0x7fffffff) throw ShapeError("cross_entropy_loss: too many rows");
  chunk = std::clamp<std::int64_t>(chunk, 1, vocab);
  scratch.chunk_logits.reserve(static_cast<std::size_t>(rows * chunk));
  scratch.row_max.reserve(static_cast<std::size_t>(rows));
  scratch.row_sum.reserve(static_cast<std::size_t>(rows));
  scratch.target_logit.reserve(static_cast<std::size_t>(rows));
  constexpr int kThreads = 256;
  for (std::int64_t begin = 0; begin < vocab; begin += chunk) {
    const std::int64_t cols = std::min(chunk, vocab - begin);
    GemmArgs<T, float> g;
    g.m = rows, g.n = cols, g.k = width;
    g.x = features, g.ldx = width;
    g.w = embedding + begin * width, g.ldw = width;
    g.y = scratch.chunk_logits.data(), g.ldy = cols;
    gemm.run(g, stream);
    detail::lse_chunk_kernel<kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        scratch.chunk_logits.data(), static_cast<int>(cols), static_cast<int>(begin), targets, scratch.row_max.data(),
        scratch.row_sum.data(), scratch.target_logit.data(), begin == 0);
    ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::lse_chunk_kernel");
  }
  detail::ce_finish_kernel<1024><<<1, 1024, 0, stream>>>(scratch.row_max.data(), scratch.row_sum.data(),
                                                         scratch.target_logit.data(), static_cast<int>(rows),
                                                         loss_device, log_probs);
  ZO2_CUDA_CHECK_LAUNCH("zo2::gpu::ce_finish_kernel");
}

}  // namespace zo2::gpu
