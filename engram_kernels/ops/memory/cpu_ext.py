"""`cpu` backend: the C++ kernels in csrc/cpu/memory.cpp (fp32 compute, OpenMP over rows)."""
from ...backends import extension
from . import naive

_C = extension("_C_memory_cpu")


def pk_topk(query, keys1, keys2, k):
    s1, s2 = naive.sub_scores(query, keys1, keys2)  # BLAS does the dense part best
    scores, ids = _C.pk_select(s1.contiguous(), s2.contiguous(), k)
    return scores, ids


def weighted_gather(values, ids, weights):
    return _C.weighted_gather(values, ids, weights)


def weighted_gather_backward(grad_out, values, ids, weights):
    grad_weights, rows, row_grads = _C.weighted_gather_backward(grad_out, values, ids, weights)
    return grad_weights, rows, row_grads


def sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask):
    _C.sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask)


def sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1, beta2, eps, weight_decay,
                     allow_mask):
    _C.sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1, beta2, eps, weight_decay,
                        allow_mask)
