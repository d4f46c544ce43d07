// The LoRA backward's fused dy products (csrc/cuda/lora_dy_products.cuh) built for a CPU with
// host_warps.h, behind a C function that tests load with ctypes: it runs every block of the plan's
// grid and leaves the partials for the caller to add up.
#define ENGRAM_HOST_WARPS
#include "../cuda/lora_dy_products.cuh"

// Plans the grid for about `target_blocks` blocks and writes its shape to plan_out (row blocks,
// splits, tiles per split); with g_part null only plans. Returns an error message or nullptr.
// With copy_to set (and u, d_part null) it runs the kCopyRows kernel: g only, and dy's rows written
// on to copy_to (row stride copy_ld).
extern "C" const char* engram_lora_dy_products(int bf16, const void* dy, const void* b, const void* u, float* g_part,
                                               float* d_part, int64_t n, int64_t c, int64_t target_blocks,
                                               int64_t* plan_out, const engram::host_warps::Buffer* readable,
                                               int n_readable, void* copy_to, int64_t copy_ld) {
  using namespace engram::dy_products;
  const auto plan = engram::dy_products::plan(n, c, target_blocks);
  plan_out[0] = plan.row_blocks, plan_out[1] = plan.splits, plan_out[2] = plan.tiles_per_split;
  if (g_part == nullptr) return nullptr;
  engram::host_warps::start_checks(readable, n_readable);
  const auto run = [&](auto element) {
    using T = decltype(element);
    engram::host_warps::run_grid(plan.row_blocks, plan.splits, kWarps * engram::kWarp, sizeof(Shared<T>), [&] {
      const auto args = [&](auto kernel) {
        kernel(static_cast<const T*>(dy), static_cast<const T*>(b), static_cast<const T*>(u), g_part, d_part, n, c,
               plan.tiles_per_split, static_cast<T*>(copy_to), copy_ld);
      };
      if (copy_to != nullptr) args(dy_products_kernel<T, true>);
      else args(dy_products_kernel<T, false>);
    });
  };
  if (bf16) run(at::BFloat16{});
  else run(at::Half{});
  return engram::host_warps::run_error();
}
