"""`cuda` backend: the CUDA kernels in csrc/cuda/memory.cu (fp32 accumulation, 16-byte packs).

Importable without a GPU: the extension is only looked up when a kernel is called, which happens
once the backend has been chosen for a CUDA tensor.
"""
import functools

from ...backends import require_extension

from . import naive

_ext = functools.partial(require_extension, "_C_memory_cuda")


def pk_topk(query, keys1, keys2, k):
    C = _ext()
    if k > C.PK_MAX_TOPK or keys1.shape[1] > C.PK_MAX_SUB_KEYS:
        return naive.pk_topk(query, keys1, keys2, k)  # beyond the fused selection's limits
    s1, s2 = naive.sub_scores(query, keys1, keys2)  # cuBLAS does the dense part best
    # The kernel takes any (N, H) strides, so einsum's layout needs no copy, only unit-stride rows.
    if s1.stride(-1) != 1 or s1.stride() != s2.stride():
        s1, s2 = s1.contiguous(), s2.contiguous()
    return C.pk_select(s1, s2, k)


def weighted_gather(values, ids, weights):
    return _ext().weighted_gather(values, ids, weights)


def weighted_gather_backward(grad_out, values, ids, weights):
    grad_weights, rows, row_grads = _ext().weighted_gather_backward(grad_out.contiguous(), values, ids, weights)
    return grad_weights, rows, row_grads


def sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask):
    _ext().sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask)


def sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1, beta2, eps, weight_decay,
                     allow_mask):
    _ext().sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1, beta2, eps, weight_decay,
                            allow_mask)
