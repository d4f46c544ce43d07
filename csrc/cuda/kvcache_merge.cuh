// The merge of split-K decode partials (each a softmax state: max m, sum l, unnormalized output) into
// the attention output: the merge kernel both decode kernels end with (kvcache.cu), and in the
// tensor-core kernel (kvcache_decode_mma.cuh) the combine of a block's warps and the fused merge of
// its last block per head.
//
// Each thread folds its share of the parts into one running state in a single pass: the parts'
// loads do not depend on the state, so a batch of them is in flight at once, and no block-wide
// max or sum has to be known first (a pass for the max, one for the sums, one for the outputs
// would each wait out the L2's latency in turn).
#pragma once

namespace engram {

// A softmax state over V output channels.
template <int V>
struct SoftmaxState {
  float m = -INFINITY, l = 0.f, acc[V] = {};

  // Adds a part's state. A part that saw no token (pm = -inf; its l and acc are 0, as the decode kernels
  // write them) adds nothing: its factor is 0, and so is the state's own until it has seen one.
  __device__ __forceinline__ void add(float pm, float pl, const float (&pa)[V]) {
    const float m_new = fmaxf(m, pm), base = m_new == -INFINITY ? 0.f : m_new;
    const float keep = __expf(m - base), take = __expf(pm - base);
    l = l * keep + pl * take;
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = acc[v] * keep + pa[v] * take;
    m = m_new;
  }
};

// V consecutive floats (16-byte aligned when V is 4) from L2, or zeros.
template <int V>
__device__ __forceinline__ void load_channels(float (&x)[V], const float* p, bool valid) {
  static_assert(V == 1 || V == 4, "one channel or a float4");
  if constexpr (V == 4) {
    const float4 v = valid ? __ldcg(reinterpret_cast<const float4*>(p)) : float4{0.f, 0.f, 0.f, 0.f};
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    x[0] = valid ? __ldcg(p) : 0.f;
  }
}

// Folds parts first, first + step, ... (< n) into s, BATCH at a time (their loads issued together):
// part p's max and sum at m[p * stride], l[p * stride] and its V channels at acc[p * acc_stride].
// __ldcg: the parts may come from other blocks of the running grid (L1 is not coherent).
template <int BATCH, int V>
__device__ __forceinline__ void add_parts(SoftmaxState<V>& s, const float* m, const float* l, const float* acc,
                                          int64_t stride, int64_t acc_stride, int first, int step, int n) {
  constexpr int kBatch = BATCH;
  for (int base = first; base < n; base += kBatch * step) {
    float pm[kBatch], pl[kBatch], pa[kBatch][V];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int p = base + j * step;
      const bool valid = p < n;
      pm[j] = valid ? __ldcg(m + p * stride) : -INFINITY;
      pl[j] = valid ? __ldcg(l + p * stride) : 0.f;
      load_channels(pa[j], acc + p * acc_stride, valid);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) s.add(pm[j], pl[j], pa[j]);
  }
}

constexpr int kMergeGroups = 4;  // thread groups of a merge block, each folding every 4th part

// One block per (head, row), kMergeGroups x d threads (d <= 128): thread (group, c) folds every
// kMergeGroups-th of the head's n_parts parts of channel c, then group 0 adds the other groups'
// states. Partials (heads, n_parts, rows[, d]). Launched as a programmatic dependent of the decode
// kernel where the GPU allows (sm_90): its blocks may start before the decode grid has finished,
// and wait here until its partials are written.
template <typename T>
__global__ void merge_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l,
                             const float* __restrict__ part_acc, T* __restrict__ out, int n_parts, int rows, int d) {
  ptx::wait_for_primary();
  __shared__ float m_s[kMergeGroups][128], l_s[kMergeGroups][128], acc_s[kMergeGroups][128];
  const int64_t head = blockIdx.x, row0 = head * n_parts * rows + blockIdx.y;  // part 0's (part, row)
  const int c = threadIdx.x % d, group = threadIdx.x / d;
  SoftmaxState<1> s;
  add_parts<8>(s, part_m + row0, part_l + row0, part_acc + row0 * d + c, rows, int64_t{rows} * d, group,
               kMergeGroups, n_parts);
  m_s[group][c] = s.m, l_s[group][c] = s.l, acc_s[group][c] = s.acc[0];
  __syncthreads();
  if (group != 0) return;
#pragma unroll
  for (int g = 1; g < kMergeGroups; ++g) {
    const float pa[1] = {acc_s[g][c]};
    s.add(m_s[g][c], l_s[g][c], pa);
  }
  out[(head * rows + blockIdx.y) * d + c] = static_cast<T>(s.acc[0] / s.l);
}

}  // namespace engram
