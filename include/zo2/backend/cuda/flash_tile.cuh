// zo2/backend/cuda/flash_tile.cuh -- what both flash-attention kernels (flash_attention.cuh's
// mma.sync kernel, flash_attention_wgmma.cuh's sm_90a kernel) do to a score tile once the tensor
// cores have produced it: the causal / padding mask, the online softmax, and the final
// normalize-and-store.
//
// Both kernels give each warp 16 query rows and tiles of 64 keys, and both hold a warp's scores in
// the m16n8 accumulator layout (mma.sync's, which wgmma's m64nN accumulators repeat per warp):
// s[nt][e] is row g (e < 2) or g + 8 (e >= 2) of the warp's 16, key 8 nt + 2 t4 + (e & 1), with
// g = lane / 4 and t4 = lane % 4. The output accumulators o[ot][e] follow the same layout over
// head_dim columns.
//
// Grouped-query attention and sliding windows (the LLaMA family) reach the kernels as arguments:
// query head h reads kv head h / group, K and V rows have their own stride, the output its own,
// and kernels built with kWindow hide keys j <= i - window (flash_mask_scores<true>) and skip
// the key tiles before the window of the block's first query. kWindow = false is OPT's code.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <zo2/backend/cuda/attention_dims.cuh>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/mma_primitives.cuh>

namespace zo2::gpu::detail {

inline constexpr int kFlashRows = 64;  // queries per block (16 per warp)
inline constexpr int kFlashKeys = 64;  // keys per tile
inline constexpr int kFlashThreads = 128;
inline constexpr int kFlashScoreTiles = kFlashKeys / 8;  // m16n8 score tiles per warp and key tile

/// Sets the scores of keys the row may not see to -inf: padding (tile_mask[key_local] == 0, or
/// past seq) everywhere, keys after the query on the diagonal tile, and (kWindow) keys at or
/// before q_row - window. Off the diagonal with no padding mask and no window edge every key is
/// visible, and the caller skips this. tile_mask must be 2-byte aligned.
template <bool kWindow = false>
__device__ __forceinline__ void flash_mask_scores(float (&s)[kFlashScoreTiles][4], const std::uint8_t* tile_mask,
                                                  int n0, bool diagonal, const int (&q_row)[2], int t4,
                                                  int window = 0) {
  // Branch-free: the visibility as bitwise ands and a select per score (short-circuit && and an
  // if per score compiled to ~130 branches a tile), the two mask bytes of a key pair in one load.
#pragma unroll
  for (int nt = 0; nt < kFlashScoreTiles; ++nt) {
    const int pair_local = nt * 8 + 2 * t4;
    const unsigned pair = *reinterpret_cast<const std::uint16_t*>(tile_mask + pair_local);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = n0 + pair_local + (e & 1);
      const bool padded_in = ((pair >> (8 * (e & 1))) & 0xffu) != 0u;
      bool visible = padded_in & (!diagonal | (key <= q_row[e >> 1]));
      if constexpr (kWindow) visible = visible & (q_row[e >> 1] - key < window);
      s[nt][e] = visible ? s[nt][e] : -INFINITY;
    }
  }
}

/// The online softmax's step for rows g and g + 8 (log2 units): the running max and sum absorb
/// this tile, s is replaced by the unnormalized probabilities exp2(s scale - max), and alpha gets
/// the factor the output accumulated so far must be scaled by (flash_rescale).
__device__ __forceinline__ void flash_softmax_scores(float (&s)[kFlashScoreTiles][4], float (&row_max)[2],
                                                     float (&row_sum)[2], float scale_log2, float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int nt = 0; nt < kFlashScoreTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // Scores are raw (unscaled); scale > 0 keeps the order. A row with nothing visible yet keeps
    // max -inf: use 0 there so exp2(-inf - 0) = 0 and no inf - inf appears.
    const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
    alpha[r] = fast_exp2(row_max[r] == -INFINITY ? -INFINITY : row_max[r] * scale_log2 - m_scaled);
    row_max[r] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kFlashScoreTiles; ++nt) {
      const float p0 = fast_exp2(fmaf(s[nt][2 * r], scale_log2, -m_scaled));
      const float p1 = fast_exp2(fmaf(s[nt][2 * r + 1], scale_log2, -m_scaled));
      s[nt][2 * r] = p0;
      s[nt][2 * r + 1] = p1;
      sum += p0 + p1;
    }
    row_sum[r] = row_sum[r] * alpha[r] + sum;
  }
}

/// Scales rows g and g + 8 of the output accumulators by alpha (the new running max's correction).
template <int kOTiles>
__device__ __forceinline__ void flash_rescale(float (&o)[kOTiles][4], const float (&alpha)[2]) {
#pragma unroll
  for (int ot = 0; ot < kOTiles; ++ot) {
    o[ot][0] *= alpha[0];
    o[ot][1] *= alpha[0];
    o[ot][2] *= alpha[1];
    o[ot][3] *= alpha[1];
  }
}

/// Both: one step of the online softmax with the output rescaled at once.
template <int kOTiles>
__device__ __forceinline__ void flash_online_softmax(float (&s)[kFlashScoreTiles][4], float (&o)[kOTiles][4],
                                                     float (&row_max)[2], float (&row_sum)[2], float scale_log2) {
  float alpha[2];
  flash_softmax_scores(s, row_max, row_sum, scale_log2, alpha);
  flash_rescale(o, alpha);
}

/// The probabilities of keys 16 kk .. 16 kk + 15 as an m16k16 A operand (mma.sync's and wgmma's
/// register-A layout), rounded to T.
template <class T>
__device__ __forceinline__ void flash_probabilities(const float (&s)[kFlashScoreTiles][4], int kk,
                                                    std::uint32_t (&a)[4]) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

/// Normalizes rows g and g + 8 by their sums and stores them to out (row stride ld, this head's
/// first column at out); rows with no visible key stay zero (fixed up after the launch).
template <class T, int kOTiles>
__device__ __forceinline__ void flash_store_rows(const float (&o)[kOTiles][4], const float (&row_sum)[2],
                                                 const int (&q_row)[2], int seq, T* out, std::int64_t seq_row0,
                                                 std::int64_t ld, int t4) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int row = q_row[r];
    if (row < seq) {
      T* dst = out + (seq_row0 + row) * ld + 2 * t4;
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot)
        *reinterpret_cast<std::uint32_t*>(dst + ot * 8) = pack2<T>(o[ot][2 * r] * inv, o[ot][2 * r + 1] * inv);
    }
  }
}

/// Calls configure() the first time it is asked for `device` under `Key` (one registry per Key),
/// never again for that device: for per-device settings such as a kernel's dynamic shared memory
/// limit, which cudaFuncSetAttribute sets for the current device only. Thread-safe; a configure()
/// that throws is tried again on the next call.
template <auto Key, class Configure>
void once_per_device(int device, Configure&& configure) {
  static std::mutex mutex;
  static std::vector<bool> done;
  if (device < 0) throw Error("once_per_device: device id " + std::to_string(device) + " is negative");
  const auto d = static_cast<std::size_t>(device);
  std::lock_guard lock(mutex);
  if (d < done.size() && done[d]) return;
  configure();
  if (done.size() <= d) done.resize(d + 1, false);
  done[d] = true;
}

/// The first key tile (of kFlashKeys) a block whose first query is m0 must visit under a window
/// (0 without one): earlier tiles hold no key any of its queries may see.
__device__ __forceinline__ int flash_first_key_tile(int m0, int window) {
  return window > 0 && m0 - window + 1 > 0 ? (m0 - window + 1) / kFlashKeys : 0;
}

/// Launches a flash kernel (both take the same arguments) over grid (heads, query tiles of kRows,
/// batch) with kThreads per block and kSmem bytes of dynamic shared memory (the limit raised once
/// per kernel and device), for resolved, validated dims. Heads vary fastest and a kernel takes
/// query tile num_tiles - 1 - blockIdx.y, so blocks start in order of decreasing causal work
/// across all heads (longest first): the last wave holds the shortest tiles, not one head's mix
/// of long and short. The heads of one kv group are neighbours in the grid, so their blocks read
/// the group's K/V tiles at about the same time (from L2).
template <auto Kernel, int kSmem, int kRows, int kThreads, class T>
void launch_flash(const T* q, const T* k, const T* v, const std::uint8_t* key_mask, T* context,
                  const AttentionDims& d, cudaStream_t stream, const char* name) {
  int device = 0;
  ZO2_CUDA_CHECK(cudaGetDevice(&device));
  once_per_device<Kernel>(device, [] {
    ZO2_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  });
  const std::int64_t tiles = (d.seq + kRows - 1) / kRows;
  if (tiles > 65535 || d.batch > 65535) throw ShapeError("flash attention: sequence or batch too large for one launch");
  const dim3 grid(static_cast<unsigned>(d.heads), static_cast<unsigned>(tiles), static_cast<unsigned>(d.batch));
  const float scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(d.head_dim)));
  Kernel<<<grid, kThreads, kSmem, stream>>>(q, k, v, key_mask, context, static_cast<int>(d.seq),
                                            static_cast<int>(d.ld_q), static_cast<int>(d.ld_kv),
                                            static_cast<int>(d.ld_out), static_cast<int>(d.group()),
                                            static_cast<int>(d.window), scale_log2);
  const cudaError_t launched = cudaPeekAtLastError();
  if (launched != cudaSuccess) throw_cuda(launched, name, __FILE__, __LINE__);
}

}  // namespace zo2::gpu::detail
