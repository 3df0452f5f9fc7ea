// bench/bench_cuda.cuh -- what the CUDA benchmarks share: random fills on the device, event
// timing, the bf16 GEMM rate (the compute floor's rate), pinned PCIe bandwidth (the PCIe floor's),
// and device memory as the device sees it (cudaMemGetInfo, and NVML through dlopen when the
// driver's libnvidia-ml.so.1 is there).
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/backend/cuda/memory.cuh>

#include "bench_util.hpp"

namespace zo2_bench {

namespace zcuda = zo2::gpu;

__host__ __device__ inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// center + uniform(-half_width, half_width), a pure function of (seed, i): the same on host
/// and device.
__host__ __device__ inline float uniform_value(std::uint64_t seed, std::uint64_t i, float center, float half_width) {
  const std::uint64_t r = mix64(seed * 0x100000001b3ull + i);
  const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return center + half_width * (2.0f * u - 1.0f);
}

template <class T>
__global__ void fill_uniform_kernel(T* p, std::size_t n, std::uint64_t seed, float center, float half_width) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    p[i] = zcuda::st_from_f32<T>(uniform_value(seed, i, center, half_width));
}

template <class T>
void fill_uniform(T* p, std::size_t n, std::uint64_t seed, float center, float half_width, cudaStream_t s) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 132 * 16));
  fill_uniform_kernel<T><<<blocks, 256, 0, s>>>(p, n, seed, center, half_width);
  ZO2_CUDA_CHECK_LAUNCH("fill_uniform");
}

/// OPT-like initial values for a tensor named `name`: LayerNorm and RMSNorm weights 1 +- 0.05
/// (OPT's "*layer_norm.weight"; the LLaMA family's "*layernorm.weight", "norm.weight",
/// "q_norm.weight", "k_norm.weight"), biases +- 0.01, everything else uniform with std 0.02
/// (OPT's init, and LLaMA's initializer_range): {center, half_width}.
inline std::pair<float, float> init_range(const std::string& name) {
  const auto ends_with = [&](const char* tail) {
    const std::size_t n = std::strlen(tail);
    return name.size() >= n && name.compare(name.size() - n, n, tail) == 0;
  };
  const bool ln_weight = name.find("layer_norm.weight") != std::string::npos || ends_with("norm.weight");
  const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
  if (ln_weight) return {1.0f, 0.05f};
  if (bias) return {0.0f, 0.01f};
  return {0.0f, 0.0346f};  // 0.02 * sqrt(3)
}

/// Median milliseconds of `fn` (enqueueing work on `s`) over `reps`, after `warmup` calls.
template <class F>
double time_ms(cudaStream_t s, int warmup, int reps, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  zcuda::Event a(true), b(true);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    a.record(s);
    fn();
    b.record(s);
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a));
  }
  return median(t);
}

struct GemmRate {
  std::int64_t n = 0;
  double ms = 0, tflops = 0;  // a burst of 12 products (~20 ms): what the compute floor uses
  // After `sustain_s` of back-to-back products: the rate the GPU holds once its power limit
  // (700 W on an H200) has pulled the clocks down -- where a long run's forwards actually are.
  double sustain_s = 0, sustained_ms = 0, sustained_tflops = 0;
};

/// A large square bf16 GEMM through zo2's own cuBLASLt wrapper: the rate the compute floor uses.
inline GemmRate measure_gemm_rate(cudaStream_t s, int autotune = 0, double sustain_s = 0, std::int64_t n = 8192) {
  // Several operand sets, so repeated runs do not measure one buffer's cache residency.
  constexpr int kSets = 3;
  std::vector<zcuda::DeviceBuffer<zo2::bfloat16>> x, w, y;
  for (int i = 0; i < kSets; ++i) {
    x.emplace_back(n * n), w.emplace_back(n * n), y.emplace_back(n * n);
    fill_uniform(x[i].data(), n * n, 100 + i, 0.0f, 1.0f, s);
    fill_uniform(w[i].data(), n * n, 200 + i, 0.0f, 1.0f, s);
  }
  zcuda::Gemm gemm;
  gemm.set_autotune(autotune);
  int k = 0;
  const auto product = [&] {
    gemm.linear<zo2::bfloat16>(x[k % kSets].data(), w[k % kSets].data(), nullptr, y[k % kSets].data(), n, n, n, s);
    ++k;
  };
  const auto tflops = [&](double ms) { return 2.0 * n * n * n / (ms * 1e-3) / 1e12; };
  GemmRate r;
  r.n = n;
  r.ms = time_ms(s, 3, 12, product);
  r.tflops = tflops(r.ms);
  if (sustain_s > 0) {
    // Products back to back for sustain_s (no host sync in between, so no idle gap lets the
    // clocks recover), then 12 more timed one by one, as the burst.
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < sustain_s) {
      for (int i = 0; i < 20; ++i) product();
      ZO2_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    r.sustain_s = sustain_s;
    r.sustained_ms = time_ms(s, 0, 12, product);
    r.sustained_tflops = tflops(r.sustained_ms);
  }
  return r;
}

/// Pinned host <-> device bandwidth in GB/s (1e9 B/s): each direction alone, and both at once
/// (the offloaded step uploads the next block while writing the previous one back).
struct Bandwidth {
  double h2d = 0, d2h = 0, bidir_h2d = 0, bidir_d2h = 0;
};

inline Bandwidth measure_pinned_bandwidth(std::size_t bytes = std::size_t{512} << 20) {
  zcuda::PinnedBuffer<unsigned char> host_a(bytes), host_b(bytes);
  std::memset(host_a.data(), 1, bytes);
  std::memset(host_b.data(), 2, bytes);
  zcuda::DeviceBuffer<unsigned char> dev_a(bytes), dev_b(bytes);
  zcuda::Stream s1, s2;
  zcuda::Event e0(true), e1(true), e2(true), e3(true);
  Bandwidth bw;
  // The best of several trials: one run on 2026-12-02 measured 43 GB/s concurrent H2D at its
  // start where the day's other runs measured 51-52 and its own steps moved 47 GB/s.
  constexpr int kTrials = 8;
  const auto one_way = [&](cudaMemcpyKind kind) {
    double best = 0;
    for (int r = 0; r < kTrials; ++r) {
      e0.record(s1);
      if (kind == cudaMemcpyHostToDevice) ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, kind, s1));
      else ZO2_CUDA_CHECK(cudaMemcpyAsync(host_a.data(), dev_a.data(), bytes, kind, s1));
      e1.record(s1);
      e1.synchronize();
      best = std::max(best, bytes / (e1.elapsed_ms_since(e0) * 1e-3) / 1e9);
    }
    return best;
  };
  bw.h2d = one_way(cudaMemcpyHostToDevice);
  bw.d2h = one_way(cudaMemcpyDeviceToHost);
  for (int r = 0; r < kTrials; ++r) {
    e0.record(s1);
    e0.wait_on(s2);
    e2.record(s2);
    ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, cudaMemcpyHostToDevice, s1));
    ZO2_CUDA_CHECK(cudaMemcpyAsync(host_b.data(), dev_b.data(), bytes, cudaMemcpyDeviceToHost, s2));
    e1.record(s1);
    e3.record(s2);
    e1.synchronize();
    e3.synchronize();
    bw.bidir_h2d = std::max(bw.bidir_h2d, bytes / (e1.elapsed_ms_since(e0) * 1e-3) / 1e9);
    bw.bidir_d2h = std::max(bw.bidir_d2h, bytes / (e3.elapsed_ms_since(e2) * 1e-3) / 1e9);
  }
  return bw;
}

/// Device memory in use as the device reports it: cudaMemGetInfo (total - free: every process
/// and the driver's own reservations on this GPU), and NVML's `used` when the driver library
/// loads (dlopen, so the program needs no NVML at build time).
class DeviceMemoryProbe {
 public:
  explicit DeviceMemoryProbe(int device) {
    handle_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!handle_) return;
    init_ = reinterpret_cast<int (*)()>(dlsym(handle_, "nvmlInit_v2"));
    by_bus_ = reinterpret_cast<int (*)(const char*, void**)>(dlsym(handle_, "nvmlDeviceGetHandleByPciBusId_v2"));
    mem_info_ = reinterpret_cast<int (*)(void*, NvmlMemory*)>(dlsym(handle_, "nvmlDeviceGetMemoryInfo"));
    shutdown_ = reinterpret_cast<int (*)()>(dlsym(handle_, "nvmlShutdown"));
    char bus[64] = {};
    if (!init_ || !by_bus_ || !mem_info_ || init_() != 0) return;
    initialized_ = true;
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess) return;
    if (by_bus_(bus, &device_) != 0) device_ = nullptr;
  }
  ~DeviceMemoryProbe() {
    if (initialized_ && shutdown_) shutdown_();
    if (handle_) dlclose(handle_);
  }
  DeviceMemoryProbe(const DeviceMemoryProbe&) = delete;
  DeviceMemoryProbe& operator=(const DeviceMemoryProbe&) = delete;

  bool nvml_available() const { return device_ != nullptr; }
  /// total - free from cudaMemGetInfo.
  std::size_t cuda_used() const {
    std::size_t free_b = 0, total_b = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return total_b - free_b;
  }
  /// NVML's used bytes, or 0 when NVML is not available.
  std::size_t nvml_used() const {
    if (!device_) return 0;
    NvmlMemory m{};
    return mem_info_(device_, &m) == 0 ? static_cast<std::size_t>(m.used) : 0;
  }

 private:
  struct NvmlMemory {
    unsigned long long total, free, used;
  };
  void* handle_ = nullptr;
  void* device_ = nullptr;
  bool initialized_ = false;
  int (*init_)() = nullptr;
  int (*by_bus_)(const char*, void**) = nullptr;
  int (*mem_info_)(void*, NvmlMemory*) = nullptr;
  int (*shutdown_)() = nullptr;
};

}  // namespace zo2_bench
