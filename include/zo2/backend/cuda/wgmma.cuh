// zo2/backend/cuda/wgmma.cuh -- Hopper's warpgroup matrix multiply (wgmma, sm_90a only): the
// shared-memory matrix descriptor, the fences and waits around the asynchronous MMAs, the two
// m64n64k16 forms the flash kernel issues (A and B from shared memory; A from registers with B
// transposed), and a run-time probe for whether the running image has them.
//
// Compiled for anything but sm_90a (compute_90a), the wrappers are empty and
// device_has_wgmma() says false: callers must check it before launching a kernel that uses them.
// Build with CMAKE_CUDA_ARCHITECTURES=90a (nvcc -gencode=arch=compute_90a,code=sm_90a) to get them.
//
// Shared-memory layout the descriptors below describe (the "128-byte swizzle" canonical layout):
// a tile of rows of 64 16-bit elements (128 bytes), 8-row groups of 1024 bytes one after the
// other, the tile 1024-byte aligned, and the 16-byte chunk c of row r stored at chunk c ^ (r % 8).
// A K-major operand (Q, K: the reduction dimension contiguous) steps through its 64 columns by
// adding 32 bytes (16 elements) to the start address; an MN-major operand (V in P V: the output
// dimension contiguous) steps through K by whole 8-row groups.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/core/half_types.hpp>

#if defined(__CUDA_ARCH__) && (defined(__CUDA_ARCH_FEAT_SM90_ALL) || \
                               (defined(__CUDA_ARCH_SPECIFIC__) && __CUDA_ARCH_SPECIFIC__ == 900))
#define ZO2_DEVICE_WGMMA 1
#else
#define ZO2_DEVICE_WGMMA 0
#endif

namespace zo2::gpu::detail {

inline constexpr std::uint32_t kSwizzleAtomBytes = 1024;  // 8 rows of 128 bytes

/// Descriptor of a 128-byte-swizzled operand starting at shared address `addr`; `sbo`: bytes from
/// one 8-row group to the next; `lbo`: bytes from one 64-column atom to the next along MN (only
/// read for MN-major operands wider than 64).
__device__ __forceinline__ std::uint64_t wgmma_desc_sw128(std::uint32_t addr, std::uint32_t lbo = 1024,
                                                          std::uint32_t sbo = 1024) {
  std::uint64_t d = 0;
  d |= static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<std::uint64_t>((lbo & 0x3FFFF) >> 4) << 16;
  d |= static_cast<std::uint64_t>((sbo & 0x3FFFF) >> 4) << 32;
  d |= 1ull << 62;  // 128-byte swizzle; base offset 0 (atoms 1024-byte aligned)
  return d;
}

/// The descriptor of the same operand layout offset_bytes further on (a multiple of 16): the start
/// address is the descriptor's low 14 bits in 16-byte units, and a shared address stays below
/// 2^18 bytes, so the add never carries out of that field. Cheaper than building it anew.
__device__ __forceinline__ std::uint64_t wgmma_desc_advance(std::uint64_t desc, std::uint32_t offset_bytes) {
  return desc + (offset_bytes >> 4);
}

/// Orders this thread's earlier register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void wgmma_fence() {
#if ZO2_DEVICE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if ZO2_DEVICE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
/// Waits until at most N committed wgmma groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if ZO2_DEVICE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/// Shared memory written through the generic proxy (st.shared, cp.async) made visible to the
/// async proxy (wgmma's operand reads); each writing thread, before the barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if ZO2_DEVICE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// Keeps the compiler from moving reads or writes of these registers across an in-flight wgmma
/// (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operand(std::uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

#define ZO2_WGMMA_ACC32(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

/// d (+)= A B, 64 x 64 x 16: A (64 x 16, K-major) and B (16 x 64, K-major) in shared memory;
/// accumulate = false overwrites d. d: this warp's 16 rows in the m16n8 accumulator layout.
template <class T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], std::uint64_t desc_a, std::uint64_t desc_b,
                                                   bool accumulate) {
#if ZO2_DEVICE_WGMMA
  const int scale_d = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : ZO2_WGMMA_ACC32(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : ZO2_WGMMA_ACC32(d)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
#endif
}

/// d += A B, 64 x 64 x 16: A from registers (this warp's 16 x 16 in mma.sync's A layout), B (16 x
/// 64) in shared memory MN-major (the 64 output columns contiguous: transposed).
template <class T>
__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[8][4], const std::uint32_t (&a)[4],
                                                      std::uint64_t desc_b) {
#if ZO2_DEVICE_WGMMA
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ZO2_WGMMA_ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ZO2_WGMMA_ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
#else
  (void)d, (void)a, (void)desc_b;
#endif
}

#undef ZO2_WGMMA_ACC32

template <int = 0>
__global__ void wgmma_probe_kernel(int* has) {
  *has = ZO2_DEVICE_WGMMA;
}

/// Whether the image the current device runs was compiled with wgmma (sm_90a), asked once per
/// device by a one-thread kernel (threads racing on the first call both ask; same answer).
inline bool device_has_wgmma() {
  static std::atomic<int> cached[64];  // 0: not asked yet, 1: no, 2: yes
  int dev = 0;
  ZO2_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) return false;
  if (cached[dev].load(std::memory_order_acquire) == 0) {
    int* flag = nullptr;
    ZO2_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
    int has = 0;
    wgmma_probe_kernel<><<<1, 1>>>(flag);
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemcpy(&has, flag, sizeof(int), cudaMemcpyDeviceToHost);
    const cudaError_t freed = cudaFree(flag);
    ZO2_CUDA_CHECK(err);
    ZO2_CUDA_CHECK(freed);
    cached[dev].store(has ? 2 : 1, std::memory_order_release);
  }
  return cached[dev].load(std::memory_order_acquire) == 2;
}

}  // namespace zo2::gpu::detail
