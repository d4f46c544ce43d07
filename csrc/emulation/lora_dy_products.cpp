// The LoRA backward's fused dy products (csrc/cuda/lora_dy_products.cuh) built for a CPU with
// host_warps.h, behind a C function that tests load with ctypes: it runs every block of the plan's
// grid and leaves the partials for the caller to add up.
#define ENGRAM_HOST_WARPS
#include "../cuda/lora_dy_products.cuh"

namespace {

struct Buffer {
  const void* data;
  int64_t bytes;
};

template <typename T>
void run_grid(const void* dy, const void* b, const void* u, float* g_part, float* d_part, int64_t n, int64_t c,
              const engram::dy_products::Plan& plan) {
  using namespace engram::dy_products;
  for (int64_t row_block = 0; row_block < plan.row_blocks; ++row_block)
    for (int64_t split = 0; split < plan.splits; ++split) {
      blockIdx = {static_cast<unsigned>(row_block), static_cast<unsigned>(split), 0};
      engram::host_warps::run_block(
          kWarps * engram::kWarp,
          [&] {
            dy_products_kernel<T>(static_cast<const T*>(dy), static_cast<const T*>(b), static_cast<const T*>(u),
                                  g_part, d_part, n, c, plan.tiles_per_split);
          },
          sizeof(Shared<T>));
      if (!engram::host_warps::checks.error.empty()) return;
    }
}

}  // namespace

// Plans the grid for about `target_blocks` blocks and writes its shape to plan_out (row blocks,
// splits, tiles per split); with g_part null only plans. Returns an error message or nullptr.
extern "C" const char* engram_lora_dy_products(int bf16, const void* dy, const void* b, const void* u, float* g_part,
                                               float* d_part, int64_t n, int64_t c, int64_t target_blocks,
                                               int64_t* plan_out, const Buffer* readable, int n_readable) {
  static std::string error;
  const auto plan = engram::dy_products::plan(n, c, target_blocks);
  plan_out[0] = plan.row_blocks, plan_out[1] = plan.splits, plan_out[2] = plan.tiles_per_split;
  if (g_part == nullptr) return nullptr;
  auto& checks = engram::host_warps::checks;
  checks = {};
  for (int i = 0; i < n_readable; ++i) {
    const char* begin = static_cast<const char*>(readable[i].data);
    checks.readable.emplace_back(begin, begin + readable[i].bytes);
  }
  if (bf16) run_grid<at::BFloat16>(dy, b, u, g_part, d_part, n, c, plan);
  else run_grid<at::Half>(dy, b, u, g_part, d_part, n, c, plan);
  error = checks.error;
  return error.empty() ? nullptr : error.c_str();
}
