// Timing-only builds of the tensor-core decode kernel (kvcache_decode_mma.cuh) with parts of its work
// left out (mma_decode::Ablation), for the shape the benchmarks time: bf16, int4, head dim 128, key
// group 64 (two value groups). Their results are wrong by design; what their GPU time drops by says
// where the kernel's time goes. Not part of the package: scripts/prebuild_gpu_extensions.sh builds it
// as engram_kernels._C_kvcache_ablation, and scripts/kv_decode_probe.py --ablation times it.
#define ENGRAM_KV_ABLATION  // kvcache.cu's host code without its ops
#include "kvcache.cu"

#include <torch/extension.h>

namespace engram {
namespace {

using Kernel = void (*)(const at::BFloat16*, const at::BFloat16*, const at::BFloat16*, at::BFloat16*,
                        mma_decode::Args);

template <int ABLATE>
Kernel ablated() {
  return mma_decode::decode_kernel<at::BFloat16, 4, 128, 2, ABLATE>;
}

// The builds: each part alone, and two pairs (what is left without the loop's loads and all but one
// key group; the loop's loads and key-group setups alone).
Kernel kernel_for_ablation(int64_t ablate) {
  using namespace mma_decode;
  switch (ablate) {
    case kKeepAll: return ablated<kKeepAll>();
    case kOneKeyGroup: return ablated<kOneKeyGroup>();
    case kNoKeys: return ablated<kNoKeys>();
    case kNoSoftmax: return ablated<kNoSoftmax>();
    case kNoValues: return ablated<kNoValues>();
    case kNoLoads: return ablated<kNoLoads>();
    case kNoLoads | kOneKeyGroup: return ablated<kNoLoads | kOneKeyGroup>();
    case kNoKeys | kNoSoftmax | kNoValues: return ablated<kNoKeys | kNoSoftmax | kNoValues>();
  }
  TORCH_CHECK(false, "no kernel built for ablation ", ablate);
}

}  // namespace

Tensor ablated_decode(int64_t ablate, const Tensor& query, const Tensor& key_codes, const Tensor& key_scale,
                      const Tensor& key_zero, const Tensor& value_codes, const Tensor& value_scale,
                      const Tensor& value_zero, const Tensor& residual_keys, const Tensor& residual_values,
                      int64_t group) {
  const c10::cuda::CUDAGuard guard(query.device());
  const DecodeCall call = decode_call(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                      residual_keys, residual_values, 4, group, 1.0);
  TORCH_CHECK(call.tensor_cores && query.scalar_type() == at::kBFloat16 && call.args.d == 128 &&
                  call.args.gv == 64,
              "the ablation kernels take bf16 queries, int4 codes, head dim 128 and key group 64");
  return run_mma_decode<at::BFloat16>(kernel_for_ablation(ablate), call.args, query, residual_keys, residual_values,
                                      call.heads);
}

}  // namespace engram

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "timing-only decode kernels with parts of their work left out (wrong results by design)";
  using namespace engram::mma_decode;
  py::dict builds;  // name -> ablation bits, in the order the probe prints them
  builds["all work"] = static_cast<int>(kKeepAll);
  builds["one key group"] = static_cast<int>(kOneKeyGroup);
  builds["no keys"] = static_cast<int>(kNoKeys);
  builds["no softmax"] = static_cast<int>(kNoSoftmax);
  builds["no values"] = static_cast<int>(kNoValues);
  builds["no loads in the loop"] = static_cast<int>(kNoLoads);
  builds["no loads, one key group"] = static_cast<int>(kNoLoads | kOneKeyGroup);
  builds["loads and key groups only"] = static_cast<int>(kNoKeys | kNoSoftmax | kNoValues);
  m.attr("ABLATIONS") = builds;
  m.def("ablated_decode", &engram::ablated_decode, py::arg("ablate"), py::arg("query"), py::arg("key_codes"),
        py::arg("key_scale"), py::arg("key_zero"), py::arg("value_codes"), py::arg("value_scale"),
        py::arg("value_zero"), py::arg("residual_keys"), py::arg("residual_values"), py::arg("group"));
}
