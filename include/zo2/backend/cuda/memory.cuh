// zo2/backend/cuda/memory.cuh -- RAII owners for device buffers, pinned host buffers, streams,
// events and the cuBLASLt handle. Move-only; destructors never throw.
//
// cudaFree waits for the whole device, so nothing on a step's path frees: buffers that follow a
// shape grow with reserve() (never shrink, with headroom) and are reused. device_buffer_stats()
// counts DeviceBuffer's cudaMalloc and cudaFree calls, for tests that assert a steady-state step
// allocates nothing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include <zo2/backend/cuda/check.cuh>

namespace zo2::gpu {

/// Process-wide counts of DeviceBuffer's cudaMalloc and cudaFree calls (all element types), and
/// the bytes they hold: now, and at most since the last reset_peak(). Unlike cudaMemGetInfo,
/// these see this process alone.
struct DeviceBufferStats {
  std::atomic<std::uint64_t> allocations{0}, frees{0};
  std::atomic<std::uint64_t> live_bytes{0}, peak_bytes{0};
  void reset_peak() { peak_bytes.store(live_bytes.load()); }
  void add(std::uint64_t bytes) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    const std::uint64_t now = live_bytes.fetch_add(bytes) + bytes;
    std::uint64_t peak = peak_bytes.load();
    while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
    }
  }
  void remove(std::uint64_t bytes) {
    frees.fetch_add(1, std::memory_order_relaxed);
    live_bytes.fetch_sub(bytes);
  }
};
inline DeviceBufferStats& device_buffer_stats() {
  static DeviceBufferStats stats;
  return stats;
}

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count == 0) return;
    void* p = nullptr;
    const cudaError_t s = cudaMalloc(&p, count * sizeof(T));
    if (s != cudaSuccess)
      detail::throw_cuda(s, ("cudaMalloc(" + std::to_string(count * sizeof(T)) + " bytes)").c_str(),
                         __FILE__, __LINE__);
    device_buffer_stats().add(count * sizeof(T));
    ptr_ = static_cast<T*>(p);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  T* data() const { return ptr_; }
  /// Elements allocated (the capacity: reserve() may have allocated more than it was asked for).
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  /// Ensures room for at least `count` elements; contents are not preserved when it grows. The
  /// first allocation is exact (a fixed-shape run holds no more than it needs); a buffer that
  /// grows again takes max(count, 1.5 x its size), so a shape that creeps up by a token at a
  /// time (generation) reallocates O(log n) times, not on every call. Never shrinks.
  void reserve(std::size_t count) {
    if (count <= count_) return;
    const std::size_t grown = count_ == 0 ? count : std::max(count, count_ + count_ / 2);
    release();  // before allocating: the old and the new buffer are never held together
    *this = DeviceBuffer(grown);
  }

 private:
  void release() noexcept {
    if (ptr_) {
      cudaFree(ptr_);
      device_buffer_stats().remove(count_ * sizeof(T));
    }
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// A host-to-device copy that has landed when it returns. cudaMemcpy from pageable memory may
/// return before its DMA completes, and cudaMemset before it runs; kernels on the non-blocking
/// streams the library uses do not wait for the legacy stream that carries them. So set-up copies
/// (tables, masters restored from a checkpoint) end with a device-wide wait: never on a step's path.
inline void copy_to_device_blocking(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  ZO2_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
}
/// cudaMemset that has run when it returns (as copy_to_device_blocking).
inline void fill_device_blocking(void* dst, int value, std::size_t bytes) {
  if (bytes == 0) return;
  ZO2_CUDA_CHECK(cudaMemset(dst, value, bytes));
  ZO2_CUDA_CHECK(cudaDeviceSynchronize());
}

/// Page-locked host memory: the only kind the copy engines move at full PCIe speed, and the
/// only kind cudaMemcpyAsync can overlap with compute.
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t count) : count_(count) {
    if (count == 0) return;
    void* p = nullptr;
    const cudaError_t s = cudaMallocHost(&p, count * sizeof(T));
    if (s != cudaSuccess)
      detail::throw_cuda(s, ("cudaMallocHost(" + std::to_string(count * sizeof(T)) + " bytes)").c_str(),
                         __FILE__, __LINE__);
    ptr_ = static_cast<T*>(p);
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }

  T* data() const { return ptr_; }
  std::size_t size() const { return count_; }
  T& operator[](std::size_t i) const { return ptr_[i]; }

 private:
  void release() noexcept {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
  }
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// Host memory allocated elsewhere (a mapping of POSIX shared memory) page-locked while this
/// lives (cudaHostRegister, portable: pinned for every device of the process), so the copy
/// engines move it at full PCIe rate as they do cudaMallocHost's.
class HostRegistration {
 public:
  HostRegistration() = default;
  HostRegistration(void* p, std::size_t bytes) {
    if (bytes == 0) return;
    const cudaError_t s = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
    if (s != cudaSuccess)
      detail::throw_cuda(s, ("cudaHostRegister(" + std::to_string(bytes) + " bytes)").c_str(), __FILE__, __LINE__);
    p_ = p;
  }
  HostRegistration(HostRegistration&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  HostRegistration& operator=(HostRegistration&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  ~HostRegistration() { release(); }

 private:
  void release() noexcept {
    if (p_) cudaHostUnregister(p_);
    p_ = nullptr;
  }
  void* p_ = nullptr;
};

class Stream {
 public:
  Stream() { ZO2_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      if (s_) cudaStreamDestroy(s_);
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  cudaStream_t get() const { return s_; }
  operator cudaStream_t() const { return s_; }
  void synchronize() const { ZO2_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  /// Timing events are slower to record; ordering-only events disable timing.
  explicit Event(bool timing = false) {
    ZO2_CUDA_CHECK(cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  /// An ordering event another process may wait on: cudaIpcGetEventHandle exports it, open_ipc()
  /// imports it there (not in the process that created it).
  static Event interprocess() {
    Event e(Raw{});
    ZO2_CUDA_CHECK(cudaEventCreateWithFlags(&e.e_, cudaEventDisableTiming | cudaEventInterprocess));
    return e;
  }
  /// The event another process exported (cudaIpcGetEventHandle of an interprocess() event).
  static Event open_ipc(cudaIpcEventHandle_t handle) {
    Event e(Raw{});
    ZO2_CUDA_CHECK(cudaIpcOpenEventHandle(&e.e_, handle));
    return e;
  }
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&& o) noexcept {
    if (this != &o) {
      if (e_) cudaEventDestroy(e_);
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t s) const { ZO2_CUDA_CHECK(cudaEventRecord(e_, s)); }
  /// Makes `s` wait for this event (device-side; the host does not block).
  void wait_on(cudaStream_t s) const { ZO2_CUDA_CHECK(cudaStreamWaitEvent(s, e_, 0)); }
  void synchronize() const { ZO2_CUDA_CHECK(cudaEventSynchronize(e_)); }
  /// Milliseconds from `start` to this event (both timing events, both completed).
  float elapsed_ms_since(const Event& start) const {
    float ms = 0;
    ZO2_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }

 private:
  struct Raw {};
  explicit Event(Raw) {}
  cudaEvent_t e_ = nullptr;
};

class CublasLtHandle {
 public:
  CublasLtHandle() { ZO2_CUBLAS_CHECK(cublasLtCreate(&h_)); }
  CublasLtHandle(CublasLtHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  CublasLtHandle& operator=(CublasLtHandle&& o) noexcept {
    if (this != &o) {
      if (h_) cublasLtDestroy(h_);
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  CublasLtHandle(const CublasLtHandle&) = delete;
  CublasLtHandle& operator=(const CublasLtHandle&) = delete;
  ~CublasLtHandle() {
    if (h_) cublasLtDestroy(h_);
  }
  cublasLtHandle_t get() const { return h_; }

 private:
  cublasLtHandle_t h_ = nullptr;
};

/// Copies helpers with checked status.
template <class T>
void copy_to_device(T* dst, const T* src, std::size_t count, cudaStream_t s) {
  ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyHostToDevice, s));
}
template <class T>
void copy_to_host(T* dst, const T* src, std::size_t count, cudaStream_t s) {
  ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToHost, s));
}

}  // namespace zo2::gpu
