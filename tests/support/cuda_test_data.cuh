// Host <-> device test data for the CUDA tests: random inputs (never zeros), uploads, downloads,
// poisoning of outputs, and the relative error against a float64 reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>

#include <zo2/backend/cuda/memory.cuh>
#include <zo2/core/half_types.hpp>

namespace zo2_test::cuda_data {

template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937& rng, double scale = 1.0, double mean = 0.0) {
  std::normal_distribution<double> d(mean, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = zo2::from_float<T>(static_cast<float>(d(rng)));
  return v;
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(zo2::to_float(v[i]));
  return r;
}

template <class T>
zo2::gpu::DeviceBuffer<T> upload(const std::vector<T>& v) {
  zo2::gpu::DeviceBuffer<T> d(v.size());
  zo2::gpu::copy_to_device_blocking(d.data(), v.data(), v.size() * sizeof(T));  // landed before any stream reads it
  return d;
}

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> v(n);
  ZO2_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

/// Fills a device buffer with NaN-pattern bytes, so an unwritten element fails the comparison.
template <class T>
void poison(T* p, std::size_t n) {
  zo2::gpu::fill_device_blocking(p, 0xff, n * sizeof(T));  // done before any stream writes p
}

/// A new device buffer of n elements, poisoned (see poison()).
template <class T>
zo2::gpu::DeviceBuffer<T> poisoned(std::size_t n) {
  zo2::gpu::DeviceBuffer<T> d(n);
  poison(d.data(), n);
  return d;
}

/// A device buffer's elements, after every stream is done.
template <class T>
std::vector<T> download(const zo2::gpu::DeviceBuffer<T>& d) {
  return download(d.data(), d.size());
}

/// ||out - ref|| / ||ref||; infinity if any output is not finite.
template <class T>
double rel_error(const std::vector<T>& out, const std::vector<double>& ref) {
  REQUIRE(out.size() == ref.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double o = static_cast<double>(zo2::to_float(out[i]));
    if (!std::isfinite(o)) return std::numeric_limits<double>::infinity();
    num += (o - ref[i]) * (o - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace zo2_test::cuda_data
