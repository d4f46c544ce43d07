// The LoRA backward's two products with dy from one read of dy, on tensor cores (sm_80+), for
// 16-bit dy (N, C), B (C, 16) and u (N, 16) (lower ranks zero-padded to 16 by the caller):
//   g = dy B (N, 16)   and   d = uᵀ dy (16, C), both accumulated in fp32.
// cuBLAS computes them as two GEMMs that read dy twice; dy (N x out) is the largest tensor of the
// backward, so one read saves its whole size in memory traffic.
//
// A block owns 512 rows and a run of 64-column tiles. It walks the tiles column by column, four
// 128-row chunks each, staging every (128 x 64) piece of dy in shared memory with cp.async (kStages
// deep). Each warp takes 32 rows of a chunk: g of its rows accumulates in registers across the
// columns (ldmatrix gives dy as the A operand), d of the column tile across the rows (ldmatrix.trans
// gives dy as the B operand, uᵀ the A operand). d is summed over the warps once per column tile and
// written as the block's partial (row block, 16, C); g as the split's partial (split, N, 16). The
// caller adds the partials (23 MB at N 8192 x C 14336, a tenth of dy; no atomics, so the result is
// the same every run).
//
// The same kernel with kCopyRows makes the joined-weight LoRA forward's input (composite.py): with x
// for dy and Aᵀ (in, 16) for B it computes only g = x Aᵀ and writes every staged piece of x on to a
// wider row-major buffer (the first columns of [x | s·u]), so x is read once for both.
#pragma once

#ifdef ENGRAM_HOST_WARPS  // compiled for a CPU by the emulator the tests run (csrc/emulation)
#include "../emulation/host_warps.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ptx.cuh"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace engram {
namespace dy_products {

constexpr int kRank = 16;
constexpr int kWarps = 4;
constexpr int kChunkRows = 32 * kWarps;  // rows of one staged piece of dy: 32 per warp
constexpr int kChunks = 4;
constexpr int kBlockRows = kChunkRows * kChunks;
constexpr int kTileCols = 64;
constexpr int kStages = 4;  // 3 pieces in flight per block, 6 per SM (~96 KB): enough for DRAM latency under load

// The dynamic shared memory of a block.
template <typename T>
struct Shared {
  T dy[kStages][kChunkRows * kTileCols];  // 128-byte rows, 16-byte chunks swizzled by row % 8
  T b[kStages][kTileCols * kRank];        // B rows of the column tile; 32-byte rows, chunks swizzled
  T u[kBlockRows * kRank];                // u rows of the block
  float d[kWarps][kRank * kTileCols];     // each warp's d of the column tile, summed once per tile
};

// Element offsets: 16-byte chunk `chunk` of a row, placed so that ldmatrix's eight rows hit distinct banks.
__device__ __forceinline__ int dy_at(int row, int chunk) { return row * kTileCols + ((chunk ^ (row % 8)) * 8); }
__device__ __forceinline__ int rank_at(int row, int chunk) { return row * kRank + ((chunk ^ ((row / 4) % 2)) * 8); }

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ptx::mma_m16n8k16<std::is_same_v<T, at::BFloat16>>(d, a, b0, b1);
}

template <typename T>
struct Block {
  Shared<T>& sh;
  const T *dy, *b;
  int64_t n, c, row0;  // row0: the block's first row
  int64_t col_tile0;   // the block's first column tile
  int tiles;           // (column tile, chunk) pieces the block walks

  // Stages piece `t` (column tile t / kChunks, chunk t % kChunks) of dy and the tile's B rows;
  // rows and columns past the ends read as zeros. A thread copies one 16-byte column chunk of every
  // 16th row, so its source advances by 16 rows and its destination by a constant (the rows it
  // writes share row % 8, hence the swizzle).
  __device__ __forceinline__ void issue(int t) const {
    constexpr int kRowsApart = kWarps * kWarp / 8;
    const int stage = t % kStages, row = threadIdx.x / 8, chunk = threadIdx.x % 8;
    const int64_t col0 = (col_tile0 + t / kChunks) * kTileCols, first_row = row0 + (t % kChunks) * kChunkRows + row;
    const int64_t col = col0 + chunk * 8, rows_left = col < c ? n - first_row : 0;  // c % 8 == 0: whole chunks
    const T* from = dy + first_row * c + col;
    T* to = &sh.dy[stage][dy_at(row, chunk)];
#pragma unroll
    for (int i = 0; i < kChunkRows / kRowsApart; ++i) {
      const bool valid = i * kRowsApart < rows_left;
      ptx::cp_async_16(to + i * kRowsApart * kTileCols, valid ? from : dy, valid ? 16 : 0);
      from += kRowsApart * c;
    }
    const int b_row = threadIdx.x / 2, b_chunk = threadIdx.x % 2;  // kTileCols x 2 chunks: one per thread
    const bool valid = col0 + b_row < c;
    ptx::cp_async_16(&sh.b[stage][rank_at(b_row, b_chunk)], valid ? b + (col0 + b_row) * kRank + b_chunk * 8 : b,
                     valid ? 16 : 0);
  }

  // Writes staged piece `t` to `to` (row stride `ld`, 16-byte aligned rows), the chunks issue(t) loaded.
  __device__ __forceinline__ void copy_out(int t, T* to, int64_t ld) const {
    constexpr int kRowsApart = kWarps * kWarp / 8;
    const int row = threadIdx.x / 8, chunk = threadIdx.x % 8;
    const int64_t col = (col_tile0 + t / kChunks) * kTileCols + chunk * 8;
    const int64_t first_row = row0 + (t % kChunks) * kChunkRows + row;
    if (col >= c) return;
    const T* from = &sh.dy[t % kStages][dy_at(row, chunk)];
#pragma unroll
    for (int i = 0; i < kChunkRows / kRowsApart; ++i)
      if (first_row + i * kRowsApart < n)
        *reinterpret_cast<uint4*>(to + (first_row + i * kRowsApart) * ld + col) =
            *reinterpret_cast<const uint4*>(from + i * kRowsApart * kTileCols);
  }
};

// kCopyRows: g only (u and d_part unused), and each piece of dy written on to copy_to (row stride copy_ld).
template <typename T, bool kCopyRows = false>
__global__ void __launch_bounds__(kWarps * kWarp) dy_products_kernel(const T* __restrict__ dy, const T* __restrict__ b,
                                                                    const T* __restrict__ u, float* __restrict__ g_part,
                                                                    float* __restrict__ d_part, int64_t n, int64_t c,
                                                                    int tiles_per_split, T* __restrict__ copy_to = nullptr,
                                                                    int64_t copy_ld = 0) {
  ENGRAM_DYNAMIC_SHARED(shared_bytes);
  auto& sh = *reinterpret_cast<Shared<T>*>(shared_bytes);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, t4 = lane % 4;
  const int64_t col_tiles = (c + kTileCols - 1) / kTileCols, split = blockIdx.y;
  const Block<T> blk{sh, dy, b, n, c, static_cast<int64_t>(blockIdx.x) * kBlockRows, split * tiles_per_split,
                     static_cast<int>(min(static_cast<int64_t>(tiles_per_split), col_tiles - split * tiles_per_split)) *
                         kChunks};

  if constexpr (!kCopyRows) {
    for (int i = threadIdx.x; i < kBlockRows * 2; i += kWarps * kWarp) {  // the block's u rows, 2 chunks each
      const int row = i / 2, chunk = i % 2;
      const bool valid = blk.row0 + row < n;
      ptx::cp_async_16(&sh.u[rank_at(row, chunk)], valid ? u + (blk.row0 + row) * kRank + chunk * 8 : u,
                       valid ? 16 : 0);
    }
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < blk.tiles) blk.issue(s);
    ptx::cp_async_commit();  // an empty group keeps the wait counts uniform
  }

  // The lanes' ldmatrix rows, as element offsets: 16 rows further keep the swizzle (row % 8 and
  // (row / 4) % 2 unchanged), so only the column chunk needs one offset per k-step.
  int dy_a[kTileCols / 16], dy_b[kTileCols / 16];  // dy as A of dy B (k-step ks), as B of uᵀ dy (column pair cn)
#pragma unroll
  for (int k = 0; k < kTileCols / 16; ++k) {
    dy_a[k] = dy_at(warp * 32 + lane % 16, k * 2 + lane / 16);
    dy_b[k] = dy_at(warp * 32 + lane % 8 + 8 * (lane / 8 % 2), k * 2 + lane / 16);
  }
  const int b_row = rank_at(lane % 8 + 8 * (lane / 8 % 2), lane / 16);
  const int u_row = rank_at(warp * 32 + lane % 8 + 8 * (lane / 16), lane / 8 % 2);

  float gacc[kChunks][2][2][4] = {};  // rows of the warp per chunk: 2 m-tiles x 2 n-tiles (rank 0-7, 8-15)
  float dacc[kTileCols / 8][4] = {};  // d of the column tile: 8 n-tiles (columns) x rank rows g, g + 8
  for (int first = 0; first < blk.tiles; first += kChunks) {  // one column tile
#pragma unroll
    for (int chunk = 0; chunk < kChunks; ++chunk) {  // unrolled: gacc[chunk] stays in registers
      const int t = first + chunk;
      ptx::cp_async_wait<kStages - 2>();
      __syncthreads();  // piece t is in; every warp is done with the stage the next issue overwrites
      if (t + kStages - 1 < blk.tiles) blk.issue(t + kStages - 1);
      ptx::cp_async_commit();
      const int stage = t % kStages;
      const T* tile = sh.dy[stage];
#pragma unroll
      for (int ks = 0; ks < kTileCols / 16; ++ks) {  // g += dy B over the tile's columns
        uint32_t bf[4];  // n-tile 0: bf[0], bf[1] (k 0-7, 8-15); n-tile 1: bf[2], bf[3]
        ptx::ldmatrix_x4<true>(bf, &sh.b[stage][b_row + ks * 16 * kRank]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t a[4];
          ptx::ldmatrix_x4<false>(a, &tile[dy_a[ks] + mt * 16 * kTileCols]);
          mma<T>(gacc[chunk][mt][0], a, bf[0], bf[1]);
          mma<T>(gacc[chunk][mt][1], a, bf[2], bf[3]);
        }
      }
      if constexpr (kCopyRows) {
        blk.copy_out(t, copy_to, copy_ld);
      } else {
#pragma unroll
        for (int kr = 0; kr < 2; ++kr) {  // d += uᵀ dy over the warp's rows
          uint32_t a[4];
          ptx::ldmatrix_x4<true>(a, &sh.u[u_row + (chunk * kChunkRows + kr * 16) * kRank]);
#pragma unroll
          for (int cn = 0; cn < kTileCols / 16; ++cn) {
            uint32_t bf[4];
            ptx::ldmatrix_x4<true>(bf, &tile[dy_b[cn] + kr * 16 * kTileCols]);
            mma<T>(dacc[2 * cn], a, bf[0], bf[1]);
            mma<T>(dacc[2 * cn + 1], a, bf[2], bf[3]);
          }
        }
      }
    }
    if constexpr (!kCopyRows) {
      // The column tile is done: its d, summed over the warps, is the block's partial. The next write
      // of sh.d comes a column tile later, after the loop's __syncthreads.
#pragma unroll
      for (int nt = 0; nt < kTileCols / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sh.d[warp][(g + 8 * (e / 2)) * kTileCols + nt * 8 + 2 * t4 + e % 2] = dacc[nt][e];
          dacc[nt][e] = 0.f;
        }
      __syncthreads();
      const int64_t col0 = (blk.col_tile0 + first / kChunks) * kTileCols;
      for (int i = threadIdx.x; i < kRank * kTileCols; i += kWarps * kWarp) {
        const int64_t col = col0 + i % kTileCols;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += sh.d[w][i];
        if (col < c) d_part[(static_cast<int64_t>(blockIdx.x) * kRank + i / kTileCols) * c + col] = sum;
      }
    }
  }
  ptx::cp_async_wait<0>();

#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t row = blk.row0 + chunk * kChunkRows + warp * 32 + mt * 16 + g + 8 * (e / 2);
          if (row < n) g_part[(split * n + row) * kRank + nt * 8 + 2 * t4 + e % 2] = gacc[chunk][mt][nt][e];
        }
}

// The launch for dy (n, c), n and c > 0: row blocks x column splits (about `target_blocks` blocks),
// and the column tiles per split.
struct Plan {
  int64_t row_blocks, splits;
  int tiles_per_split;
};

inline Plan plan(int64_t n, int64_t c, int64_t target_blocks) {
  const int64_t row_blocks = (n + kBlockRows - 1) / kBlockRows, col_tiles = (c + kTileCols - 1) / kTileCols;
  const int64_t wanted = std::max<int64_t>(1, std::min(col_tiles, target_blocks / row_blocks));
  const int64_t per_split = (col_tiles + wanted - 1) / wanted;
  return {row_blocks, (col_tiles + per_split - 1) / per_split, static_cast<int>(per_split)};
}

}  // namespace dy_products
}  // namespace engram
