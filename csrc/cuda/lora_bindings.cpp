// Python bindings of the CUDA LoRA kernels (csrc/cuda/lora.cu), as engram_kernels._C_lora_cuda.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace engram {
at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed);
at::Tensor sgmv_shrink(const at::Tensor& src, const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& w,
                       const std::optional<at::Tensor>& scales);
void sgmv_expand_(const at::Tensor& dst, const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& small,
                  const at::Tensor& w, const std::optional<at::Tensor>& scales);
at::Tensor grouped_outer(const at::Tensor& small, const at::Tensor& big, const at::Tensor& perm,
                         const at::Tensor& offsets, int64_t n_adapters);
std::vector<at::Tensor> fused_dy_products(const at::Tensor& dy, const at::Tensor& b, const at::Tensor& u);
at::Tensor fused_x_products(const at::Tensor& x, const at::Tensor& a_t, const at::Tensor& xu);
}  // namespace engram

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for the adapter side of the LoRA ops (see engram_kernels/ops/lora/composite.py)";
  m.def("dropout", &engram::lora_dropout, "drop(x) with the hash mask of naive.dropout_mask", py::arg("x"),
        py::arg("p"), py::arg("seed"));
  m.def("sgmv_shrink", &engram::sgmv_shrink, "out[i] = src[perm[i]] w[a(i)]^T (* scales[a(i)])", py::arg("src"),
        py::arg("perm"), py::arg("offsets"), py::arg("w"), py::arg("scales"));
  m.def("sgmv_expand_", &engram::sgmv_expand_, "dst[perm[i]] += scales[a(i)] small[i] w[a(i)]", py::arg("dst"),
        py::arg("perm"), py::arg("offsets"), py::arg("small"), py::arg("w"), py::arg("scales"));
  m.def("grouped_outer", &engram::grouped_outer, "(n, r, C) fp32 per-adapter sums of small[i]^T big[perm[i]]",
        py::arg("small"), py::arg("big"), py::arg("perm"), py::arg("offsets"), py::arg("n_adapters"));
  m.def("fused_dy_products", &engram::fused_dy_products,
        "(dy B, u^T dy) in fp32 from one read of 16-bit dy (N, C % 8 == 0); B (C, 16), u (N, 16)", py::arg("dy"),
        py::arg("b"), py::arg("u"));
  m.def("fused_x_products", &engram::fused_x_products,
        "x A^T in fp32 (N, 16) from one read of 16-bit x (N, K % 8 == 0), A^T (K, 16), x also written into xu's "
        "first K columns (the joined-weight forward's input)",
        py::arg("x"), py::arg("a_t"), py::arg("xu"));
}
