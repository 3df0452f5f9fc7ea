// ZO2_CUDA_CHECK_LAUNCH names the kernel whose launch failed, and once_per_device (the flash
// kernels' shared-memory limit) configures each device once, not the process once. Neither
// needs a GPU: without one, the launch fails all the same.
#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/flash_tile.cuh>

namespace {

__global__ void tagged_noop_kernel(int* out) {
  if (out) *out = 1;
}

}  // namespace

TEST_CASE("a failed launch is a CudaError naming the kernel") {
  // 4096 threads per block is beyond every device's limit; without a device the launch fails too.
  tagged_noop_kernel<<<1, 4096>>>(nullptr);
  CHECK_THROWS_WITH_AS(ZO2_CUDA_CHECK_LAUNCH("zo2_test::tagged_noop_kernel"),
                       doctest::Contains("launch of zo2_test::tagged_noop_kernel failed"), zo2::gpu::CudaError);
  cudaGetLastError();  // clear it
  const std::string name = "kernel named at run time";
  tagged_noop_kernel<<<1, 4096>>>(nullptr);
  CHECK_THROWS_WITH_AS(ZO2_CUDA_CHECK_LAUNCH(name), doctest::Contains("kernel named at run time"), zo2::gpu::CudaError);
  cudaGetLastError();
}

TEST_CASE("once_per_device configures each device once per key") {
  int calls = 0;
  auto configure = [&] { ++calls; };
  for (int device : {0, 0, 1, 0, 3, 1, 3}) zo2::gpu::detail::once_per_device<1>(device, configure);
  CHECK(calls == 3);  // devices 0, 1, 3
  zo2::gpu::detail::once_per_device<2>(0, configure);  // another key: its own registry
  CHECK(calls == 4);
  // A configure() that throws is tried again.
  int tries = 0;
  auto failing_once = [&] {
    if (++tries == 1) throw std::runtime_error("not yet");
  };
  CHECK_THROWS(zo2::gpu::detail::once_per_device<3>(5, failing_once));
  zo2::gpu::detail::once_per_device<3>(5, failing_once);
  zo2::gpu::detail::once_per_device<3>(5, failing_once);
  CHECK(tries == 2);
  CHECK_THROWS_AS(zo2::gpu::detail::once_per_device<3>(-1, configure), zo2::Error);
}
