// CUDA kernels for the product-key memory ops. Semantics: engram_kernels/ops/memory/naive.py.
//
// Memory-bound kernels move 16-byte packs per thread and keep several independent loads in
// flight; all accumulation is fp32. Row offsets are int64 (1M slots x 4096 columns overflows int32).
#include "common.cuh"

#include <cub/cub.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace engram {
namespace {

using at::Tensor;

constexpr int kPackBytes = 16;
constexpr int kMaxThreads = 256;

// ---- shared helpers ----------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&x)[N]) {
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.v[i] = static_cast<T>(x[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = out;
}

template <typename T, int N>
__device__ __forceinline__ void fma_pack(float (&acc)[N], const Pack<T, N>& p, float w) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = fmaf(w, static_cast<float>(p.v[i]), acc[i]);
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, x);
#else
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const Tensor& t, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % bytes == 0;
}

// Elements per 16-byte pack of T when every row of width `dv` starts on a pack boundary, else 1.
template <typename T>
int pack_width(int64_t dv, std::initializer_list<const Tensor*> tensors) {
  constexpr int n = kPackBytes / sizeof(T);
  if (dv % n != 0) return 1;
  for (const Tensor* t : tensors) {
    if (!aligned(*t, t->element_size() * n)) return 1;
  }
  return n;
}

// Threads covering `packs` columns one pack each: a warp multiple, at most kMaxThreads.
int column_threads(int64_t packs) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarp, ceil_div(packs, kWarp) * kWarp)));
}

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks < std::numeric_limits<int32_t>::max(), "engram: grid of ", blocks, " blocks is too large");
  return static_cast<unsigned>(blocks);
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "engram: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "engram: ", name, " must be contiguous");
}

void check_float_dtype(const Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "engram: ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

void check_same_device(const Tensor& a, const Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), "engram: ", name, " is on ", b.device(), ", expected ", a.device());
}

// ---- product-key selection ---------------------------------------------------------------------
//
// One warp per (n, h) row. Scores become order-preserving uint32 keys; lane l owns the elements
// l, l + 32, ... of a half and caches its best kLaneList of them, sorted, in registers. Each of the
// k rounds is one warp max-reduction plus a ballot: the lowest lane holding the maximum records it
// and pops it; a lane that has popped its whole list refills it by rescanning its elements after
// the last one popped (rare). The k x k candidate sums are then merged as k sorted rows the same
// way. Order within a lane is (key descending, index ascending) and ties across lanes go to the
// lowest lane, so results are deterministic (torch.topk leaves tie order unspecified).

constexpr int kMaxTopK = 64;
constexpr int kMaxSubKeys = 1 << 16;
constexpr int kSelectWarps = 4;
constexpr int kLaneList = 4;
constexpr uint32_t kRemoved = 0;  // no float maps to 0: NaNs map to the maximum below

__device__ __forceinline__ uint32_t orderable(float x) {
  if (isnan(x)) return 0xffffffffu;  // torch.topk ranks NaN above everything
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_orderable(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// The lowest lane holding the warp-wide maximum of `key`, and that maximum.
__device__ __forceinline__ int warp_argmax_lane(uint32_t key, uint32_t& top) {
  top = warp_max_u32(key);
  return __ffs(__ballot_sync(kFullMask, key == top)) - 1;
}

// A lane's best remaining keys, descending; empty slots hold kRemoved.
struct LaneList {
  uint32_t key[kLaneList];
  int at[kLaneList];
};

// Inserts an element that ranks after every held element of an equal key (scans run in index order).
__device__ __forceinline__ void insert(LaneList& list, uint32_t key, int at) {
#pragma unroll
  for (int s = kLaneList - 1; s > 0; --s) {
    if (key > list.key[s - 1]) {
      list.key[s] = list.key[s - 1], list.at[s] = list.at[s - 1];
    } else if (key > list.key[s]) {
      list.key[s] = key, list.at[s] = at;
    }
  }
  if (key > list.key[0]) list.key[0] = key, list.at[0] = at;
}

// Fills `list` with the best of this lane's elements ranking after (cut_key, cut_at).
__device__ void fill_lane_list(LaneList& list, const float* __restrict__ scores, int n, int lane, uint32_t cut_key,
                               int cut_at) {
#pragma unroll
  for (int s = 0; s < kLaneList; ++s) list.key[s] = kRemoved, list.at[s] = 0;
#pragma unroll 4
  for (int i = lane; i < n; i += kWarp) {
    const uint32_t key = orderable(__ldg(scores + i));
    const bool after_cut = key < cut_key || (key == cut_key && i > cut_at);
    if (after_cut && key > list.key[kLaneList - 1]) insert(list, key, i);
  }
}

// Top-k of one half's scores[0, n), descending, into top_val / top_idx (shared memory).
__device__ void warp_topk(const float* __restrict__ scores, int n, int k, float* top_val, int* top_idx, int lane) {
  LaneList list;
  fill_lane_list(list, scores, n, lane, 0xffffffffu, -1);
  int unpopped = kLaneList;
  for (int r = 0; r < k; ++r) {
    uint32_t top;
    const int winner = warp_argmax_lane(list.key[0], top);
    if (lane == winner) {
      const int at = list.at[0];
      top_val[r] = from_orderable(top);
      top_idx[r] = at;
#pragma unroll
      for (int s = 0; s + 1 < kLaneList; ++s) list.key[s] = list.key[s + 1], list.at[s] = list.at[s + 1];
      list.key[kLaneList - 1] = kRemoved;
      if (--unpopped == 0 && r + 1 < k) {
        fill_lane_list(list, scores, n, lane, top, at);
        unpopped = kLaneList;
      }
    }
  }
  __syncwarp();
}

__device__ __forceinline__ uint32_t pair_key(const float* top1, const float* top2, int a, int b, int k) {
  return (a < k && b < k) ? orderable(top1[a] + top2[b]) : kRemoved;
}

// Top-k of top1[a] + top2[b] over a, b < k: each row a is sorted (top2 is), so this is a k-way
// merge with lane l owning rows l and l + 32. The sum is the one naive.py forms, bit for bit.
__device__ void warp_merge_pairs(const float* top1, const float* top2, const int* idx1, const int* idx2, int k,
                                 int64_t n_keys, int lane, float* __restrict__ scores, int64_t* __restrict__ ids) {
  const int a0 = lane, a1 = lane + kWarp;
  int b0 = 0, b1 = 0;  // next column of rows a0 and a1
  uint32_t key0 = pair_key(top1, top2, a0, b0, k), key1 = pair_key(top1, top2, a1, b1, k);
  for (int r = 0; r < k; ++r) {
    uint32_t top;
    const int winner = warp_argmax_lane(max(key0, key1), top);
    if (lane == winner) {
      const bool first = key0 == top;
      const int a = first ? a0 : a1, b = first ? b0 : b1;
      scores[r] = from_orderable(top);
      ids[r] = static_cast<int64_t>(idx1[a]) * n_keys + idx2[b];
      if (first) {
        key0 = pair_key(top1, top2, a0, ++b0, k);
      } else {
        key1 = pair_key(top1, top2, a1, ++b1, k);
      }
    }
  }
}

__global__ void pk_select_kernel(const float* __restrict__ s1, const float* __restrict__ s2, int64_t stride_n,
                                 int64_t stride_h, int64_t heads, int64_t rows, int n_keys, int k,
                                 float* __restrict__ scores, int64_t* __restrict__ ids) {
  __shared__ float top1[kSelectWarps][kMaxTopK], top2[kSelectWarps][kMaxTopK];
  __shared__ int idx1[kSelectWarps][kMaxTopK], idx2[kSelectWarps][kMaxTopK];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSelectWarps + warp;
  if (row >= rows) return;  // whole warps only: the kernel has no block-wide barrier
  const int64_t offset = (row / heads) * stride_n + (row % heads) * stride_h;

  warp_topk(s1 + offset, n_keys, k, top1[warp], idx1[warp], lane);
  warp_topk(s2 + offset, n_keys, k, top2[warp], idx2[warp], lane);
  warp_merge_pairs(top1[warp], top2[warp], idx1[warp], idx2[warp], k, n_keys, lane, scores + row * k,
                   ids + row * k);
}

// ---- weighted gather (forward) -----------------------------------------------------------------
//
// One block per token; thread t owns pack column t (and t + blockDim, ...), walks the token's L
// rows with kGatherUnroll 16-byte loads in flight, and writes its column once.

constexpr int kIdChunk = 256;  // ids and weights staged in shared memory per pass
constexpr int kGatherUnroll = 8;

template <typename T, int N>
__device__ __forceinline__ void accumulate_rows(const T* __restrict__ column, const int64_t* ids, const float* w,
                                                int count, int64_t dv, float (&acc)[N]) {
  int j = 0;
  for (; j + kGatherUnroll <= count; j += kGatherUnroll) {
    Pack<T, N> p[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) p[u] = load_pack<T, N>(column + ids[j + u] * dv);
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) fma_pack(acc, p[u], w[j + u]);
  }
  for (; j < count; ++j) fma_pack(acc, load_pack<T, N>(column + ids[j] * dv), w[j]);
}

template <typename T, int N>
__global__ void weighted_gather_kernel(const T* __restrict__ values, const int64_t* __restrict__ ids,
                                       const float* __restrict__ weights, T* __restrict__ out, int64_t L,
                                       int64_t dv) {
  __shared__ int64_t chunk_ids[kIdChunk];
  __shared__ float chunk_w[kIdChunk];
  const int64_t n = blockIdx.x, packs = dv / N;
  for (int64_t col0 = 0; col0 < packs; col0 += blockDim.x) {
    const int64_t col = col0 + threadIdx.x;
    float acc[N] = {};
    for (int64_t j0 = 0; j0 < L; j0 += kIdChunk) {
      const int count = L - j0 < kIdChunk ? static_cast<int>(L - j0) : kIdChunk;
      __syncthreads();  // the previous chunk is no longer read
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        chunk_ids[t] = ids[n * L + j0 + t];
        chunk_w[t] = weights[n * L + j0 + t];
      }
      __syncthreads();
      if (col < packs) accumulate_rows<T, N>(values + col * N, chunk_ids, chunk_w, count, dv, acc);
    }
    if (col < packs) store_pack<T, N>(out + n * dv + col * N, acc);
  }
}

template <typename T, int N>
void launch_weighted_gather(const Tensor& values, const Tensor& ids, const Tensor& weights, Tensor& out) {
  const int64_t tokens = ids.size(0), L = ids.size(1), dv = values.size(1);
  const int threads = column_threads(dv / N);
  weighted_gather_kernel<T, N><<<grid_size(tokens), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      values.data_ptr<T>(), ids.data_ptr<int64_t>(), weights.data_ptr<float>(), out.data_ptr<T>(), L, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- weighted gather (backward) ----------------------------------------------------------------
//
// grad_weights: one block per token, laid out as the forward (thread = pack column, kGatherUnroll
// rows in flight); each thread forms partial dot products for kGatherUnroll lookups at once, a
// butterfly sums them over the warp, and shared memory sums the warps.
// row_grads: the flat ids are radix-sorted on their significant bits only (stable, so each
// unique id's lookups stay in position order), and one warp per unique id sums its segment in
// that fixed order: deterministic, no atomics.

constexpr int kBackwardWarps = 8;
constexpr int kPacksPerLane = 4;  // pack columns a lane holds per pass over a segment
constexpr int kMaxBlockWarps = kMaxThreads / kWarp;

// Sums v[u] over the warp for each u < 8 with 9 shuffles; lane l ends with the sum of v[(l >> 2) & 7].
__device__ __forceinline__ float warp_sum8(float (&v)[8], int lane) {
#pragma unroll
  for (int width = 4, offset = 16; width >= 1; width >>= 1, offset >>= 1) {
    const bool upper = lane & offset;
#pragma unroll
    for (int i = 0; i < width; ++i) {
      const float keep = upper ? v[i + width] : v[i];
      const float send = upper ? v[i] : v[i + width];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, offset);
    }
  }
  float x = v[0];
  x += __shfl_xor_sync(kFullMask, x, 2);
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x;
}

// Adds this thread's share of <values[ids[u]], grad> to dots[u] for the u < valid lookups of a batch.
template <typename T, typename G, int N, bool kFullBatch>
__device__ __forceinline__ void batch_dots(const T* __restrict__ values, const int64_t* ids, int valid,
                                           const G* __restrict__ grad, int64_t packs, int64_t dv,
                                           float (&dots)[kGatherUnroll]) {
  for (int64_t col = threadIdx.x; col < packs; col += blockDim.x) {
    const Pack<G, N> g = load_pack<G, N>(grad + col * N);
    Pack<T, N> p[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (kFullBatch || u < valid) p[u] = load_pack<T, N>(values + ids[u] * dv + col * N);
    }
    float gf[N];
#pragma unroll
    for (int i = 0; i < N; ++i) gf[i] = static_cast<float>(g.v[i]);
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (kFullBatch || u < valid) {
#pragma unroll
        for (int i = 0; i < N; ++i) dots[u] = fmaf(static_cast<float>(p[u].v[i]), gf[i], dots[u]);
      }
    }
  }
}

template <typename T, typename G, int N>
__global__ void gather_grad_weights_kernel(const T* __restrict__ values, const int64_t* __restrict__ ids,
                                           const G* __restrict__ grad_out, float* __restrict__ grad_weights,
                                           int64_t L, int64_t dv) {
  static_assert(kGatherUnroll == 8, "warp_sum8 reduces 8 partial sums");
  __shared__ int64_t chunk_ids[kIdChunk];
  __shared__ float warp_dots[kIdChunk][kMaxBlockWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t n = blockIdx.x, packs = dv / N;
  const G* grad = grad_out + n * dv;
  for (int64_t j0 = 0; j0 < L; j0 += kIdChunk) {
    const int count = L - j0 < kIdChunk ? static_cast<int>(L - j0) : kIdChunk;
    for (int t = threadIdx.x; t < count; t += blockDim.x) chunk_ids[t] = ids[n * L + j0 + t];
    __syncthreads();
    for (int jb = 0; jb < count; jb += kGatherUnroll) {
      float dots[kGatherUnroll] = {};
      const int valid = count - jb;
      if (valid >= kGatherUnroll) {
        batch_dots<T, G, N, true>(values, chunk_ids + jb, valid, grad, packs, dv, dots);
      } else {
        batch_dots<T, G, N, false>(values, chunk_ids + jb, valid, grad, packs, dv, dots);
      }
      const float dot = warp_sum8(dots, lane);
      const int u = (lane >> 2) & 7;
      if ((lane & 3) == 0 && u < valid) warp_dots[jb + u][warp] = dot;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      float dot = 0.f;
      for (int w = 0; w < warps; ++w) dot += warp_dots[t][w];
      grad_weights[n * L + j0 + t] = dot;
    }
    __syncthreads();  // chunk_ids and warp_dots are reused by the next chunk
  }
}

// row_grads[u] = sum over the sorted positions p in segment u of weights[e] * grad_out[e / L],
// e = order[p]; rows[u] = the segment's id. One warp per segment.
template <typename G, typename T, int N>
__global__ void segment_row_grads_kernel(const int32_t* __restrict__ order, const int32_t* __restrict__ segment_end,
                                         const int32_t* __restrict__ unique_ids, int32_t segments,
                                         const float* __restrict__ weights, const G* __restrict__ grad_out,
                                         int64_t* __restrict__ rows, T* __restrict__ row_grads, int32_t L,
                                         int64_t dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (seg >= segments) return;
  if (lane == 0) rows[seg] = unique_ids[seg];
  const int32_t begin = seg == 0 ? 0 : segment_end[seg - 1], end = segment_end[seg];
  const int64_t packs = dv / N;
  for (int64_t c0 = lane; c0 < packs; c0 += kWarp * kPacksPerLane) {
    float acc[kPacksPerLane][N] = {};
#pragma unroll 4
    for (int32_t p = begin; p < end; ++p) {
      const int32_t e = order[p];
      const float w = weights[e];
      const G* grad = grad_out + static_cast<int64_t>(e / L) * dv;
#pragma unroll
      for (int q = 0; q < kPacksPerLane; ++q) {
        const int64_t c = c0 + q * kWarp;
        if (c < packs) fma_pack(acc[q], load_pack<G, N>(grad + c * N), w);
      }
    }
#pragma unroll
    for (int q = 0; q < kPacksPerLane; ++q) {
      const int64_t c = c0 + q * kWarp;
      if (c < packs) store_pack<T, N>(row_grads + seg * dv + c * N, acc[q]);
    }
  }
}

template <typename T, typename G, int N>
void launch_grad_weights(const Tensor& values, const Tensor& ids, const Tensor& grad_out, Tensor& grad_weights) {
  const int64_t tokens = ids.size(0), L = ids.size(1), dv = values.size(1);
  gather_grad_weights_kernel<T, G, N><<<grid_size(tokens), column_threads(dv / N), 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
      values.data_ptr<T>(), ids.data_ptr<int64_t>(), grad_out.data_ptr<G>(), grad_weights.data_ptr<float>(), L, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Lookups grouped by id: the unique ids (sorted), the lookup positions in id order (stable), and
// each unique id's segment end in that order. All int32; syncs once to learn the unique count.
struct IdGroups {
  Tensor unique_ids, order, segment_end;
};

IdGroups group_ids(const Tensor& ids, int64_t n_slots) {
  const int64_t items = ids.numel();
  TORCH_CHECK(items < std::numeric_limits<int32_t>::max() && n_slots <= std::numeric_limits<int32_t>::max(),
              "engram: weighted_gather_backward supports < 2^31 lookups and slots");
  const auto int_opts = ids.options().dtype(at::kInt);
  const Tensor keys = ids.reshape({-1}).to(at::kInt);
  const Tensor positions = at::arange(items, int_opts);
  Tensor sorted_keys = at::empty({items}, int_opts), order = at::empty({items}, int_opts);
  Tensor unique_ids = at::empty({items}, int_opts), counts = at::empty({items}, int_opts);
  Tensor n_unique = at::empty({1}, int_opts);
  const int n = static_cast<int>(items);
  int end_bit = 1;  // radix-sort only the bits an id can have
  while (end_bit < 31 && (int64_t{1} << end_bit) < n_slots) ++end_bit;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  size_t sort_bytes = 0, encode_bytes = 0, scan_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys.data_ptr<int32_t>(),
                                                 sorted_keys.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
                                                 order.data_ptr<int32_t>(), n, 0, end_bit, stream));
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, encode_bytes, sorted_keys.data_ptr<int32_t>(),
                                                    unique_ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                                    n_unique.data_ptr<int32_t>(), n, stream));
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, counts.data_ptr<int32_t>(),
                                               counts.data_ptr<int32_t>(), n, stream));
  Tensor temp = at::empty({static_cast<int64_t>(std::max({sort_bytes, encode_bytes, scan_bytes, size_t{1}}))},
                          ids.options().dtype(at::kByte));
  void* temp_ptr = temp.data_ptr();

  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp_ptr, sort_bytes, keys.data_ptr<int32_t>(),
                                                 sorted_keys.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
                                                 order.data_ptr<int32_t>(), n, 0, end_bit, stream));
  C10_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(temp_ptr, encode_bytes, sorted_keys.data_ptr<int32_t>(),
                                                    unique_ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                                    n_unique.data_ptr<int32_t>(), n, stream));
  const int unique = n_unique.item<int32_t>();  // the one host sync: output sizes depend on it
  Tensor segment_end = at::empty({unique}, int_opts);
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp_ptr, scan_bytes, counts.data_ptr<int32_t>(),
                                               segment_end.data_ptr<int32_t>(), unique, stream));
  return {unique_ids.narrow(0, 0, unique), order, segment_end};
}

template <typename T, typename G, int N>
void launch_row_grads(const IdGroups& groups, const Tensor& weights, const Tensor& grad_out, int64_t L,
                      Tensor& rows, Tensor& row_grads) {
  const int64_t segments = groups.segment_end.numel(), dv = row_grads.size(1);
  segment_row_grads_kernel<G, T, N><<<grid_size(ceil_div(segments, kBackwardWarps)), kBackwardWarps * kWarp, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(
      groups.order.data_ptr<int32_t>(), groups.segment_end.data_ptr<int32_t>(),
      groups.unique_ids.data_ptr<int32_t>(), static_cast<int32_t>(segments), weights.data_ptr<float>(),
      grad_out.data_ptr<G>(), rows.data_ptr<int64_t>(), row_grads.data_ptr<T>(), static_cast<int32_t>(L), dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls launch(T{}, G{}, std::integral_constant<int, N>{}): T the values dtype, G the grad_out
// dtype (values' own, or float), N the 16-byte pack width of T when all rows allow it, else 1.
template <typename Launch>
void dispatch_gather_backward(const Tensor& values, const Tensor& grad_out, std::initializer_list<const Tensor*> rowwise,
                              const Launch& launch) {
  ENGRAM_DISPATCH_FLOATS(values.scalar_type(), "engram_weighted_gather_backward", [&] {
    using T = scalar_t;
    constexpr int N = static_cast<int>(kPackBytes / sizeof(T));
    auto with_grad_type = [&](auto grad_tag) {
      using G = decltype(grad_tag);
      bool packed = values.size(1) % N == 0 && aligned(grad_out, sizeof(G) * N);
      for (const Tensor* t : rowwise) packed = packed && aligned(*t, kPackBytes);
      if (packed) {
        launch(T{}, grad_tag, std::integral_constant<int, N>{});
      } else {
        launch(T{}, grad_tag, std::integral_constant<int, 1>{});
      }
    };
    if (grad_out.scalar_type() == values.scalar_type()) {
      with_grad_type(T{});
    } else {
      with_grad_type(float{});
    }
  });
}

// ---- sparse optimizer steps --------------------------------------------------------------------
//
// One block per touched row; rows outside allow_mask return before touching memory. Each scalar
// operation is rounded as torch's eager ops in naive.py round it (no FMA contraction), so results
// match the reference bit for bit.

struct SgdCoeffs {
  float lr, weight_decay;
};

struct AdamCoeffs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bias1, inv_bias2, eps, lr, decay;
};

template <typename T, typename G, int N>
__global__ void sparse_sgd_kernel(T* __restrict__ values, const int64_t* __restrict__ rows,
                                  const G* __restrict__ grads, const bool* __restrict__ allow_mask, int64_t dv,
                                  SgdCoeffs c) {
  const int64_t u = blockIdx.x, row = rows[u];
  if (allow_mask != nullptr && !allow_mask[row]) return;
  T* v = values + row * dv;
  const G* g = grads + u * dv;
  for (int64_t col = threadIdx.x * static_cast<int64_t>(N); col < dv; col += blockDim.x * static_cast<int64_t>(N)) {
    const Pack<T, N> vp = load_pack<T, N>(v + col);
    const Pack<G, N> gp = load_pack<G, N>(g + col);
    float x[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float xi = static_cast<float>(vp.v[i]);
      const float step = __fadd_rn(static_cast<float>(gp.v[i]), __fmul_rn(c.weight_decay, xi));
      x[i] = __fsub_rn(xi, __fmul_rn(c.lr, step));
    }
    store_pack<T, N>(v + col, x);
  }
}

template <typename T, typename G, int N>
__global__ void sparse_adam_kernel(T* __restrict__ values, float* __restrict__ exp_avg,
                                   float* __restrict__ exp_avg_sq, const int64_t* __restrict__ rows,
                                   const G* __restrict__ grads, const bool* __restrict__ allow_mask, int64_t dv,
                                   AdamCoeffs c) {
  const int64_t u = blockIdx.x, row = rows[u];
  if (allow_mask != nullptr && !allow_mask[row]) return;
  T* v = values + row * dv;
  float* m = exp_avg + row * dv;
  float* s = exp_avg_sq + row * dv;
  const G* g = grads + u * dv;
  for (int64_t col = threadIdx.x * static_cast<int64_t>(N); col < dv; col += blockDim.x * static_cast<int64_t>(N)) {
    const Pack<T, N> vp = load_pack<T, N>(v + col);
    const Pack<G, N> gp = load_pack<G, N>(g + col);
    const Pack<float, N> mp = load_pack<float, N>(m + col);
    const Pack<float, N> sp = load_pack<float, N>(s + col);
    float m_new[N], s_new[N], x[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float gi = static_cast<float>(gp.v[i]);
      m_new[i] = __fadd_rn(__fmul_rn(mp.v[i], c.beta1), __fmul_rn(c.one_minus_beta1, gi));
      s_new[i] = __fadd_rn(__fmul_rn(sp.v[i], c.beta2), __fmul_rn(__fmul_rn(c.one_minus_beta2, gi), gi));
      const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(s_new[i], c.inv_bias2)), c.eps);
      const float update = __fdiv_rn(__fmul_rn(m_new[i], c.inv_bias1), denom);
      x[i] = __fsub_rn(__fmul_rn(static_cast<float>(vp.v[i]), c.decay), __fmul_rn(c.lr, update));
    }
    store_pack<float, N>(m + col, m_new);
    store_pack<float, N>(s + col, s_new);
    store_pack<T, N>(v + col, x);
  }
}

const bool* mask_ptr(const std::optional<Tensor>& allow_mask) {
  return allow_mask.has_value() ? allow_mask->data_ptr<bool>() : nullptr;
}

// Packs of 4 elements (16 bytes of fp32 state) when rows allow it, else scalar access.
int step_width(int64_t dv, std::initializer_list<const Tensor*> tensors) {
  constexpr int n = 4;
  if (dv % n != 0) return 1;
  for (const Tensor* t : tensors) {
    if (!aligned(*t, t->element_size() * n)) return 1;
  }
  return n;
}

// Calls launch(T{}, G{}, std::integral_constant<int, N>{}) with T the values dtype, G the grads
// dtype (the values dtype; else float, `grads` being converted exactly) and N the pack width.
template <typename Launch>
void dispatch_step(const Tensor& values, Tensor& grads, std::initializer_list<const Tensor*> state,
                   const Launch& launch) {
  if (grads.scalar_type() != values.scalar_type()) grads = grads.to(at::kFloat);
  bool packed = step_width(values.size(1), {&values, &grads}) > 1;
  for (const Tensor* t : state) packed = packed && aligned(*t, kPackBytes);
  ENGRAM_DISPATCH_FLOATS(values.scalar_type(), "engram_sparse_step", [&] {
    using T = scalar_t;
    auto with_grad_type = [&](auto grad_tag) {
      if (packed) {
        launch(T{}, grad_tag, std::integral_constant<int, 4>{});
      } else {
        launch(T{}, grad_tag, std::integral_constant<int, 1>{});
      }
    };
    if (grads.scalar_type() == values.scalar_type()) {
      with_grad_type(T{});
    } else {
      with_grad_type(float{});
    }
  });
}

void check_step_inputs(const Tensor& values, const Tensor& rows, const Tensor& grads,
                       const std::optional<Tensor>& allow_mask) {
  check_cuda(values, "values");
  check_cuda(rows, "rows");
  check_cuda(grads, "grads");
  check_float_dtype(values, "values");
  check_float_dtype(grads, "grads");
  check_same_device(values, rows, "rows");
  check_same_device(values, grads, "grads");
  TORCH_CHECK(values.dim() == 2, "engram: values must be 2-D");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "engram: rows must be 1-D int64");
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) == rows.size(0) && grads.size(1) == values.size(1),
              "engram: grads must have shape (len(rows), Dv)");
  if (allow_mask.has_value()) {
    check_cuda(*allow_mask, "allow_mask");
    check_same_device(values, *allow_mask, "allow_mask");
    TORCH_CHECK(allow_mask->scalar_type() == at::kBool && allow_mask->numel() == values.size(0),
                "engram: allow_mask must be bool of shape (n_slots,)");
  }
}

}  // namespace

// ---- host entry points (declared in bindings.cpp) ----------------------------------------------

int64_t pk_max_topk() { return kMaxTopK; }
int64_t pk_max_sub_keys() { return kMaxSubKeys; }

std::tuple<Tensor, Tensor> pk_select(const Tensor& s1, const Tensor& s2, int64_t k) {
  TORCH_CHECK(s1.is_cuda() && s2.is_cuda(), "engram: pk_select needs CUDA tensors");
  check_same_device(s1, s2, "s2");
  TORCH_CHECK(s1.scalar_type() == at::kFloat && s2.scalar_type() == at::kFloat, "engram: pk_select needs float32");
  TORCH_CHECK(s1.dim() == 3 && s1.sizes() == s2.sizes(), "engram: s1 and s2 must be (N, H, n_keys) of one shape");
  TORCH_CHECK(s1.stride(2) == 1 && s2.stride(2) == 1 && s1.strides() == s2.strides(),
              "engram: s1 and s2 need contiguous rows and equal strides");
  const int64_t tokens = s1.size(0), heads = s1.size(1), n_keys = s1.size(2);
  TORCH_CHECK(1 <= k && k <= n_keys, "engram: k must lie in [1, n_keys]");
  TORCH_CHECK(k <= kMaxTopK, "engram: the CUDA pk_select supports k <= ", kMaxTopK, ", got ", k);
  TORCH_CHECK(n_keys <= kMaxSubKeys, "engram: the CUDA pk_select supports n_keys <= ", kMaxSubKeys);

  c10::cuda::CUDAGuard guard(s1.device());
  auto scores = at::empty({tokens, heads, k}, s1.options());
  auto ids = at::empty({tokens, heads, k}, s1.options().dtype(at::kLong));
  const int64_t rows = tokens * heads;
  if (rows == 0) return {scores, ids};
  pk_select_kernel<<<grid_size(ceil_div(rows, kSelectWarps)), kSelectWarps * kWarp, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(
      s1.data_ptr<float>(), s2.data_ptr<float>(), s1.stride(0), s1.stride(1), heads, rows,
      static_cast<int>(n_keys), static_cast<int>(k), scores.data_ptr<float>(), ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, ids};
}

Tensor weighted_gather(const Tensor& values, const Tensor& ids, const Tensor& weights) {
  check_cuda(values, "values");
  check_cuda(ids, "ids");
  check_cuda(weights, "weights");
  check_float_dtype(values, "values");
  check_float_dtype(weights, "weights");
  check_same_device(values, ids, "ids");
  check_same_device(values, weights, "weights");
  TORCH_CHECK(values.dim() == 2 && ids.dim() == 2 && ids.scalar_type() == at::kLong, "engram: bad gather inputs");
  TORCH_CHECK(weights.sizes() == ids.sizes(), "engram: weights must match ids");

  c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({ids.size(0), values.size(1)}, values.options());
  if (out.numel() == 0) return out;
  if (ids.size(1) == 0) return out.zero_();
  const Tensor w = weights.to(at::kFloat).contiguous();  // (N, L): tiny next to the rows gathered
  ENGRAM_DISPATCH_FLOATS(values.scalar_type(), "engram_weighted_gather", [&] {
    if (pack_width<scalar_t>(values.size(1), {&values, &out}) > 1) {
      launch_weighted_gather<scalar_t, static_cast<int>(kPackBytes / sizeof(scalar_t))>(values, ids, w, out);
    } else {
      launch_weighted_gather<scalar_t, 1>(values, ids, w, out);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> weighted_gather_backward(const Tensor& grad_out_in, const Tensor& values,
                                                            const Tensor& ids, const Tensor& weights) {
  check_cuda(grad_out_in, "grad_out");
  check_cuda(values, "values");
  check_cuda(ids, "ids");
  check_cuda(weights, "weights");
  check_float_dtype(grad_out_in, "grad_out");
  check_float_dtype(values, "values");
  check_float_dtype(weights, "weights");
  check_same_device(values, ids, "ids");
  check_same_device(values, weights, "weights");
  check_same_device(values, grad_out_in, "grad_out");
  TORCH_CHECK(values.dim() == 2 && ids.dim() == 2 && ids.scalar_type() == at::kLong, "engram: bad gather inputs");
  TORCH_CHECK(weights.sizes() == ids.sizes(), "engram: weights must match ids");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == ids.size(0) && grad_out_in.size(1) == values.size(1),
              "engram: grad_out must have shape (N, Dv)");

  c10::cuda::CUDAGuard guard(values.device());
  const int64_t dv = values.size(1), L = ids.size(1);
  // A grad_out in another dtype is read as exact fp32, so no precision is lost on the way.
  const Tensor grad_out =
      grad_out_in.scalar_type() == values.scalar_type() ? grad_out_in : grad_out_in.to(at::kFloat);
  Tensor grad_weights = at::zeros(ids.sizes(), weights.options().dtype(at::kFloat));
  if (ids.numel() == 0) {
    return {grad_weights.to(weights.scalar_type()), at::empty({0}, ids.options()),
            at::empty({0, dv}, values.options())};
  }
  if (dv > 0) {  // launched first: it runs while the host waits on the unique count below
    dispatch_gather_backward(values, grad_out, {&values}, [&](auto t_tag, auto g_tag, auto width) {
      launch_grad_weights<decltype(t_tag), decltype(g_tag), decltype(width)::value>(values, ids, grad_out,
                                                                                    grad_weights);
    });
  }
  const IdGroups groups = group_ids(ids, values.size(0));
  const int64_t unique = groups.unique_ids.numel();
  Tensor rows = at::empty({unique}, ids.options());
  Tensor row_grads = at::empty({unique, dv}, values.options());
  if (dv == 0) {
    rows.copy_(groups.unique_ids);
  } else {
    const Tensor w = weights.to(at::kFloat).contiguous();
    dispatch_gather_backward(values, grad_out, {&row_grads}, [&](auto t_tag, auto g_tag, auto width) {
      launch_row_grads<decltype(t_tag), decltype(g_tag), decltype(width)::value>(groups, w, grad_out, L, rows,
                                                                                 row_grads);
    });
  }
  return {grad_weights.to(weights.scalar_type()), rows, row_grads};
}

void sparse_sgd_step(const Tensor& values, const Tensor& rows, const Tensor& grads_in, double lr,
                     double weight_decay, const std::optional<Tensor>& allow_mask) {
  check_step_inputs(values, rows, grads_in, allow_mask);
  c10::cuda::CUDAGuard guard(values.device());
  const int64_t touched = rows.numel(), dv = values.size(1);
  if (touched == 0 || dv == 0) return;
  Tensor grads = grads_in;
  const SgdCoeffs coeffs{static_cast<float>(lr), static_cast<float>(weight_decay)};
  dispatch_step(values, grads, {}, [&](auto t_tag, auto g_tag, auto width) {
    using T = decltype(t_tag);
    using G = decltype(g_tag);
    constexpr int N = decltype(width)::value;
    sparse_sgd_kernel<T, G, N><<<grid_size(touched), column_threads(dv / N), 0, c10::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<T>(), rows.data_ptr<int64_t>(), grads.data_ptr<G>(), mask_ptr(allow_mask), dv, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sparse_adam_step(const Tensor& values, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& rows,
                      const Tensor& grads_in, int64_t step, double lr, double beta1, double beta2, double eps,
                      double weight_decay, const std::optional<Tensor>& allow_mask) {
  check_step_inputs(values, rows, grads_in, allow_mask);
  for (const Tensor* state : {&exp_avg, &exp_avg_sq}) {
    check_cuda(*state, "optimizer state");
    check_same_device(values, *state, "optimizer state");
    TORCH_CHECK(state->scalar_type() == at::kFloat && state->sizes() == values.sizes(),
                "engram: optimizer state must be float32 shaped like values");
  }
  TORCH_CHECK(step >= 1, "engram: step starts at 1");
  c10::cuda::CUDAGuard guard(values.device());
  const int64_t touched = rows.numel(), dv = values.size(1);
  if (touched == 0 || dv == 0) return;
  Tensor grads = grads_in;
  // Scalars rounded as torch rounds Python scalars in naive.py: tensor / b runs as tensor * (1 / float(b)).
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const AdamCoeffs coeffs{static_cast<float>(beta1),     static_cast<float>(1.0 - beta1),
                          static_cast<float>(beta2),     static_cast<float>(1.0 - beta2),
                          1.0f / static_cast<float>(bias1), 1.0f / static_cast<float>(bias2),
                          static_cast<float>(eps),       static_cast<float>(lr),
                          static_cast<float>(1.0 - lr * weight_decay)};
  dispatch_step(values, grads, {&exp_avg, &exp_avg_sq}, [&](auto t_tag, auto g_tag, auto width) {
    using T = decltype(t_tag);
    using G = decltype(g_tag);
    constexpr int N = decltype(width)::value;
    sparse_adam_kernel<T, G, N><<<grid_size(touched), column_threads(dv / N), 0, c10::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<T>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), rows.data_ptr<int64_t>(),
        grads.data_ptr<G>(), mask_ptr(allow_mask), dv, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace engram
