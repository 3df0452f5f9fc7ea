// zo2/backend/cuda/flash_attention_wgmma.cuh -- the flash-attention kernel on Hopper's warpgroup
// MMA (wgmma, sm_90a): the same semantics and the same per-warp tiles as flash_attention.cuh's
// mma.sync kernel (that file's header says what is computed), with the two products on wgmma and
// kWG warpgroups sharing each K/V tile.
//
// Why, and what was measured (H200, seq 2048, bf16; bench/results/h200-2026-12-02-flash-wgmma.jsonl):
// the mma.sync kernel runs at ~175 TFLOP/s at OPT-6.7B's shape. The same tiles on wgmma (one
// warpgroup, 64 queries per block) ran no faster (172). Sharing each K/V tile among kWG
// warpgroups, which cuts the K/V traffic from L2 per query by kWG, gave 194-205 (two) and
// 210-224 (three) at head_dim 128. Keeping S_j and P_{j-1} V_{j-1} in flight together so that the
// softmax overlaps the tensor cores helped only once no wgmma sat under a data-dependent branch:
// with one, ptxas serialized every wgmma (its warning C7514) and the rate fell to 177-185.
// The SASS says the loop is issue-bound on overhead (~1500 instructions a tile: cp.async address
// arithmetic ~470, descriptor rebuilds ~145, the mask's branches ~130): that first, then what
// FlashAttention-3 adds and this kernel does not (producer warps with TMA, ping-pong scheduling
// of the warpgroups' softmax against each other's GEMMs, 128-key tiles).
//
// The kernel: kWG x 128 threads, 64 kWG queries per block, 64-key tiles, head_dim D in {64, 128}.
// Q, K and V tiles sit in shared memory in wgmma's 128-byte-swizzled layout (wgmma.cuh), split
// into D / 64 column halves of 64 rows x 128 bytes, loaded by cp.async with every thread of the
// block taking part, into a ring of kStages K/V stages. One barrier per key tile j: after it,
// tile j is resident for every thread, every warpgroup is done with tile j - 2, and tile
// j + kStages - 2 starts loading into the stage tile j - 2 held. Each warpgroup then issues
// S_j = Q K_j^T (m64n64k16 x D / 16, both operands in shared memory) and P_{j-1} V_{j-1}
// (m64n64k16 per 64 columns of D, P from registers, V MN-major), waits for S_j, masks it and runs
// the softmax step while P V finishes, then rescales O and turns S_j into P_j. Every warpgroup
// issues the same sequence: tiles past a warpgroup's own diagonal are computed too, their keys
// all hidden by the causal mask (P = 0, the running max unchanged), so no wgmma is under a
// branch.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <zo2/backend/cuda/check.cuh>
#include <zo2/backend/cuda/flash_tile.cuh>
#include <zo2/backend/cuda/wgmma.cuh>

namespace zo2::gpu::detail {

inline constexpr int kWgmmaTileHalfBytes = kFlashRows * 128;  // 64 rows x 64 columns of 16 bits

/// The wgmma kernel's shape, measured on an H200 at OPT's shapes (seq 2048, bf16; bench/results/
/// h200-2026-12-02-flash-wgmma.jsonl): three warpgroups per block at head_dim 128 (207 TFLOP/s at
/// 32 heads against 201 with two), two at 64 (163 against 142 with three), three K/V stages (four
/// measured the same).
template <int D>
inline constexpr int kFlashWgmmaWarpgroups = D == 128 ? 3 : 2;
inline constexpr int kFlashWgmmaStages = 3;

/// Dynamic shared memory of the wgmma kernel: kWG Q tiles, kStages K and V tiles, 1 KB to align.
template <int D, int kWG, int kStages>
constexpr int flash_wgmma_smem_bytes() {
  return (kWG + 2 * kStages) * (D / 64) * kWgmmaTileHalfBytes + static_cast<int>(kSwizzleAtomBytes);
}

/// Grid (heads, query tiles of 64 kWG, batch); block 128 kWG threads. Arguments (grouped heads,
/// strides, the window) as flash_attention_kernel's.
template <class T, int D, int kWG, int kStages, bool kWindow>
__global__ void __launch_bounds__(kFlashThreads* kWG, 1) flash_attention_wgmma_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const std::uint8_t* __restrict__ key_mask, T* __restrict__ out, int seq, int ld_q, int ld_kv, int ld_out,
    int group, int window, float scale_log2) {
#if ZO2_DEVICE_WGMMA
  constexpr int BM = kFlashRows * kWG, BN = kFlashKeys, kThreads = kFlashThreads * kWG, kChunks = D / 8,
                kHalves = D / 64, kDSteps = D / 16, kOTiles = D / 8;
  constexpr std::uint32_t kTile = kHalves * kWgmmaTileHalfBytes;  // one 64-row tile
  static_assert(kStages >= 3, "the ring needs two stages in use (S_j, P V_{j-1}) and one loading");
  extern __shared__ unsigned char flash_wgmma_smem[];
  __shared__ alignas(16) std::uint8_t smask[kStages][BN];  // 1 = key visible by the padding mask and inside seq
  const std::uint32_t base = (smem_addr(flash_wgmma_smem) + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1);
  const auto sk = [&](int stage) { return base + (kWG + stage) * kTile; };
  const auto sv = [&](int stage) { return base + (kWG + kStages + stage) * kTile; };

  const int num_blocks_m = (seq + BM - 1) / BM;
  const int m_block = num_blocks_m - 1 - static_cast<int>(blockIdx.y);  // heaviest first (launch_flash)
  const int h = blockIdx.x, b = blockIdx.z;
  const int m0 = m_block * BM;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const std::int64_t seq_row0 = static_cast<std::int64_t>(b) * seq;
  const std::int64_t col_q = static_cast<std::int64_t>(h) * D;
  const std::int64_t col_kv = static_cast<std::int64_t>(h / group) * D;
  const std::uint8_t* mask = key_mask ? key_mask + seq_row0 : nullptr;
  const std::uint32_t sq = base + wg * kTile;  // this warpgroup's 64 queries
  const int my_tile = m0 / BN + wg;            // its diagonal key tile (BN == 64 == its rows)
  // Descriptors of this warpgroup's Q, and of stage 0's K and V; every operand is an advance.
  const std::uint64_t desc_q = wgmma_desc_sw128(sq), desc_k = wgmma_desc_sw128(sk(0)),
                      desc_v = wgmma_desc_sw128(sv(0));

  // Rows r0 .. r0 + 63 of src into the swizzled tile at dst: chunk c (8 elements) of row r goes to
  // column half c / 8, chunk (c % 8) ^ (r % 8) of that half's row r. A thread always takes the
  // same chunks i = tid + n kThreads of a tile, so their shared-memory offsets and their offsets
  // from a K/V tile's first element are worked out once here: the per-tile work is an add and a
  // bounds test per chunk (the address arithmetic inline cost ~470 instructions a tile). The Q
  // tiles, loaded once, work their offsets out as they go.
  constexpr int kTileChunks = kFlashRows * kChunks;
  constexpr int kPerThread = (kTileChunks + kThreads - 1) / kThreads;
  std::uint32_t chunk_smem[kPerThread];
  int chunk_global[kPerThread], chunk_row[kPerThread];
#pragma unroll
  for (int n = 0; n < kPerThread; ++n) {
    const int i = tid + n * kThreads;
    const int row = i / kChunks, c = i % kChunks;
    chunk_smem[n] = (c >> 3) * kWgmmaTileHalfBytes + row * 128 + (((c & 7) ^ (row & 7)) << 4);
    chunk_global[n] = row * ld_kv + c * 8;
    chunk_row[n] = i < kTileChunks ? row : kFlashRows;  // kFlashRows: not a chunk of the tile
  }
  auto load_tile = [&](std::uint32_t dst, const T* src, int r0) {  // K or V rows r0 .. r0 + 63
    const T* tile = src + (seq_row0 + r0) * ld_kv + col_kv;  // r0 < seq: a valid address
    const int rows = min(seq - r0, kFlashRows);
#pragma unroll
    for (int n = 0; n < kPerThread; ++n) {
      if (kTileChunks % kThreads != 0 && chunk_row[n] == kFlashRows) continue;
      const bool ok = chunk_row[n] < rows;
      cp_async_16(dst + chunk_smem[n], ok ? tile + chunk_global[n] : tile, ok);
    }
  };
  auto load_q = [&](std::uint32_t dst, int r0) {  // Q rows r0 .. r0 + 63 (r0 may be past seq: nothing read)
    const T* tile = q + (seq_row0 + r0) * ld_q + col_q;
    const int rows = min(seq - r0, kFlashRows);
#pragma unroll
    for (int n = 0; n < kPerThread; ++n) {
      if (kTileChunks % kThreads != 0 && chunk_row[n] == kFlashRows) continue;
      const bool ok = chunk_row[n] < rows;
      const int c = (tid + n * kThreads) % kChunks;
      cp_async_16(dst + chunk_smem[n], ok ? tile + chunk_row[n] * ld_q + c * 8 : tile, ok);
    }
  };
  // Key tiles j_first, j_first + 1, ... hold every key a query of the block may see: the first
  // one holds its first query's window start (kWindow; 0 otherwise), the last its last query.
  const int j_first = kWindow ? flash_first_key_tile(m0, window) : 0;
  // Key tile j_first + t (K, V and its mask) into stage t % kStages.
  auto load_keys = [&](int t) {
    const int stage = t % kStages, n0 = (j_first + t) * BN;
    load_tile(sk(stage), k, n0);
    load_tile(sv(stage), v, n0);
    if (tid < BN) {
      const int key = n0 + tid;
      smask[stage][tid] = static_cast<std::uint8_t>(key < seq && (mask == nullptr || mask[key] != 0));
    }
  };

  const int n_tiles = (min(m0 + BM, seq) - 1) / BN + 1 - j_first;  // tiles visited, from j_first
  // cp.async groups, one per key tile (maybe empty past the last): {Q, tile 0}, {tile 1}, ...;
  // loads run kStages - 2 tiles ahead (tile t's stage is busy until P V_t, issued at tile t + 1).
  // Tile indices t below count from j_first.
#pragma unroll
  for (int w = 0; w < kWG; ++w) load_q(base + w * kTile, m0 + w * kFlashRows);
#pragma unroll
  for (int j = 0; j < kStages - 2; ++j) {
    if (j < n_tiles) load_keys(j);
    cp_async_commit();
  }

  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int q_row[2] = {m0 + wg * kFlashRows + warp * 16 + g, m0 + wg * kFlashRows + warp * 16 + g + 8};
  std::uint32_t p[BN / 16][4];  // P_{j-1}: the A operand of the P V product issued at tile j
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) p[kk][0] = p[kk][1] = p[kk][2] = p[kk][3] = 0u;

  // O += P_{j-1} V_{j-1}, asynchronously: 4 steps of 16 keys, each D / 64 wgmmas of 64 columns.
  auto issue_pv = [&](int stage) {
    wgmma_fence_operand(o);
    wgmma_fence_operand(p);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int hf = 0; hf < kHalves; ++hf)
        wgmma_m64n64k16_rs_tb<T>(*reinterpret_cast<float(*)[8][4]>(&o[hf * 8]), p[kk],
                                 wgmma_desc_advance(desc_v, stage * kTile + hf * kWgmmaTileHalfBytes + kk * 2048));
    wgmma_commit();
  };

  // Tile j's barrier: tile j (and Q) landed for every thread, every warpgroup is done with tile
  // j - 2, whose stage starts loading tile j + kStages - 2.
  auto next_tile = [&](int j) {
    cp_async_wait<kStages - 3>();
    fence_proxy_async_shared();
    __syncthreads();
    if (j + kStages - 2 < n_tiles) load_keys(j + kStages - 2);
    cp_async_commit();
  };
  float s[kFlashScoreTiles][4];
  auto issue_s = [&](int stage) {
    wgmma_fence_operand(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) {
      const std::uint32_t off = (kk >> 2) * kWgmmaTileHalfBytes + (kk & 3) * 32;
      wgmma_m64n64k16_ss<T>(s, wgmma_desc_advance(desc_q, off), wgmma_desc_advance(desc_k, stage * kTile + off),
                            kk > 0);
    }
    wgmma_commit();
  };
  // Mask S_j (the causal mask from this warpgroup's diagonal on: a tile past it hides every key,
  // so its P is 0 and it changes nothing; kWindow: the window's edge likewise) and run the online
  // softmax step on it. t counts from j_first.
  auto softmax = [&](int t, float (&alpha)[2]) {
    const int j = j_first + t;
    const bool causal = j >= my_tile;
    if constexpr (kWindow) {
      // Some query of this warpgroup has its window's first key after the tile's first.
      const bool edge = j * BN + window <= m0 + wg * kFlashRows + kFlashRows - 1;
      if (causal || edge || mask != nullptr)
        flash_mask_scores<true>(s, smask[t % kStages], j * BN, causal, q_row, t4, window);
    } else {
      if (causal || mask != nullptr) flash_mask_scores(s, smask[t % kStages], j * BN, causal, q_row, t4);
    }
    flash_softmax_scores(s, row_max, row_sum, scale_log2, alpha);
  };
  auto make_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) flash_probabilities<T>(s, kk, p[kk]);
  };

  // Tile 0 alone; then per tile j, S_j = Q K_j^T and P_{j-1} V_{j-1} in flight together, the
  // softmax of S_j while the tensor cores finish P V, O rescaled once P V has landed. Every
  // warpgroup issues the same sequence (no wgmma under a data-dependent branch, which would make
  // ptxas serialize them all).
  float alpha[2];
  next_tile(0);
  issue_s(0);
  wgmma_wait<0>();
  wgmma_fence_operand(s);
  softmax(0, alpha);
  make_p();
  for (int j = 1; j < n_tiles; ++j) {
    next_tile(j);
    issue_s(j % kStages);
    issue_pv((j - 1) % kStages);
    wgmma_wait<1>();  // S_j landed (committed first); P_{j-1} V_{j-1} may be in flight
    wgmma_fence_operand(s);
    softmax(j, alpha);
    wgmma_wait<0>();  // P_{j-1} V_{j-1} landed: p may be rewritten, o rescaled
    wgmma_fence_operand(o);
    wgmma_fence_operand(p);
    flash_rescale(o, alpha);
    make_p();
  }
  issue_pv((n_tiles - 1) % kStages);
  wgmma_wait<0>();
  wgmma_fence_operand(o);
  cp_async_wait<0>();

  // Normalize and store; rows with no visible key stay zero here (fixed up after the launch).
  flash_store_rows<T>(o, row_sum, q_row, seq, out + col_q, seq_row0, ld_out, t4);
#else
  (void)q, (void)k, (void)v, (void)key_mask, (void)out, (void)seq, (void)ld_q, (void)ld_kv, (void)ld_out, (void)group,
      (void)window, (void)scale_log2;
#endif
}

}  // namespace zo2::gpu::detail
