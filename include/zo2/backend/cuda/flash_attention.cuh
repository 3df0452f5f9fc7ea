// zo2/backend/cuda/flash_attention.cuh -- fused causal attention (flash-attention style) for
// 16-bit activations laid out [tokens, heads * head_dim], with HF eager semantics.
//
// Status: OPTCudaOptions::flash_attention's default since tests/cuda/test_flash_attention.cu
// passed on an H100 (2026-11-23); compute-sanitizer memcheck and racecheck clean on an H200
// (2026-12-01). This file's kernel is mma.sync (sm_80+); on Hopper, in a build for sm_90a,
// flash_causal_attention runs flash_attention_wgmma.cuh's kernel instead (FlashKernel::kAuto):
// at OPT-6.7B's shapes (seq 2048, 32 heads of 128) 307 against 266 TFLOP/s on an H200
// (bench/results/h200-2026-12-02-flash-lpt.jsonl), about 7% of a resident step.
//
// Why: attention.cuh materializes the scores [heads, seq, seq] in T, softmaxes them in place and
// multiplies by V: three passes over heads * seq^2 elements (at seq 2048, 6.7B: 0.5 ms per layer,
// 69 TFLOP/s). Here one block takes 64 queries of one head of one sequence and walks the key
// tiles that the causal mask leaves visible (tiles past the block's last query are never
// loaded), keeping a running max and sum per query row (online softmax, fp32) and the output in
// fp32 registers; scores and probabilities never leave the chip.
//
// The kernel: 4 warps, 16 query rows each, head_dim D in {64, 128}. Q, K and V tiles (64 rows)
// go to shared memory with cp.async (16 bytes per thread, rows XOR-swizzled by 16-byte chunk so
// ldmatrix reads are conflict-free); V of tile j loads while Q K_j^T runs, K of tile j+1 while
// P V_j runs. Q K^T and P V are mma.sync m16n8k16 (bf16 or fp16 in, fp32 accumulate) fed by
// ldmatrix (V through ldmatrix.trans); P goes from the score accumulators to the A operand in
// registers. Blocks run the heaviest (last) query tiles first.
//
// Semantics (as attention.cuh, HF eager): query i attends to keys j <= i with key_mask[j] = 1.
// A query with no visible key (i before the sequence's first unmasked key) gets the flat
// average of V over all seq keys: the kernel leaves its row zero (running sum 0) and
// attention_fix_masked_rows (attention.cuh) overwrites it, as the materialized path does.
//
// Numerics: scores in fp32 (the materialized path rounds them to T first), P rounded to T for
// the P V product (as every flash kernel), output rounded once. Other head dims and fp32 go to
// causal_attention (causal_attention_dispatch below).
//
// Grouped-query attention (flash_grouped_attention, grouped_attention_dispatch; AttentionDims):
// the block of query head h loads the K/V tiles of kv head h / group, with K/V's own row stride
// (Q, K and V may be column slices of one fused projection) and the output's own; heads of one
// group are neighbours in the grid, so their K/V tiles come from L2. A sliding window (window > 0
// and < seq) selects kernels built with kWindow: they hide keys j <= i - window in the tiles at
// the window's edge and start at the first key tile of the block's first query's window. Rows
// that see no key get the flat average of V (attention_fix_unseen_rows). With kv_heads == heads,
// no window and dense rows this is OPT's call: the kernels' main loops are unchanged (the K/V
// offsets precomputed with K/V's stride, Q's worked out at its one load).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <zo2/backend/cuda/attention.cuh>
#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/flash_attention_wgmma.cuh>
#include <zo2/backend/cuda/flash_tile.cuh>
#include <zo2/backend/cuda/gemm.cuh>
#include <zo2/core/error.hpp>

namespace zo2::gpu {

namespace detail {

// Blocks per SM the register allocation must allow (__launch_bounds__' second argument). 1: the
// compiler's choice (204 registers at D = 128 with sm_90a, two blocks per SM); 3 caps it at 168
// registers (a few bytes spilled) for three. Measured by bench/run_gpu.sh's flash A/B.
#ifndef ZO2_FLASH_MIN_BLOCKS
#define ZO2_FLASH_MIN_BLOCKS 1
#endif

/// Dynamic shared memory of the mma.sync kernel: one Q, one K and one V tile.
template <class T, int D>
constexpr int flash_mma_smem_bytes() {
  return (kFlashRows + 2 * kFlashKeys) * D * static_cast<int>(sizeof(T));
}

/// Element offset of 16-byte chunk c of row r in a [rows, D] tile, chunks XOR-swizzled by r % 8.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

/// Grid (heads, query tiles, batch); block 128 threads. q: [batch * seq, ld_q], k and v:
/// [batch * seq, ld_kv], out: [batch * seq, ld_out]; query head h in columns [h D, (h + 1) D) of
/// q and out, its kv head h / group in the same columns of k and v; scale_log2 = log2(e) /
/// sqrt(D). kWindow: keys j <= i - window are hidden from query i (window > 0), and key tiles
/// before the window of the block's first query are skipped.
template <class T, int D, bool kWindow>
__global__ void __launch_bounds__(kFlashThreads, ZO2_FLASH_MIN_BLOCKS) flash_attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const std::uint8_t* __restrict__ key_mask, T* __restrict__ out, int seq, int ld_q, int ld_kv, int ld_out,
    int group, int window, float scale_log2) {
  constexpr int BM = kFlashRows, BN = kFlashKeys, kChunks = D / 8, kDSteps = D / 16, kNTiles = kFlashScoreTiles,
                kOTiles = D / 8;
  extern __shared__ __align__(128) unsigned char flash_smem[];
  T* sq = reinterpret_cast<T*>(flash_smem);
  T* sk = sq + BM * D;
  T* sv = sk + BN * D;
  __shared__ alignas(16) std::uint8_t smask[2][BN];  // 1 = key visible by the padding mask and inside seq

  const int num_m_tiles = (seq + BM - 1) / BM;
  const int m_tile = num_m_tiles - 1 - static_cast<int>(blockIdx.y);  // heaviest first (launch_flash)
  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = m_tile * BM;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const std::int64_t seq_row0 = static_cast<std::int64_t>(b) * seq;
  const std::int64_t col_q = static_cast<std::int64_t>(h) * D;
  const std::int64_t col_kv = static_cast<std::int64_t>(h / group) * D;
  const std::uint8_t* mask = key_mask ? key_mask + seq_row0 : nullptr;

  // A thread always takes the same 8-element chunks i = tid + n kFlashThreads of a tile: their
  // swizzled shared-memory offsets and their offsets from a K/V tile's first element are worked
  // out once (inline, the address arithmetic cost ~230 instructions per tile and operand). The
  // Q tile, loaded once, works its offsets out as it goes.
  constexpr int kPerThread = BM * kChunks / kFlashThreads;
  static_assert(BM * kChunks % kFlashThreads == 0);
  int chunk_smem[kPerThread], chunk_global[kPerThread], chunk_row[kPerThread];
#pragma unroll
  for (int n = 0; n < kPerThread; ++n) {
    const int i = tid + n * kFlashThreads;
    const int row = i / kChunks, c = i % kChunks;
    chunk_smem[n] = swizzled<D>(row, c);
    chunk_global[n] = row * ld_kv + c * 8;
    chunk_row[n] = row;
  }
  auto load_tile = [&](T* dst, const T* src, int r0) {  // K or V rows r0 .. r0 + 63
    const T* tile = src + (seq_row0 + r0) * ld_kv + col_kv;  // r0 < seq: a valid address
    const int rows = min(seq - r0, BM);
#pragma unroll
    for (int n = 0; n < kPerThread; ++n) {
      const bool ok = chunk_row[n] < rows;
      cp_async_16(smem_addr(dst + chunk_smem[n]), ok ? tile + chunk_global[n] : tile, ok);
    }
  };
  auto load_q = [&] {
    const T* tile = q + (seq_row0 + m0) * ld_q + col_q;
    const int rows = min(seq - m0, BM);
#pragma unroll
    for (int n = 0; n < kPerThread; ++n) {
      const bool ok = chunk_row[n] < rows;
      const int c = (tid + n * kFlashThreads) % kChunks;
      cp_async_16(smem_addr(sq + chunk_smem[n]), ok ? tile + chunk_row[n] * ld_q + c * 8 : tile, ok);
    }
  };
  auto load_mask = [&](int buf, int n0) {
    if (tid < BN) {
      const int j = n0 + tid;
      smask[buf][tid] = static_cast<std::uint8_t>(j < seq && (mask == nullptr || mask[j] != 0));
    }
  };

  // BM == BN: key tiles j_first .. m_tile hold every key the block's queries may see.
  const int j_first = kWindow ? flash_first_key_tile(m0, window) : 0;
  const int n_tiles = m_tile + 1;
  load_q();
  load_tile(sk, k, j_first * BN);
  load_mask(j_first & 1, j_first * BN);
  cp_async_commit();

  std::uint32_t qf[kDSteps][4];
  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int q_row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  for (int j = j_first; j < n_tiles; ++j) {
    const int n0 = j * BN;
    cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
    if (j == j_first) {
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk)
        ldmatrix_x4(qf[kk], smem_addr(sq + swizzled<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4))));
    }
    load_tile(sv, v, n0);
    cp_async_commit();

    // S = Q K_j^T: 16 x 64 per warp, as 8 tiles of m16n8.
    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        std::uint32_t bk[4];
        const int row = np * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bk, smem_addr(sk + swizzled<D>(row, kk * 2 + ((lane >> 3) & 1))));
        mma_16816<T>(s[2 * np], qf[kk], bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], qf[kk], bk[2], bk[3]);
      }
    }
    __syncthreads();  // every warp is done with K_j
    if (j + 1 < n_tiles) {
      load_tile(sk, k, n0 + BN);
      load_mask((j + 1) & 1, n0 + BN);
    }
    cp_async_commit();

    // Mask, then the online softmax of rows g and g + 8.
    const bool diagonal = j == m_tile;
    if constexpr (kWindow) {
      // Some query of the block has its window's first key after n0: mask the window's edge too.
      const bool edge = n0 + window <= m0 + BM - 1;
      if (diagonal || edge || mask != nullptr)
        flash_mask_scores<true>(s, smask[j & 1], n0, diagonal, q_row, t4, window);
    } else {
      if (diagonal || mask != nullptr) flash_mask_scores(s, smask[j & 1], n0, diagonal, q_row, t4);
    }
    flash_online_softmax(s, o, row_max, row_sum, scale_log2);

    cp_async_wait<1>();
    __syncthreads();  // V_j landed (K_{j+1} may still be in flight)

    // O += P V_j: P (16 x 64) from the score registers, 4 steps of 16 keys.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      std::uint32_t a[4];
      flash_probabilities<T>(s, kk, a);
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        std::uint32_t bv[4];
        const int row = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(bv, smem_addr(sv + swizzled<D>(row, dp * 2 + (lane >> 4))));
        mma_16816<T>(o[2 * dp], a, bv[0], bv[1]);
        mma_16816<T>(o[2 * dp + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Normalize and store; rows with no visible key stay zero here (fixed up after the launch).
  flash_store_rows<T>(o, row_sum, q_row, seq, out + col_q, seq_row0, ld_out, t4);
}

}  // namespace detail

/// Whether the fused kernels take these arguments: T bf16 or fp16, head_dim 64 or 128, 16-byte
/// aligned q, k, v, context and row strides, and seq, heads, batch within the grid's limits
/// (dims resolved).
template <class T>
bool flash_attention_supported(const AttentionDims& d, const void* q, const void* k, const void* v,
                               const void* context) {
  if constexpr (!std::is_same_v<T, bfloat16> && !std::is_same_v<T, float16>) {
    return false;
  } else {
    auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
    constexpr std::int64_t kVec = 16 / static_cast<std::int64_t>(sizeof(T));
    return (d.head_dim == 64 || d.head_dim == 128) && aligned(q) && aligned(k) && aligned(v) && aligned(context) &&
           d.ld_q % kVec == 0 && d.ld_kv % kVec == 0 && d.ld_out % 2 == 0 && d.seq > 0 && d.seq < (1ll << 30) &&
           d.heads > 0 && d.heads <= 65535 && d.kv_heads > 0 && d.heads % d.kv_heads == 0 && d.batch > 0 &&
           d.batch <= 65535 && d.window >= 0 && d.ld_q < (1ll << 31) && d.ld_kv < (1ll << 31) &&
           d.ld_out < (1ll << 31);
  }
}

/// Whether flash_causal_attention takes these arguments: T bf16 or fp16, head_dim 64 or 128,
/// 16-byte aligned q, k, v, context, and seq, heads within the grid's limits.
template <class T>
bool flash_attention_supported(std::int64_t head_dim, std::int64_t seq, std::int64_t heads, std::int64_t batch,
                               const void* q, const void* k, const void* v, const void* context) {
  return flash_attention_supported<T>(AttentionDims::mha(batch, seq, heads, head_dim), q, k, v, context);
}

/// Which fused kernel runs: kAuto takes wgmma where the device and the build have it.
enum class FlashKernel { kAuto, kMmaSync, kWgmma };

/// "auto", "mma.sync" or "wgmma", for logs and benchmark records.
inline const char* flash_kernel_name(FlashKernel k) {
  return k == FlashKernel::kWgmma ? "wgmma" : k == FlashKernel::kMmaSync ? "mma.sync" : "auto";
}

/// Whether the current device runs an image with the wgmma kernel (Hopper, built for sm_90a).
inline bool flash_wgmma_available() { return detail::device_has_wgmma(); }

/// context = grouped-query causal attention(q, k, v) with key_mask (null: none) and dims' window,
/// as grouped_causal_attention computes it (same layout and semantics), by a fused kernel. Throws
/// if !flash_attention_supported, or if kWgmma is asked for where !flash_wgmma_available().
template <class T>
void flash_grouped_attention(const T* q, const T* k, const T* v, const std::uint8_t* key_mask, T* context,
                             const AttentionDims& dims, cudaStream_t stream, FlashKernel kernel = FlashKernel::kAuto) {
  const AttentionDims d = dims.resolved();
  d.validate("flash_causal_attention");
  if (!flash_attention_supported<T>(d, q, k, v, context))
    throw ShapeError("flash_causal_attention: needs bf16/fp16, head_dim 64 or 128 (got " + std::to_string(d.head_dim) +
                     "), 16-byte aligned buffers and row strides");
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
    bool wgmma = kernel == FlashKernel::kWgmma;
    if (kernel == FlashKernel::kAuto) wgmma = flash_wgmma_available();
    else if (wgmma && !flash_wgmma_available())
      throw Error("flash_causal_attention: the wgmma kernel needs a Hopper GPU and a build for sm_90a "
                  "(CMAKE_CUDA_ARCHITECTURES=90a)");
    // One launch per kernel family, head dim and window; the kernels share arguments, grid and block shape.
    const auto launch = [&]<int D, bool kWindow>() {
      using namespace detail;
      if (wgmma) {
        constexpr int kWG = kFlashWgmmaWarpgroups<D>, kStages = kFlashWgmmaStages;
        launch_flash<flash_attention_wgmma_kernel<T, D, kWG, kStages, kWindow>,
                     flash_wgmma_smem_bytes<D, kWG, kStages>(), kFlashRows * kWG, kFlashThreads * kWG>(
            q, k, v, key_mask, context, d, stream, "zo2::gpu::flash_attention_wgmma_kernel");
      } else {
        launch_flash<flash_attention_kernel<T, D, kWindow>, flash_mma_smem_bytes<T, D>(), kFlashRows, kFlashThreads>(
            q, k, v, key_mask, context, d, stream, "zo2::gpu::flash_attention_kernel");
      }
    };
    if (d.head_dim == 64) {
      if (d.window > 0) launch.template operator()<64, true>();
      else launch.template operator()<64, false>();
    } else {
      if (d.window > 0) launch.template operator()<128, true>();
      else launch.template operator()<128, false>();
    }
    if (key_mask) attention_fix_unseen_rows<T>(v, key_mask, context, d, stream);
  }
}

/// context = causal attention(q, k, v) with key_mask (null: none), as causal_attention computes it
/// (same layout and semantics), by a fused kernel. Throws if !flash_attention_supported, or if
/// kWgmma is asked for where !flash_wgmma_available().
template <class T>
void flash_causal_attention(const T* q, const T* k, const T* v, const std::uint8_t* key_mask, T* context,
                            std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim,
                            cudaStream_t stream, FlashKernel kernel = FlashKernel::kAuto) {
  if (batch <= 0 || seq <= 0 || heads <= 0 || head_dim <= 0)
    throw ShapeError("flash_causal_attention: batch, seq, heads and head_dim must be > 0");
  flash_grouped_attention<T>(q, k, v, key_mask, context, AttentionDims::mha(batch, seq, heads, head_dim), stream,
                             kernel);
}

/// A fused kernel (`kernel`) where one applies and `use_flash`, the materialized
/// grouped_causal_attention otherwise. Returns whether a fused kernel ran.
template <class T>
bool grouped_attention_dispatch(Gemm& gemm, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                                T* context, const AttentionDims& dims, AttentionScratch<T>& scratch,
                                cudaStream_t stream, bool use_flash = true, FlashKernel kernel = FlashKernel::kAuto) {
  const AttentionDims d = dims.resolved();
  if (use_flash && flash_attention_supported<T>(d, q, k, v, context)) {
    flash_grouped_attention<T>(q, k, v, key_mask, context, d, stream, kernel);
    return true;
  }
  grouped_causal_attention<T>(gemm, q, k, v, key_mask, context, d, scratch, stream);
  return false;
}

/// A fused kernel (`kernel`) where one applies and `use_flash`, the materialized causal_attention
/// otherwise. Returns whether a fused kernel ran.
template <class T>
bool causal_attention_dispatch(Gemm& gemm, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                               T* context, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                               std::int64_t head_dim, AttentionScratch<T>& scratch, cudaStream_t stream,
                               bool use_flash = true, FlashKernel kernel = FlashKernel::kAuto) {
  if (use_flash && flash_attention_supported<T>(head_dim, seq, heads, batch, q, k, v, context)) {
    flash_causal_attention<T>(q, k, v, key_mask, context, batch, seq, heads, head_dim, stream, kernel);
    return true;
  }
  causal_attention<T>(gemm, q, k, v, key_mask, context, batch, seq, heads, head_dim, scratch, stream);
  return false;
}

}  // namespace zo2::gpu
