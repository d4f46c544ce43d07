// CUDA kernels for the adapter side of the LoRA ops (semantics: engram_kernels/ops/lora/naive.py;
// orchestration with the cuBLAS GEMMs: engram_kernels/ops/lora/composite.py).
//
// Rows are sorted by adapter once (perm, offsets); every kernel reads and writes its rows through
// perm, so x, dy and y are never copied into sorted order, and finds a row's adapter by a binary
// search over the segment offsets. Accumulation is fp32; the per-adapter gradient sums add their
// row blocks with fp32 atomics. Offsets into x / dy / y are int64.
#include "common.cuh"
#include "lora_dy_products.cuh"

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace engram {
namespace {

using at::Tensor;

constexpr int kKeepBits = 24;
constexpr int kShrinkThreads = 128;
constexpr int kExpandThreads = 256;
constexpr int kOuterThreads = 128;
constexpr int kOuterRows = 256;  // rows per grouped-outer block (fewer atomics per output)
constexpr int kOuterRank = 16;   // rank entries per grouped-outer block (registers per thread)

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The adapter of sorted row i: a with offsets[a + 1] <= i < offsets[a + 2], or -1 (no adapter).
__device__ __forceinline__ int64_t adapter_of(const int64_t* offsets, int64_t n_adapters, int64_t i) {
  int64_t lo = 0, hi = n_adapters;  // answer in [-1, n_adapters)
  if (i < offsets[1]) return -1;
  while (lo < hi) {  // last a with offsets[a + 1] <= i
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid + 1] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t cols,
                               uint32_t seed, uint32_t threshold, float inv_keep) {
  const int64_t total = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / cols, col = e % cols;
    const uint32_t h = fmix32(fmix32((static_cast<uint32_t>(row) * 0x9E3779B1u) ^ seed) + static_cast<uint32_t>(col));
    const bool keep = (h >> (32 - kKeepBits)) < threshold;
    out[e] = static_cast<T>(keep ? static_cast<float>(x[e]) * inv_keep : 0.f);
  }
}

// out[i, j] = scale[a] * sum_k src[perm[i], k] * w(a, j, k); one block per sorted row, a warp per j.
template <typename T>
__global__ void shrink_kernel(const T* __restrict__ src, const int64_t* __restrict__ perm,
                              const int64_t* __restrict__ offsets, const T* __restrict__ w,
                              const float* __restrict__ scales, T* __restrict__ out, int64_t n_adapters, int64_t k_dim,
                              int64_t rank, int64_t src_stride, int64_t w_sa, int64_t w_sj, int64_t w_sk) {
  const int64_t i = blockIdx.x;
  const int64_t a = adapter_of(offsets, n_adapters, i);
  if (a < 0) return;  // out is zero-initialized
  const T* row = src + perm[i] * src_stride;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const float scale = scales ? scales[a] : 1.f;
  for (int64_t j = warp; j < rank; j += warps) {
    const T* wj = w + a * w_sa + j * w_sj;
    float sum = 0.f;
    for (int64_t k = lane; k < k_dim; k += kWarp) sum += static_cast<float>(row[k]) * static_cast<float>(wj[k * w_sk]);
    for (int offset = kWarp / 2; offset; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[i * rank + j] = static_cast<T>(sum * scale);
  }
}

// dst[perm[i], c] += scale[a] * sum_j small[i, j] * w(a, j, c); a thread per column.
template <typename T>
__global__ void expand_kernel(T* __restrict__ dst, const int64_t* __restrict__ perm,
                              const int64_t* __restrict__ offsets, const T* __restrict__ small,
                              const T* __restrict__ w, const float* __restrict__ scales, int64_t n_adapters,
                              int64_t cols, int64_t rank, int64_t dst_stride, int64_t w_sa, int64_t w_sj,
                              int64_t w_sk) {
  extern __shared__ float coef[];  // small[i, :] * scale
  const int64_t i = blockIdx.x;  // rows on x: gridDim.y stops at 65535
  const int64_t a = adapter_of(offsets, n_adapters, i);
  if (a < 0) return;
  const float scale = scales ? scales[a] : 1.f;
  for (int64_t j = threadIdx.x; j < rank; j += blockDim.x) coef[j] = static_cast<float>(small[i * rank + j]) * scale;
  __syncthreads();
  const int64_t c = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const T* wc = w + a * w_sa + c * w_sk;
  float acc = 0.f;
  for (int64_t j = 0; j < rank; ++j) acc += coef[j] * static_cast<float>(wc[j * w_sj]);
  T* out = dst + perm[i] * dst_stride + c;
  *out = static_cast<T>(static_cast<float>(*out) + acc);
}

// out[a, j, c] += sum over sorted rows i of adapter a of small[i, j] * big[perm[i], c]. A block
// covers kOuterRows rows (possibly several adapters: it flushes at each boundary), kOuterRank
// ranks and blockDim.x columns.
template <typename T>
__global__ void grouped_outer_kernel(const T* __restrict__ small, const T* __restrict__ big,
                                     const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                     float* __restrict__ out, int64_t n_rows, int64_t n_adapters, int64_t cols,
                                     int64_t rank, int64_t big_stride) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t first = blockIdx.y * static_cast<int64_t>(kOuterRows);
  const int64_t last = min(first + kOuterRows, n_rows);
  const int64_t j0 = blockIdx.z * static_cast<int64_t>(kOuterRank);
  if (c >= cols) return;
  float acc[kOuterRank];
  int64_t a = adapter_of(offsets, n_adapters, first);
  int64_t seg_end = offsets[a + 2];
  auto flush = [&]() {
    if (a < 0) return;
    float* dst = out + (a * rank + j0) * cols + c;
#pragma unroll
    for (int jj = 0; jj < kOuterRank; ++jj)
      if (j0 + jj < rank) atomicAdd(dst + jj * cols, acc[jj]);
  };
#pragma unroll
  for (int jj = 0; jj < kOuterRank; ++jj) acc[jj] = 0.f;
  for (int64_t i = first; i < last; ++i) {
    if (i >= seg_end) {
      flush();
      a = adapter_of(offsets, n_adapters, i);
      seg_end = offsets[a + 2];
#pragma unroll
      for (int jj = 0; jj < kOuterRank; ++jj) acc[jj] = 0.f;
    }
    if (a < 0) continue;
    const float b = static_cast<float>(big[perm[i] * big_stride + c]);
    const T* s = small + i * rank + j0;
#pragma unroll
    for (int jj = 0; jj < kOuterRank; ++jj)
      if (j0 + jj < rank) acc[jj] += static_cast<float>(s[jj]) * b;
  }
  flush();
}

int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535LL * 16));
}

const float* scales_ptr(const std::optional<Tensor>& scales) {
  return scales.has_value() ? scales->data_ptr<float>() : nullptr;
}

template <typename T, bool kCopyRows>
void launch_dy_kernel(const Tensor& dy, const Tensor& b, const T* u, Tensor& g_part, float* d_part,
                      const dy_products::Plan& plan, T* copy_to, int64_t copy_ld) {
  const auto kernel = dy_products::dy_products_kernel<T, kCopyRows>;
  constexpr int kShared = sizeof(dy_products::Shared<T>);
  static const bool attribute_set = [&] {  // over 48 KB of dynamic shared memory needs the opt-in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared));
    return true;
  }();
  (void)attribute_set;
  const dim3 grid(static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(plan.splits));
  kernel<<<grid, dy_products::kWarps * kWarp, kShared, c10::cuda::getCurrentCUDAStream()>>>(
      dy.data_ptr<T>(), b.data_ptr<T>(), u, g_part.data_ptr<float>(), d_part, dy.size(0), dy.size(1),
      plan.tiles_per_split, copy_to, copy_ld);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// About two blocks per SM (their shared memory fills it) for a (n, c) dy.
dy_products::Plan dy_plan(const Tensor& dy) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dy.get_device()));
  return dy_products::plan(dy.size(0), dy.size(1), 2 * static_cast<int64_t>(sms));
}

}  // namespace

Tensor lora_dropout(const Tensor& x, double p, int64_t seed) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  Tensor src = x.contiguous();
  Tensor out = at::empty_like(src);
  if (src.numel() == 0) return out;
  const uint32_t threshold = static_cast<uint32_t>(std::llround((1.0 - p) * (1 << kKeepBits)));
  ENGRAM_DISPATCH_FLOATS(src.scalar_type(), "lora_dropout", [&] {
    dropout_kernel<scalar_t><<<blocks_for(src.numel(), 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src.size(0), src.size(1), static_cast<uint32_t>(seed),
        threshold, static_cast<float>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor sgmv_shrink(const Tensor& src, const Tensor& perm, const Tensor& offsets, const Tensor& w,
                   const std::optional<Tensor>& scales) {
  const at::cuda::OptionalCUDAGuard guard(src.device());
  TORCH_CHECK(src.stride(1) == 1, "sgmv_shrink: src rows must be contiguous");
  const int64_t rows = src.size(0), n_adapters = w.size(0), rank = w.size(1);
  Tensor out = at::zeros({rows, rank}, src.options());
  if (rows == 0) return out;
  ENGRAM_DISPATCH_FLOATS(src.scalar_type(), "sgmv_shrink", [&] {
    shrink_kernel<scalar_t><<<static_cast<unsigned>(rows), kShrinkThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
        scales_ptr(scales), out.data_ptr<scalar_t>(), n_adapters, w.size(2), rank, src.stride(0), w.stride(0),
        w.stride(1), w.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void sgmv_expand_(const Tensor& dst, const Tensor& perm, const Tensor& offsets, const Tensor& small, const Tensor& w,
                  const std::optional<Tensor>& scales) {
  const at::cuda::OptionalCUDAGuard guard(dst.device());
  TORCH_CHECK(dst.stride(1) == 1 && small.is_contiguous(), "sgmv_expand_: dst rows and small must be contiguous");
  const int64_t rows = dst.size(0), n_adapters = w.size(0), rank = w.size(1), cols = w.size(2);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((cols + kExpandThreads - 1) / kExpandThreads));
  ENGRAM_DISPATCH_FLOATS(dst.scalar_type(), "sgmv_expand_", [&] {
    expand_kernel<scalar_t><<<grid, kExpandThreads, rank * sizeof(float), c10::cuda::getCurrentCUDAStream()>>>(
        dst.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), small.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), scales_ptr(scales), n_adapters, cols, rank, dst.stride(0), w.stride(0), w.stride(1),
        w.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<Tensor> fused_dy_products(const Tensor& dy, const Tensor& b, const Tensor& u) {
  const at::cuda::OptionalCUDAGuard guard(dy.device());
  const int64_t n = dy.size(0), c = dy.size(1);
  TORCH_CHECK(dy.is_contiguous() && b.is_contiguous() && u.is_contiguous() && c % 8 == 0 &&
                  b.size(1) == dy_products::kRank && u.size(1) == dy_products::kRank,
              "fused_dy_products: contiguous dy (N, C) with C % 8 == 0, B (C, 16) and u (N, 16)");
  if (n == 0 || c == 0)
    return {at::zeros({n, dy_products::kRank}, dy.options().dtype(at::kFloat)),
            at::zeros({dy_products::kRank, c}, dy.options().dtype(at::kFloat))};
  const auto plan = dy_plan(dy);
  Tensor g_part = at::empty({plan.splits, n, dy_products::kRank}, dy.options().dtype(at::kFloat));
  Tensor d_part = at::empty({plan.row_blocks, dy_products::kRank, c}, dy.options().dtype(at::kFloat));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dy.scalar_type(), "fused_dy_products", [&] {
    launch_dy_kernel<scalar_t, false>(dy, b, u.data_ptr<scalar_t>(), g_part, d_part.data_ptr<float>(), plan, nullptr,
                                      0);
  });
  return {g_part.sum(0), d_part.sum(0)};
}

Tensor fused_x_products(const Tensor& x, const Tensor& a_t, const Tensor& xu) {
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t n = x.size(0), k = x.size(1);
  TORCH_CHECK(x.is_contiguous() && a_t.is_contiguous() && k % 8 == 0 && a_t.size(0) == k &&
                  a_t.size(1) == dy_products::kRank && xu.scalar_type() == x.scalar_type() && xu.size(0) == n &&
                  xu.size(1) >= k && xu.stride(1) == 1 && xu.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(xu.data_ptr()) % 16 == 0,
              "fused_x_products: contiguous x (N, K) with K % 8 == 0, A^T (K, 16), xu (N, >= K) of x's dtype with "
              "16-byte aligned rows");
  if (n == 0 || k == 0) return at::zeros({n, dy_products::kRank}, x.options().dtype(at::kFloat));
  const auto plan = dy_plan(x);
  Tensor g_part = at::empty({plan.splits, n, dy_products::kRank}, x.options().dtype(at::kFloat));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "fused_x_products", [&] {
    launch_dy_kernel<scalar_t, true>(x, a_t, nullptr, g_part, nullptr, plan, xu.data_ptr<scalar_t>(), xu.stride(0));
  });
  return g_part.sum(0);
}

Tensor grouped_outer(const Tensor& small, const Tensor& big, const Tensor& perm, const Tensor& offsets,
                     int64_t n_adapters) {
  const at::cuda::OptionalCUDAGuard guard(big.device());
  TORCH_CHECK(big.stride(1) == 1 && small.is_contiguous(), "grouped_outer: big rows and small must be contiguous");
  const int64_t rows = big.size(0), rank = small.size(1), cols = big.size(1);
  Tensor out = at::zeros({n_adapters, rank, cols}, big.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const dim3 grid(static_cast<unsigned>((cols + kOuterThreads - 1) / kOuterThreads),
                  static_cast<unsigned>((rows + kOuterRows - 1) / kOuterRows),
                  static_cast<unsigned>((rank + kOuterRank - 1) / kOuterRank));
  ENGRAM_DISPATCH_FLOATS(big.scalar_type(), "grouped_outer", [&] {
    grouped_outer_kernel<scalar_t><<<grid, kOuterThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        small.data_ptr<scalar_t>(), big.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
        out.data_ptr<float>(), rows, n_adapters, cols, rank, big.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace engram
