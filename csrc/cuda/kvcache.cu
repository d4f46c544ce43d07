// CUDA kernels for the KV-cache ops (KIVI int4/int2). Semantics and layout:
// engram_kernels/ops/kvcache/naive.py. All arithmetic is fp32; scales and zero points are fp16.
//
// decode attention is split-K flash decoding: one block per (batch x KV head, split of the tokens),
// each warp of the block walks its own tokens with a lane per CPL = D / 32 channels, dequantizes
// the key and value codes in registers (never in memory), reduces q.k over the warp with shuffles
// and keeps an online softmax per query row (all GQA heads x query tokens of the KV head). Every
// warp writes its (max, sum, output) triple; a second kernel (kvcache_merge.cuh) merges them. The
// last split of each head takes the full-precision residual window. 16-bit queries of the common
// shapes take the tensor-core kernel of kvcache_decode_mma.cuh instead (one partial per block, the
// same merge, or with ENGRAM_KV_MERGE=fused its last block per head merges). The number of splits
// follows the kernel's occupancy: one wave of resident blocks.
#include "common.cuh"
#include "kvcache_decode_mma.cuh"
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

namespace engram {
namespace {

using at::Tensor;

constexpr int kWarps = 4;  // per decode block
constexpr int64_t kMaxDecodeRows = 16;  // query rows per KV head (the CUDA-core kernel's largest build)
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float load_half(const __half* p) { return __half2float(__ldg(p)); }

// Code of channel c in a planar-packed row of `bytes` bytes: byte c % bytes, bit field c / bytes.
template <int BITS>
__device__ __forceinline__ float code_at(const uint8_t* row, int c, int bytes) {
  return static_cast<float>((__ldg(row + c % bytes) >> ((c / bytes) * BITS)) & ((1 << BITS) - 1));
}

int grid_size(int64_t work, int per_block) {
  return static_cast<int>(std::min<int64_t>((work + per_block - 1) / per_block, 1 << 20));
}

// ---- quantize ----------------------------------------------------------------------------------

struct Params {
  __half scale, zero;
  float divisor, zero_f;
};

__device__ __forceinline__ Params quant_params(float lo, float hi, int levels) {
  Params p;
  p.scale = __float2half_rn((hi - lo) / levels);
  p.zero = __float2half_rn(lo);
  const float s = __half2float(p.scale);
  p.divisor = s > 0.f ? s : 1.f;
  p.zero_f = __half2float(p.zero);
  return p;
}

__device__ __forceinline__ int quant_code(float x, const Params& p, int levels) {
  const float c = nearbyintf(__fdiv_rn(x - p.zero_f, p.divisor));
  return static_cast<int>(fminf(fmaxf(c, 0.f), static_cast<float>(levels)));
}

// One block per (head, token group); a thread per packed byte j: channels j, j + P, ... of the group.
template <typename T, int BITS>
__global__ void quantize_keys_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes, __half* __restrict__ scale,
                                     __half* __restrict__ zero, int64_t t_len, int64_t n_groups, int group, int d) {
  constexpr int kPer = 8 / BITS;
  const int levels = (1 << BITS) - 1, bytes = d * BITS / 8;
  const int64_t head = blockIdx.x / n_groups, g = blockIdx.x % n_groups;
  const int64_t t0 = g * group, t1 = min(t0 + group, t_len);
  for (int j = threadIdx.x; j < bytes; j += blockDim.x) {
    Params p[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = j + i * bytes;
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t t = t0; t < t1; ++t) {
        const float v = static_cast<float>(x[(head * t_len + t) * d + c]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
      p[i] = quant_params(lo, hi, levels);
      scale[(head * n_groups + g) * d + c] = p[i].scale;
      zero[(head * n_groups + g) * d + c] = p[i].zero;
    }
    for (int64_t t = t0; t < t1; ++t) {
      int byte = 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        byte |= quant_code(static_cast<float>(x[(head * t_len + t) * d + j + i * bytes]), p[i], levels) << (BITS * i);
      codes[(head * t_len + t) * bytes + j] = static_cast<uint8_t>(byte);
    }
  }
}

// One warp per token row: group parameters in shared memory, then a lane per packed byte.
template <typename T, int BITS>
__global__ void quantize_values_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                       __half* __restrict__ scale, __half* __restrict__ zero, int64_t n_rows, int d,
                                       int gv) {
  constexpr int kPer = 8 / BITS;
  extern __shared__ float shared[];  // per warp: divisor and zero of each value group
  const int levels = (1 << BITS) - 1, bytes = d * BITS / 8, n_groups = d / gv;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* divisor = shared + warp * 2 * n_groups;
  float* zero_f = divisor + n_groups;
  // grid_size caps the grid: a warp takes every stride-th row (whole warps leave together; no
  // block-wide barrier follows)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp; row < n_rows; row += stride) {
    const T* src = x + row * d;
    for (int g = 0; g < n_groups; ++g) {
      float lo = INFINITY, hi = -INFINITY;
      for (int c = g * gv + lane; c < (g + 1) * gv; c += kWarp) {
        lo = fminf(lo, static_cast<float>(src[c]));
        hi = fmaxf(hi, static_cast<float>(src[c]));
      }
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, offset));
        hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, offset));
      }
      if (lane == 0) {
        const Params p = quant_params(lo, hi, levels);
        scale[row * n_groups + g] = p.scale;
        zero[row * n_groups + g] = p.zero;
        divisor[g] = p.divisor;
        zero_f[g] = p.zero_f;
      }
    }
    __syncwarp();
    for (int j = lane; j < bytes; j += kWarp) {
      int byte = 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = j + i * bytes, g = c / gv;
        Params p;
        p.divisor = divisor[g];
        p.zero_f = zero_f[g];
        byte |= quant_code(static_cast<float>(src[c]), p, levels) << (BITS * i);
      }
      codes[row * bytes + j] = static_cast<uint8_t>(byte);
    }
    __syncwarp();  // the next row's group parameters overwrite this row's
  }
}

// ---- dequantize --------------------------------------------------------------------------------

template <typename T, int BITS, bool KEYS>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const __half* __restrict__ scale,
                                  const __half* __restrict__ zero, T* __restrict__ out, int64_t n, int64_t t_len,
                                  int64_t n_groups, int group, int d, int gv) {
  const int bytes = d * BITS / 8;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / d;
    const int c = static_cast<int>(i % d);
    const float q = code_at<BITS>(codes + row * bytes, c, bytes);
    int64_t at;
    if (KEYS) {
      at = ((row / t_len) * n_groups + (row % t_len) / group) * d + c;
    } else {
      at = row * (d / gv) + c / gv;
    }
    out[i] = static_cast<T>(q * load_half(scale + at) + load_half(zero + at));
  }
}

// ---- decode attention --------------------------------------------------------------------------

// Online softmax state of one warp for MAX_ROWS query rows; lane holds channels lane + 32 k.
template <int CPL, int MAX_ROWS>
struct WarpState {
  float m[MAX_ROWS], l[MAX_ROWS], acc[MAX_ROWS][CPL];

  __device__ void init() {
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {
      m[r] = kNegInf;
      l[r] = 0.f;
#pragma unroll
      for (int k = 0; k < CPL; ++k) acc[r][k] = 0.f;
    }
  }

  // Folds one token (its dequantized key and value channels) into every row that may see it.
  __device__ void fold(const float (&q)[MAX_ROWS][CPL], const float (&key)[CPL], const float (&value)[CPL],
                       int64_t pos, int64_t last_visible, int rows, int q_len) {
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {
      if (r >= rows) break;
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < CPL; ++k) s += q[r][k] * key[k];
      s = warp_sum(s);
      if (pos > last_visible + r % q_len) continue;  // causal: row r is query token r % q_len
      if (s > m[r]) {  // rescale only when the running max grows (s is the same in every lane)
        const float corr = __expf(m[r] - s);
        l[r] *= corr;
#pragma unroll
        for (int k = 0; k < CPL; ++k) acc[r][k] *= corr;
        m[r] = s;
      }
      const float p = __expf(s - m[r]);
      l[r] += p;
#pragma unroll
      for (int k = 0; k < CPL; ++k) acc[r][k] += p * value[k];
    }
  }
};

template <typename T, int BITS, int CPL, int MAX_ROWS>
__global__ void __launch_bounds__(kWarps * kWarp) decode_kernel(const T* __restrict__ query,
                                                                const T* __restrict__ residual_keys,
                                                                const T* __restrict__ residual_values,
                                                                DecodeArgs a) {
  const int64_t head = blockIdx.x;  // batch x KV head
  const int split = blockIdx.y, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int bytes = a.d * BITS / 8, n_vgroups = a.d / a.gv;
  float q[MAX_ROWS][CPL];
#pragma unroll
  for (int r = 0; r < MAX_ROWS; ++r)
#pragma unroll
    for (int k = 0; k < CPL; ++k)
      q[r][k] = r < a.rows ? static_cast<float>(query[(head * a.rows + r) * a.d + lane + kWarp * k]) * a.scale : 0.f;
  // The KV head's query rows are contiguous in (B, Hq, Tq, D): N_REP heads x Tq tokens.
  const int64_t last_visible = a.packed_len + a.residual_len - a.q_len;  // + r % q_len for row r
  WarpState<CPL, MAX_ROWS> state;
  state.init();
  float key[CPL], value[CPL];

  const int64_t t0 = split * a.tokens_per_split, t1 = min(t0 + a.tokens_per_split, a.packed_len);
#pragma unroll 2
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const int64_t row = head * a.packed_len + t;
    const uint8_t* kc = a.key_codes + row * bytes;
    const uint8_t* vc = a.value_codes + row * bytes;
    const int64_t kp = (head * a.n_groups + t / a.group) * a.d;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int c = lane + kWarp * k;
      key[k] = code_at<BITS>(kc, c, bytes) * load_half(a.key_scale + kp + c) + load_half(a.key_zero + kp + c);
      const int64_t vp = row * n_vgroups + c / a.gv;
      value[k] = code_at<BITS>(vc, c, bytes) * load_half(a.value_scale + vp) + load_half(a.value_zero + vp);
    }
    state.fold(q, key, value, t, last_visible, a.rows, a.q_len);
  }
  if (split == a.n_splits - 1) {
    for (int64_t t = warp; t < a.residual_len; t += kWarps) {
      const int64_t at = (head * a.residual_len + t) * a.d;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        key[k] = static_cast<float>(residual_keys[at + lane + kWarp * k]);
        value[k] = static_cast<float>(residual_values[at + lane + kWarp * k]);
      }
      state.fold(q, key, value, a.packed_len + t, last_visible, a.rows, a.q_len);
    }
  }
  const int64_t part = (head * a.n_splits + split) * kWarps + warp;
#pragma unroll
  for (int r = 0; r < MAX_ROWS; ++r) {
    if (r >= a.rows) break;
    if (lane == 0) {
      a.part_m[part * a.rows + r] = state.m[r];
      a.part_l[part * a.rows + r] = state.l[r];
    }
#pragma unroll
    for (int k = 0; k < CPL; ++k) a.part_acc[(part * a.rows + r) * a.d + lane + kWarp * k] = state.acc[r][k];
  }
}

bool aligned(const Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

// Per-head counters of finished splits for the tensor-core kernel's merge, one array per device and
// stream: zeroed when allocated, and every kernel leaves them zero.
int* split_counters(int64_t heads) {
  static std::mutex mutex;
  static auto* known = new std::map<std::pair<int, cudaStream_t>, Tensor>;  // never freed: no CUDA calls at exit
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& counters = (*known)[{stream.device_index(), stream.stream()}];
  if (!counters.defined() || counters.numel() < heads)
    counters = at::zeros({std::max<int64_t>(heads, 64)}, at::TensorOptions(at::kInt).device(at::kCUDA, stream.device_index()));
  return counters.data_ptr<int>();
}

// The tensor-core kernel's switches, read per call (a probe can flip them): ENGRAM_KV_L2_PREFETCH=0
// drops the L2 prefetches, ENGRAM_KV_MERGE=fused has each head's last block merge the splits.
mma_decode::Args mma_args(const DecodeArgs& a, int64_t heads) {
  const char* prefetch = std::getenv("ENGRAM_KV_L2_PREFETCH");
  const char* merge = std::getenv("ENGRAM_KV_MERGE");
  const bool fused = merge != nullptr && std::strcmp(merge, "fused") == 0;
  return mma_decode::make_args(a, prefetch == nullptr || std::strcmp(prefetch, "0") != 0,
                               fused ? split_counters(heads) : nullptr);
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

const __half* half_ptr(const Tensor& t) { return reinterpret_cast<const __half*>(t.data_ptr<at::Half>()); }
__half* half_ptr_mut(Tensor& t) { return reinterpret_cast<__half*>(t.data_ptr<at::Half>()); }

// Blocks of `kernel` resident at once on the current device (asked once per kernel and device).
int resident_blocks(const void* kernel, size_t shared_bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> known;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find({kernel, device});
  if (it == known.end()) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * kWarp, shared_bytes));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = known.emplace(std::make_pair(kernel, device), std::max(per_sm, 1) * sms).first;
  }
  return it->second;
}

// Token splits per head for `kernel`: as many as make the grid one wave of resident blocks (a partly
// filled second wave would cost a whole block's time), less the residual window's split, the last.
void plan_splits(DecodeArgs& a, const void* kernel, size_t shared_bytes, int64_t heads) {
  const int64_t units = (a.packed_len + 63) / 64;  // splits hold whole 64-token units
  const int64_t n = std::max<int64_t>(1, std::min(resident_blocks(kernel, shared_bytes) / heads - 1, units));
  a.tokens_per_split = std::max<int64_t>(1, (units + n - 1) / n) * 64;
  a.n_splits = static_cast<int>((a.packed_len + a.tokens_per_split - 1) / a.tokens_per_split + 1);
}

// Plans the splits for `kernel` (with `shared_bytes` of dynamic shared memory) and points `a` at new
// partials, `block_parts` per block; returns their storage.
Tensor plan_partials(DecodeArgs& a, const void* kernel, size_t shared_bytes, int block_parts, const Tensor& query,
                     int64_t heads) {
  plan_splits(a, kernel, shared_bytes, heads);
  // one allocation for the three partial arrays (a decode step pays per allocation, per layer)
  const int64_t stats = heads * a.n_splits * block_parts * a.rows, padded = (stats + 3) / 4 * 4;
  Tensor parts = at::empty({padded * 2 + stats * a.d}, query.options().dtype(at::kFloat));
  a.part_m = parts.data_ptr<float>();
  a.part_l = a.part_m + padded;
  a.part_acc = a.part_l + padded;  // 16-byte aligned: the fused merge reads it as float4
  return parts;
}

// Whether the merge kernel starts as a programmatic dependent of the decode kernel (sm_90+; its blocks
// launch while the decode grid drains instead of after it): ENGRAM_KV_PDL=0 turns it off (to time it).
bool programmatic_merge() {
  const char* pdl = std::getenv("ENGRAM_KV_PDL");
  return (pdl == nullptr || std::strcmp(pdl, "0") != 0) && mma_decode::compute_major() >= 9;
}

template <typename T>
void launch_merge(const DecodeArgs& a, Tensor& out, int n_parts, int64_t heads, cudaStream_t stream) {
  cudaLaunchAttribute programmatic{};
  programmatic.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  programmatic.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(heads, a.rows);
  config.blockDim = dim3(kMergeGroups * a.d);
  config.stream = stream;
  config.attrs = &programmatic;
  config.numAttrs = programmatic_merge() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, merge_kernel<T>, a.part_m, a.part_l, a.part_acc, out.data_ptr<T>(),
                                    n_parts, a.rows, a.d));
}

// The CUDA-core kernel (one partial per warp) and the merge kernel.
template <typename T, typename Kernel>
Tensor run_decode(Kernel kernel, DecodeArgs a, const Tensor& query, const Tensor& rk, const Tensor& rv,
                  int64_t heads) {
  const Tensor parts = plan_partials(a, reinterpret_cast<const void*>(kernel), 0, kWarps, query, heads);
  const int n_parts = a.n_splits * kWarps;
  auto out = at::empty_like(query);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(heads, a.n_splits), kWarps * kWarp, 0, stream>>>(query.data_ptr<T>(), rk.data_ptr<T>(),
                                                                  rv.data_ptr<T>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_merge<T>(a, out, n_parts, heads, stream);
  return out;
}

// A tensor-core kernel (one partial per block) and the merge kernel, or with ENGRAM_KV_MERGE=fused
// the kernel alone (its last block per head merges).
template <typename T, typename Kernel>
Tensor run_mma_decode(Kernel kernel, const DecodeArgs& a, const Tensor& query, const Tensor& rk, const Tensor& rv,
                      int64_t heads) {
  const size_t shared = mma_decode::shared_bytes(a.d);
  mma_decode::Args m = mma_args(a, heads);
  const Tensor parts = plan_partials(m, reinterpret_cast<const void*>(kernel), shared, 1, query, heads);
  auto out = at::empty_like(query);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(heads, m.n_splits), kWarps * kWarp, shared, stream>>>(query.data_ptr<T>(), rk.data_ptr<T>(),
                                                                      rv.data_ptr<T>(), out.data_ptr<T>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (m.done == nullptr) launch_merge<T>(m, out, m.n_splits, heads, stream);
  return out;
}

// The CUDA-core kernel (one partial per warp) for these bits, channels per lane and query rows.
template <typename T, int BITS, int CPL>
Tensor decode_cuda_cores(const DecodeArgs& a, const Tensor& query, const Tensor& rk, const Tensor& rv,
                         int64_t heads) {
  if (a.rows <= 4) return run_decode<T>(decode_kernel<T, BITS, CPL, 4>, a, query, rk, rv, heads);
  if (a.rows <= 8) return run_decode<T>(decode_kernel<T, BITS, CPL, 8>, a, query, rk, rv, heads);
  return run_decode<T>(decode_kernel<T, BITS, CPL, 16>, a, query, rk, rv, heads);
}

template <typename T>
Tensor decode(const DecodeArgs& a, int64_t bits, bool tensor_cores, const Tensor& query, const Tensor& rk,
              const Tensor& rv, int64_t heads) {
  static_assert(mma_decode::kWarps == kWarps, "both decode kernels plan their splits for kWarps warps");
  if constexpr (!std::is_same_v<T, float>) {  // mma_decode::supported admits 16-bit queries only
    if (tensor_cores)
      return run_mma_decode<T>(mma_decode::kernel_for<T>(bits, a.d, a.d / a.gv), a, query, rk, rv, heads);
  }
  if (bits == 4)
    return a.d == 64 ? decode_cuda_cores<T, 4, 2>(a, query, rk, rv, heads)
                     : decode_cuda_cores<T, 4, 4>(a, query, rk, rv, heads);
  return a.d == 64 ? decode_cuda_cores<T, 2, 2>(a, query, rk, rv, heads)
                   : decode_cuda_cores<T, 2, 4>(a, query, rk, rv, heads);
}

// A decode call's kernel arguments from its (checked) tensors, its batch x KV heads, and whether the
// tensor-core kernel takes it.
struct DecodeCall {
  DecodeArgs args;
  int64_t heads;
  bool tensor_cores;
};

DecodeCall decode_call(const Tensor& query, const Tensor& key_codes, const Tensor& key_scale, const Tensor& key_zero,
                       const Tensor& value_codes, const Tensor& value_scale, const Tensor& value_zero,
                       const Tensor& residual_keys, const Tensor& residual_values, int64_t bits, int64_t group,
                       double scale) {
  for (const Tensor* t : {&query, &key_codes, &key_scale, &key_zero, &value_codes, &value_scale, &value_zero,
                          &residual_keys, &residual_values})
    check_cuda(*t, "decode_attention inputs");
  const int64_t d = query.size(3), hkv = key_codes.size(1);
  const int64_t rows = query.size(1) / hkv * query.size(2), heads = query.size(0) * hkv;
  TORCH_CHECK(d == 64 || d == 128, "the CUDA decode kernel takes head dims 64 and 128, got ", d);
  TORCH_CHECK(rows <= kMaxDecodeRows, "the CUDA decode kernel takes up to 16 query rows per KV head");
  TORCH_CHECK(residual_keys.scalar_type() == query.scalar_type(), "residual dtype must match the query");
  DecodeArgs a;
  a.key_codes = key_codes.data_ptr<uint8_t>();
  a.value_codes = value_codes.data_ptr<uint8_t>();
  a.key_scale = half_ptr(key_scale);
  a.key_zero = half_ptr(key_zero);
  a.value_scale = half_ptr(value_scale);
  a.value_zero = half_ptr(value_zero);
  a.packed_len = key_codes.size(2);
  a.residual_len = residual_keys.size(2);
  a.n_groups = (a.packed_len + group - 1) / group;
  a.rows = static_cast<int>(rows);
  a.q_len = static_cast<int>(query.size(2));
  a.group = static_cast<int>(group);
  a.gv = static_cast<int>(std::min<int64_t>(group, d));
  a.d = static_cast<int>(d);
  a.scale = static_cast<float>(scale);
  const bool tensor_cores = mma_decode::supported(query.scalar_type(), d, bits, group, rows) &&
                            aligned(query, 16) && aligned(key_codes, 16) && aligned(value_codes, 8) &&
                            aligned(key_scale, 16) && aligned(key_zero, 16) && aligned(value_scale, 8) &&
                            aligned(value_zero, 8) && aligned(residual_keys, 8);
  return {a, heads, tensor_cores};
}

}  // namespace

int64_t decode_max_rows() { return kMaxDecodeRows; }

#ifndef ENGRAM_KV_ABLATION  // kvcache_ablation.cu includes this file for its host code, not these ops

std::vector<Tensor> quantize_keys(const Tensor& keys, int64_t bits, int64_t group) {
  check_cuda(keys, "keys");
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t b = keys.size(0), h = keys.size(1), t = keys.size(2), d = keys.size(3);
  const int64_t n_groups = (t + group - 1) / group;
  auto codes = at::empty({b, h, t, d * bits / 8}, keys.options().dtype(at::kByte));
  auto scale = at::empty({b, h, n_groups, d}, keys.options().dtype(at::kHalf));
  auto zero = at::empty_like(scale);
  if (codes.numel() == 0) return {codes, scale, zero};
  const int threads = static_cast<int>(std::min<int64_t>(128, d * bits / 8));
  ENGRAM_DISPATCH_FLOATS(keys.scalar_type(), "kv_quantize_keys", [&] {
    auto kernel = bits == 4 ? quantize_keys_kernel<scalar_t, 4> : quantize_keys_kernel<scalar_t, 2>;
    kernel<<<b * h * n_groups, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        keys.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), half_ptr_mut(scale), half_ptr_mut(zero), t, n_groups,
        static_cast<int>(group), static_cast<int>(d));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

std::vector<Tensor> quantize_values(const Tensor& values, int64_t bits, int64_t group) {
  check_cuda(values, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t b = values.size(0), h = values.size(1), t = values.size(2), d = values.size(3);
  const int64_t gv = std::min(group, d), rows = b * h * t;
  auto codes = at::empty({b, h, t, d * bits / 8}, values.options().dtype(at::kByte));
  auto scale = at::empty({b, h, t, d / gv}, values.options().dtype(at::kHalf));
  auto zero = at::empty_like(scale);
  if (rows == 0) return {codes, scale, zero};
  constexpr int kRowsPerBlock = 4;
  const size_t shared = kRowsPerBlock * 2 * (d / gv) * sizeof(float);
  ENGRAM_DISPATCH_FLOATS(values.scalar_type(), "kv_quantize_values", [&] {
    auto kernel = bits == 4 ? quantize_values_kernel<scalar_t, 4> : quantize_values_kernel<scalar_t, 2>;
    kernel<<<grid_size(rows, kRowsPerBlock), kRowsPerBlock * kWarp, shared, c10::cuda::getCurrentCUDAStream()>>>(
        values.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), half_ptr_mut(scale), half_ptr_mut(zero), rows,
        static_cast<int>(d), static_cast<int>(gv));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

Tensor dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t group,
                  at::ScalarType dtype, bool keys) {
  check_cuda(codes, "codes");
  check_cuda(scale, "scale");
  check_cuda(zero, "zero");
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t b = codes.size(0), h = codes.size(1), t = codes.size(2), d = codes.size(3) * 8 / bits;
  auto out = at::empty({b, h, t, d}, codes.options().dtype(dtype));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int64_t n_groups = (t + group - 1) / group, gv = std::min(group, d);
  ENGRAM_DISPATCH_FLOATS(dtype, "kv_dequantize", [&] {
    auto kernel = bits == 4 ? (keys ? dequantize_kernel<scalar_t, 4, true> : dequantize_kernel<scalar_t, 4, false>)
                            : (keys ? dequantize_kernel<scalar_t, 2, true> : dequantize_kernel<scalar_t, 2, false>);
    kernel<<<grid_size(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        codes.data_ptr<uint8_t>(), half_ptr(scale), half_ptr(zero), out.data_ptr<scalar_t>(), n, t, n_groups,
        static_cast<int>(group), static_cast<int>(d), static_cast<int>(gv));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor dequantize_keys(const Tensor& codes, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t group,
                       at::ScalarType dtype) {
  return dequantize(codes, scale, zero, bits, group, dtype, true);
}

Tensor dequantize_values(const Tensor& codes, const Tensor& scale, const Tensor& zero, int64_t bits, int64_t group,
                         at::ScalarType dtype) {
  return dequantize(codes, scale, zero, bits, group, dtype, false);
}

Tensor decode_attention(const Tensor& query, const Tensor& key_codes, const Tensor& key_scale,
                        const Tensor& key_zero, const Tensor& value_codes, const Tensor& value_scale,
                        const Tensor& value_zero, const Tensor& residual_keys, const Tensor& residual_values,
                        int64_t bits, int64_t group, double scale) {
  const c10::cuda::CUDAGuard guard(query.device());
  const DecodeCall call = decode_call(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                      residual_keys, residual_values, bits, group, scale);
  Tensor out;
  ENGRAM_DISPATCH_FLOATS(query.scalar_type(), "kv_decode_attention", [&] {
    out = decode<scalar_t>(call.args, bits, call.tensor_cores, query, residual_keys, residual_values, call.heads);
  });
  return out;
}
#endif  // ENGRAM_KV_ABLATION

}  // namespace engram
