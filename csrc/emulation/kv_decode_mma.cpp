// The tensor-core KV decode kernel (csrc/cuda/kvcache_decode_mma.cuh) built for a CPU with
// host_warps.h, behind a C function that tests load with ctypes: it runs every block of the grid,
// then the merge kernel's grid (kvcache_merge.cuh), or with `done` the last block of each head merges
// the head's split-K partials into `out` (ENGRAM_KV_MERGE=fused).
#define ENGRAM_HOST_WARPS
#include "../cuda/kvcache_decode_mma.cuh"

// Returns an error message, or nullptr when the kernel ran cleanly. `readable` lists the buffers the
// kernel may read (the inputs and the partials); the partials are (heads, n_splits, rows[, d]) fp32,
// `out` is the query's shape and dtype, `done` (heads) zeros, as the kernel must leave it, or null.
extern "C" const char* engram_kv_decode_mma(int bf16, int bits, int d, int64_t heads, int64_t packed_len,
                                            int64_t residual_len, int rows, int q_len, int group, float scale,
                                            int64_t tokens_per_split, int n_splits, int l2_prefetch,
                                            const void* query, const void* residual_keys,
                                            const void* residual_values, const void* key_codes,
                                            const void* key_scale, const void* key_zero, const void* value_codes,
                                            const void* value_scale, const void* value_zero, float* part_m,
                                            float* part_l, float* part_acc, void* out, int* done,
                                            const engram::host_warps::Buffer* readable, int n_readable) {
  if (!engram::mma_decode::supported_shape(d, bits, group, rows)) return "shape not supported by the kernel";
  engram::DecodeArgs a{};
  a.key_codes = static_cast<const uint8_t*>(key_codes);
  a.value_codes = static_cast<const uint8_t*>(value_codes);
  a.key_scale = static_cast<const __half*>(key_scale);
  a.key_zero = static_cast<const __half*>(key_zero);
  a.value_scale = static_cast<const __half*>(value_scale);
  a.value_zero = static_cast<const __half*>(value_zero);
  a.part_m = part_m, a.part_l = part_l, a.part_acc = part_acc;
  a.packed_len = packed_len, a.residual_len = residual_len;
  a.n_groups = (packed_len + group - 1) / group;
  a.tokens_per_split = tokens_per_split, a.n_splits = n_splits;
  a.rows = rows, a.q_len = q_len, a.group = group, a.gv = std::min(group, d), a.d = d;
  a.scale = scale;

  engram::host_warps::start_checks(readable, n_readable);
  const auto args = engram::mma_decode::make_args(a, l2_prefetch != 0, done);
  const auto run = [&](auto element) {
    using T = decltype(element);
    const auto kernel = engram::mma_decode::kernel_for<T>(bits, a.d, a.d / a.gv);
    engram::host_warps::run_grid(heads, a.n_splits, engram::mma_decode::kWarps * engram::kWarp,
                                 engram::mma_decode::shared_bytes(d), [&] {
      kernel(static_cast<const T*>(query), static_cast<const T*>(residual_keys),
             static_cast<const T*>(residual_values), static_cast<T*>(out), args);
    });
    if (done != nullptr || engram::host_warps::run_error() != nullptr) return;
    engram::host_warps::run_grid(heads, rows, engram::kMergeGroups * d, 0, [&] {
      engram::merge_kernel<T>(part_m, part_l, part_acc, static_cast<T*>(out), n_splits, rows, d);
    });
  };
  if (bf16) run(at::BFloat16{});
  else run(at::Half{});
  return engram::host_warps::run_error();
}
