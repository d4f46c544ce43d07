// Python bindings of the CUDA memory kernels (csrc/cuda/memory.cu), as engram_kernels._C_memory_cuda.
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace engram {
int64_t pk_max_topk();
int64_t pk_max_sub_keys();
std::tuple<at::Tensor, at::Tensor> pk_select(const at::Tensor& s1, const at::Tensor& s2, int64_t k);
at::Tensor weighted_gather(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_gather_backward(const at::Tensor& grad_out,
                                                                        const at::Tensor& values,
                                                                        const at::Tensor& ids,
                                                                        const at::Tensor& weights);
void sparse_sgd_step(const at::Tensor& values, const at::Tensor& rows, const at::Tensor& grads, double lr,
                     double weight_decay, const std::optional<at::Tensor>& allow_mask);
void sparse_adam_step(const at::Tensor& values, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& rows, const at::Tensor& grads, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay, const std::optional<at::Tensor>& allow_mask);
}  // namespace engram

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for the product-key memory ops (see engram_kernels/ops/memory/naive.py)";
  m.attr("PK_MAX_TOPK") = engram::pk_max_topk();
  m.attr("PK_MAX_SUB_KEYS") = engram::pk_max_sub_keys();
  m.def("pk_select", &engram::pk_select, "Top-k of s1[a] + s2[b] per row: (scores, slot ids)", py::arg("s1"),
        py::arg("s2"), py::arg("k"));
  m.def("weighted_gather", &engram::weighted_gather, "out[n] = sum_j weights[n, j] * values[ids[n, j]]",
        py::arg("values"), py::arg("ids"), py::arg("weights"));
  m.def("weighted_gather_backward", &engram::weighted_gather_backward, "(grad_weights, rows, row_grads)",
        py::arg("grad_out"), py::arg("values"), py::arg("ids"), py::arg("weights"));
  m.def("sparse_sgd_step", &engram::sparse_sgd_step, "In-place SGD on touched rows", py::arg("values"),
        py::arg("rows"), py::arg("grads"), py::arg("lr"), py::arg("weight_decay"), py::arg("allow_mask"));
  m.def("sparse_adam_step", &engram::sparse_adam_step, "In-place lazy Adam on touched rows", py::arg("values"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("rows"), py::arg("grads"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("allow_mask"));
}
