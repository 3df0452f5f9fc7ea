// zo2/offload/link_probe.cuh -- a quick measurement of the pinned host <-> device link, for a
// program that lets the offload plan pick the write-back interval (OffloadOptions::writeback_every
// = 0 with OffloadOptions::link = measure_link()). The same measurement as zo2_bench's
// (bench/bench_cuda.cuh measure_pinned_bandwidth), smaller: host-to-device alone, and
// host-to-device while a device-to-host copy of the same size runs; the best of a few trials.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/memory.cuh>
#include <zo2/offload/writeback_log.hpp>

namespace zo2::gpu {

/// One-way and duplex host-to-device bandwidth (GB/s) over `bytes` per copy (~0.1 s at 64 MiB,
/// `trials` of each; the device and pinned buffers are freed before it returns).
inline offload::LinkHint measure_link(std::size_t bytes = std::size_t{64} << 20, int trials = 4) {
  PinnedBuffer<unsigned char> up(bytes), down(bytes);
  std::memset(up.data(), 1, bytes);
  DeviceBuffer<unsigned char> dev_up(bytes), dev_down(bytes);
  fill_device_blocking(dev_down.data(), 2, bytes);
  Stream h2d, d2h;
  Event start(true), up_done(true), down_done(true);
  offload::LinkHint link;
  const auto gbps = [&](const Event& stop) { return static_cast<double>(bytes) / (stop.elapsed_ms_since(start) * 1e-3) / 1e9; };
  for (int r = 0; r < trials; ++r) {
    start.record(h2d.get());
    ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_up.data(), up.data(), bytes, cudaMemcpyHostToDevice, h2d.get()));
    up_done.record(h2d.get());
    up_done.synchronize();
    link.one_way_gbps = std::max(link.one_way_gbps, gbps(up_done));
  }
  for (int r = 0; r < trials; ++r) {
    start.record(h2d.get());
    start.wait_on(d2h.get());
    ZO2_CUDA_CHECK(cudaMemcpyAsync(dev_up.data(), up.data(), bytes, cudaMemcpyHostToDevice, h2d.get()));
    ZO2_CUDA_CHECK(cudaMemcpyAsync(down.data(), dev_down.data(), bytes, cudaMemcpyDeviceToHost, d2h.get()));
    up_done.record(h2d.get());
    down_done.record(d2h.get());
    up_done.synchronize();
    down_done.synchronize();
    link.duplex_gbps = std::max(link.duplex_gbps, gbps(up_done));
  }
  return link;
}

}  // namespace zo2::gpu
