// CUDA kernels for the product-key memory ops. Semantics: engram_kernels/ops/memory/naive.py.
//
// Memory-bound kernels move 16-byte packs per thread and keep several independent loads in
// flight; all accumulation is fp32. Row offsets are int64 (1M slots x 4096 columns overflows int32).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace engram {
namespace {

using at::Tensor;

// Only the three dtypes checks.py admits; fewer instantiations than AT_DISPATCH_FLOATING_TYPES_AND2.
#define ENGRAM_DISPATCH_FLOATS(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
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

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, x);
#else
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
#endif
}

__device__ __forceinline__ uint32_t warp_min_u32(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFullMask, x);
#else
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(kFullMask, x, offset));
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
// One warp per (n, h) row. Each half's scores sit in shared memory as order-preserving uint32
// keys, split into 32 interleaved chunks (element i in chunk i % 32); lane c caches chunk c's
// maximum. Each of the k rounds takes the warp maximum, removes it, and the whole warp rescans
// only that chunk. A padding word every 32 elements keeps both access patterns bank-conflict free.
// Ties go to the lowest index. The k x k candidate sums are then merged as k sorted rows.

constexpr int kMaxTopK = 64;
constexpr int kMaxSubKeys = 8192;
constexpr int kSelectWarps = 4;
constexpr int kSelectSmemBytes = 48 * 1024;
constexpr uint32_t kRemoved = 0;  // no float maps to 0: NaNs map to the maximum below

__device__ __forceinline__ uint32_t orderable(float x) {
  if (isnan(x)) return 0xffffffffu;  // torch.topk ranks NaN above everything
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_orderable(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

// Shared-memory words one warp uses: padded keys, then top1, top2 (float) and idx1, idx2 (int).
__host__ __device__ inline int select_warp_words(int n_keys) { return n_keys + n_keys / kWarp + 1 + 4 * kMaxTopK; }

struct Argmax {
  uint32_t key;
  uint32_t idx;
};

// Warp-wide maximum key; the lowest idx among the lanes holding it.
__device__ __forceinline__ Argmax warp_argmax(uint32_t key, uint32_t idx) {
  const uint32_t best = warp_max_u32(key);
  return {best, warp_min_u32(key == best ? idx : 0xffffffffu)};
}

// Maximum of chunk `chunk` (elements chunk + 32 t), scanned by the whole warp.
__device__ Argmax chunk_argmax(const uint32_t* keys, int n, int chunk, int lane) {
  uint32_t best = kRemoved, at = 0xffffffffu;
  for (int i = chunk + kWarp * lane; i < n; i += kWarp * kWarp) {
    const uint32_t key = keys[padded(i)];
    if (key > best) best = key, at = i;
  }
  return warp_argmax(best, at);
}

__device__ void load_keys(uint32_t* keys, const float* __restrict__ scores, int n, int lane) {
  for (int i = lane; i < n; i += kWarp) keys[padded(i)] = orderable(scores[i]);
  __syncwarp();
}

// Top-k of keys[0, n), descending; lane 0 writes values and indices. Consumes the keys.
__device__ void warp_topk(uint32_t* keys, int n, int k, float* top_val, int* top_idx, int lane) {
  uint32_t best = kRemoved, at = 0xffffffffu;  // this lane's chunk maximum
  for (int i = lane; i < n; i += kWarp) {
    const uint32_t key = keys[padded(i)];
    if (key > best) best = key, at = i;
  }
  for (int r = 0; r < k; ++r) {
    const Argmax win = warp_argmax(best, at);
    const int chunk = static_cast<int>(win.idx % kWarp);
    if (lane == 0) top_val[r] = from_orderable(win.key), top_idx[r] = static_cast<int>(win.idx);
    if (r + 1 == k) break;
    if (lane == chunk) keys[padded(win.idx)] = kRemoved;
    __syncwarp();
    const Argmax next = chunk_argmax(keys, n, chunk, lane);
    if (lane == chunk) best = next.key, at = next.idx;
  }
  __syncwarp();
}

// Top-k of top1[a] + top2[b] over a, b < k: rows a are sorted (top2 is), so this is a k-way merge
// with lane l owning rows l and l + 32. Ties go to the lowest a * k + b, as a flat top-k would.
__device__ void warp_merge_pairs(const float* top1, const float* top2, const int* idx1, const int* idx2, int k,
                                 int64_t n_keys, int lane, float* __restrict__ scores, int64_t* __restrict__ ids) {
  const int a0 = lane, a1 = lane + kWarp;
  int b0 = 0, b1 = 0;  // next column of rows a0 and a1
  for (int r = 0; r < k; ++r) {
    const uint32_t key0 = (a0 < k && b0 < k) ? orderable(top1[a0] + top2[b0]) : kRemoved;
    const uint32_t key1 = (a1 < k && b1 < k) ? orderable(top1[a1] + top2[b1]) : kRemoved;
    const bool second = key1 > key0;
    const Argmax win = warp_argmax(second ? key1 : key0,
                                   second ? static_cast<uint32_t>(a1 * k + b1) : static_cast<uint32_t>(a0 * k + b0));
    const int a = static_cast<int>(win.idx) / k, b = static_cast<int>(win.idx) % k;
    if (lane == 0) {
      scores[r] = from_orderable(win.key);
      ids[r] = static_cast<int64_t>(idx1[a]) * n_keys + idx2[b];
    }
    if (a == a0) ++b0;
    if (a == a1) ++b1;
  }
}

__global__ void pk_select_kernel(const float* __restrict__ s1, const float* __restrict__ s2, int64_t stride_n,
                                 int64_t stride_h, int64_t heads, int64_t rows, int n_keys, int k,
                                 float* __restrict__ scores, int64_t* __restrict__ ids) {
  extern __shared__ uint32_t select_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (row >= rows) return;  // whole warps only: the kernel has no block-wide barrier

  uint32_t* keys = select_smem + static_cast<int64_t>(warp) * select_warp_words(n_keys);
  float* top1 = reinterpret_cast<float*>(keys + n_keys + n_keys / kWarp + 1);
  float* top2 = top1 + kMaxTopK;
  int* idx1 = reinterpret_cast<int*>(top2 + kMaxTopK);
  int* idx2 = idx1 + kMaxTopK;
  const int64_t offset = (row / heads) * stride_n + (row % heads) * stride_h;

  load_keys(keys, s1 + offset, n_keys, lane);
  warp_topk(keys, n_keys, k, top1, idx1, lane);
  load_keys(keys, s2 + offset, n_keys, lane);
  warp_topk(keys, n_keys, k, top2, idx2, lane);
  warp_merge_pairs(top1, top2, idx1, idx2, k, n_keys, lane, scores + row * k, ids + row * k);
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

constexpr int kBackwardWarps = 8;
constexpr int kPacksPerLane = 4;  // pack columns a lane holds per pass over a row

// grad_weights[n, j] = <values[ids[n, j]], grad_out[n]>: one warp per (n, j).
template <typename T, typename G, int N>
__global__ void gather_grad_weights_kernel(const T* __restrict__ values, const int64_t* __restrict__ ids,
                                           const G* __restrict__ grad_out, float* __restrict__ grad_weights,
                                           int64_t items, int64_t L, int64_t dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (item >= items) return;
  const int64_t packs = dv / N;
  const T* row = values + ids[item] * dv;
  const G* grad = grad_out + (item / L) * dv;
  float dot = 0.f;
  for (int64_t c0 = lane; c0 < packs; c0 += kWarp * kPacksPerLane) {
    Pack<T, N> v[kPacksPerLane];
    Pack<G, N> g[kPacksPerLane];
#pragma unroll
    for (int q = 0; q < kPacksPerLane; ++q) {
      const int64_t c = c0 + q * kWarp;
      if (c < packs) v[q] = load_pack<T, N>(row + c * N), g[q] = load_pack<G, N>(grad + c * N);
    }
#pragma unroll
    for (int q = 0; q < kPacksPerLane; ++q) {
      if (c0 + q * kWarp >= packs) break;
#pragma unroll
      for (int i = 0; i < N; ++i) dot = fmaf(static_cast<float>(v[q].v[i]), static_cast<float>(g[q].v[i]), dot);
    }
  }
  dot = warp_sum(dot);
  if (lane == 0) grad_weights[item] = dot;
}

// row_grads[u] = sum over the sorted positions p in segment u of weights[e] * grad_out[e / L],
// e = order[p]: one warp per unique row, summing in a fixed order (deterministic, no atomics).
template <typename G, typename T, int N>
__global__ void segment_row_grads_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ segment_end,
                                         int64_t segments, const float* __restrict__ weights,
                                         const G* __restrict__ grad_out, T* __restrict__ row_grads, int64_t L,
                                         int64_t dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (seg >= segments) return;
  const int64_t begin = seg == 0 ? 0 : segment_end[seg - 1], end = segment_end[seg];
  const int64_t packs = dv / N;
  for (int64_t c0 = lane; c0 < packs; c0 += kWarp * kPacksPerLane) {
    float acc[kPacksPerLane][N] = {};
#pragma unroll 4
    for (int64_t p = begin; p < end; ++p) {
      const int64_t e = order[p];
      const float w = weights[e];
      const G* grad = grad_out + (e / L) * dv;
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
void launch_gather_backward(const Tensor& values, const Tensor& ids, const Tensor& grad_out,
                            const Tensor& weights, const Tensor& order, const Tensor& segment_end,
                            Tensor& grad_weights, Tensor& row_grads) {
  const int64_t items = ids.numel(), L = ids.size(1), dv = values.size(1), segments = segment_end.numel();
  const int threads = kBackwardWarps * kWarp;
  auto stream = c10::cuda::getCurrentCUDAStream();
  gather_grad_weights_kernel<T, G, N><<<grid_size(ceil_div(items, kBackwardWarps)), threads, 0, stream>>>(
      values.data_ptr<T>(), ids.data_ptr<int64_t>(), grad_out.data_ptr<G>(), grad_weights.data_ptr<float>(), items,
      L, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (segments == 0) return;
  segment_row_grads_kernel<G, T, N><<<grid_size(ceil_div(segments, kBackwardWarps)), threads, 0, stream>>>(
      order.data_ptr<int64_t>(), segment_end.data_ptr<int64_t>(), segments, weights.data_ptr<float>(),
      grad_out.data_ptr<G>(), row_grads.data_ptr<T>(), L, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sorted unique ids, the stable sort order of the flat ids, and each unique id's segment end.
std::tuple<Tensor, Tensor, Tensor> group_ids(const Tensor& ids, int64_t n_slots) {
  Tensor flat = ids.reshape({-1});
  // 32-bit keys halve the radix sort's passes.
  if (n_slots <= std::numeric_limits<int32_t>::max()) flat = flat.to(at::kInt);
  Tensor sorted, order, rows, inverse, counts;
  std::tie(sorted, order) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  std::tie(rows, inverse, counts) = at::unique_consecutive(sorted, /*return_inverse=*/false, /*return_counts=*/true);
  return {rows.to(at::kLong), order.contiguous(), counts.cumsum(0)};
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
  const int64_t warp_bytes = select_warp_words(static_cast<int>(n_keys)) * sizeof(uint32_t);
  const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kSelectWarps, kSelectSmemBytes / warp_bytes)));
  pk_select_kernel<<<grid_size(ceil_div(rows, warps)), warps * kWarp, warps * warp_bytes,
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
  const int64_t dv = values.size(1);
  // A grad_out in another dtype is read as exact fp32, so no precision is lost on the way.
  const Tensor grad_out =
      grad_out_in.scalar_type() == values.scalar_type() ? grad_out_in : grad_out_in.to(at::kFloat);
  auto grad_weights = at::empty(ids.sizes(), weights.options().dtype(at::kFloat));
  if (ids.numel() == 0) {
    return {grad_weights.to(weights.scalar_type()), at::empty({0}, ids.options()),
            at::empty({0, dv}, values.options())};
  }
  Tensor rows, order, segment_end;
  std::tie(rows, order, segment_end) = group_ids(ids, values.size(0));
  auto row_grads = at::empty({rows.size(0), dv}, values.options());
  if (dv == 0) return {grad_weights.zero_().to(weights.scalar_type()), rows, row_grads};
  const Tensor w = weights.to(at::kFloat).contiguous();

  ENGRAM_DISPATCH_FLOATS(values.scalar_type(), "engram_weighted_gather_backward", [&] {
    using T = scalar_t;
    constexpr int N = static_cast<int>(kPackBytes / sizeof(T));
    auto run = [&](auto grad_tag) {
      using G = decltype(grad_tag);
      const bool packed = pack_width<T>(dv, {&values, &row_grads}) > 1 && dv % N == 0 &&
                          aligned(grad_out, sizeof(G) * N);
      if (packed) {
        launch_gather_backward<T, G, N>(values, ids, grad_out, w, order, segment_end, grad_weights, row_grads);
      } else {
        launch_gather_backward<T, G, 1>(values, ids, grad_out, w, order, segment_end, grad_weights, row_grads);
      }
    };
    if (grad_out.scalar_type() == values.scalar_type()) {
      run(T{});
    } else {
      run(float{});
    }
  });
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
