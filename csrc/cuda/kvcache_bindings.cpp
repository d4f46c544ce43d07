// Python bindings of the CUDA KV-cache kernels (csrc/cuda/kvcache.cu), as engram_kernels._C_kvcache_cuda.
#include <torch/extension.h>

#include <vector>

namespace engram {
int64_t decode_max_rows();
std::vector<at::Tensor> quantize_keys(const at::Tensor& keys, int64_t bits, int64_t group);
std::vector<at::Tensor> quantize_values(const at::Tensor& values, int64_t bits, int64_t group);
at::Tensor dequantize_keys(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                           int64_t group, at::ScalarType dtype);
at::Tensor dequantize_values(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                             int64_t group, at::ScalarType dtype);
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key_codes, const at::Tensor& key_scale,
                            const at::Tensor& key_zero, const at::Tensor& value_codes, const at::Tensor& value_scale,
                            const at::Tensor& value_zero, const at::Tensor& residual_keys,
                            const at::Tensor& residual_values, int64_t bits, int64_t group, double scale);
}  // namespace engram

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for the KV-cache ops (see engram_kernels/ops/kvcache/naive.py)";
  m.attr("DECODE_MAX_ROWS") = engram::decode_max_rows();
  m.def("quantize_keys", &engram::quantize_keys, "per-channel quantization over token groups: codes, scale, zero",
        py::arg("keys"), py::arg("bits"), py::arg("group"));
  m.def("quantize_values", &engram::quantize_values, "per-token quantization over channel groups", py::arg("values"),
        py::arg("bits"), py::arg("group"));
  m.def("dequantize_keys", &engram::dequantize_keys, py::arg("codes"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("group"), py::arg("dtype"));
  m.def("dequantize_values", &engram::dequantize_values, py::arg("codes"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"), py::arg("group"), py::arg("dtype"));
  m.def("decode_attention", &engram::decode_attention, "split-K decode attention from the packed cache",
        py::arg("query"), py::arg("key_codes"), py::arg("key_scale"), py::arg("key_zero"), py::arg("value_codes"),
        py::arg("value_scale"), py::arg("value_zero"), py::arg("residual_keys"), py::arg("residual_values"),
        py::arg("bits"), py::arg("group"), py::arg("scale"));
}
