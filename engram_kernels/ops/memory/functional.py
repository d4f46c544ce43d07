"""Public memory ops: validation, backend dispatch, torch.library registration and autograd.

Every op is a `torch.library.custom_op` under the `engram::` namespace, so `torch.compile` sees one
opaque node per op (with a fake implementation for shape propagation) instead of tracing into
Triton, C++ or CUDA code. Eager calls take an equivalent `torch.autograd.Function` instead: the
custom-op dispatcher costs tens of microseconds per call, as much as a whole kernel on a GPU.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from ... import backends
from ..eager import eager_function, traced, values_checked
from . import checks, naive

def backend_module(device):
    """The module implementing the memory ops for the backend chosen on `device`."""
    return backends.op_module("memory", device)


# ---- product-key top-k -------------------------------------------------------------------------

def _pk_topk_forward(query: Tensor, keys1: Tensor, keys2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return backend_module(query.device).pk_topk(query, keys1, keys2, k)


def _pk_topk_backward_impl(grad_scores: Tensor, query: Tensor, keys1: Tensor, keys2: Tensor,
                           ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Two scatter-adds and four batched matmuls: BLAS/cuBLAS bound on every backend, so all
    # backends share the reference composition.
    return naive.pk_topk_backward(grad_scores, query, keys1, keys2, ids)


_pk_topk_op = torch.library.custom_op("engram::pk_topk", _pk_topk_forward, mutates_args=())
_pk_topk_backward_op = torch.library.custom_op("engram::pk_topk_backward", _pk_topk_backward_impl, mutates_args=())


@_pk_topk_op.register_fake
def _(query, keys1, keys2, k):
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.int64)


@_pk_topk_backward_op.register_fake
def _(grad_scores, query, keys1, keys2, ids):
    return torch.empty_like(query), torch.empty_like(keys1), torch.empty_like(keys2)


def _pk_topk_setup(ctx, inputs, output):
    query, keys1, keys2, _ = inputs
    ctx.save_for_backward(query, keys1, keys2, output[1])
    ctx.mark_non_differentiable(output[1])


def _pk_topk_grad(ctx, grad_scores, _grad_ids, backward):
    query, keys1, keys2, ids = ctx.saved_tensors
    dq, dk1, dk2 = backward(grad_scores.contiguous(), query, keys1, keys2, ids)
    return dq, dk1, dk2, None


_pk_topk_op.register_autograd(functools.partial(_pk_topk_grad, backward=_pk_topk_backward_op),
                              setup_context=_pk_topk_setup)


_PkTopk = eager_function("_PkTopk", _pk_topk_forward, _pk_topk_setup, _pk_topk_grad, _pk_topk_backward_impl)


def pk_topk(query, keys1, keys2, k, check_values=True):
    """Top-k product-key slots per query and head.

    query (N, H, Dk); keys1, keys2 (H, n_keys, Dk/2). Slot a*n_keys + b scores
    <query[:Dk/2], keys1[a]> + <query[Dk/2:], keys2[b]>. Returns fp32 scores (N, H, k), sorted
    descending, and int64 slot ids (N, H, k). Differentiable w.r.t. query and keys.
    `check_values=False` skips the NaN scan (a device sync on GPUs).
    """
    checks.check_pk_topk(query, keys1, keys2, k, values_checked(check_values))
    op = _pk_topk_op if traced() else _PkTopk.apply
    return op(query.contiguous(), keys1.contiguous(), keys2.contiguous(), k)


# ---- weighted gather (embedding bag) -----------------------------------------------------------

def _gather_forward(values: Tensor, ids: Tensor, weights: Tensor, sparse_grad: bool) -> Tensor:
    return backend_module(values.device).weighted_gather(values, ids, weights)


def _gather_backward_impl(grad_out: Tensor, values: Tensor, ids: Tensor,
                          weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(values.device).weighted_gather_backward(grad_out, values, ids, weights)


_gather_op = torch.library.custom_op("engram::weighted_gather", _gather_forward, mutates_args=())
_gather_backward_op = torch.library.custom_op("engram::weighted_gather_backward", _gather_backward_impl,
                                              mutates_args=())


@_gather_op.register_fake
def _(values, ids, weights, sparse_grad):
    return values.new_empty(ids.shape[0], values.shape[1])


@_gather_backward_op.register_fake
def _(grad_out, values, ids, weights):
    unique = torch.library.get_ctx().new_dynamic_size()
    return (torch.empty_like(weights), ids.new_empty(unique),
            values.new_empty(unique, values.shape[1]))


def _gather_setup(ctx, inputs, output):
    values, ids, weights, sparse_grad = inputs
    ctx.save_for_backward(values, ids, weights)
    ctx.sparse_grad = sparse_grad


def _gather_grad(ctx, grad_out, backward):
    values, ids, weights = ctx.saved_tensors
    grad_weights, rows, row_grads = backward(grad_out.contiguous(), values, ids, weights)
    grad_values = None
    if ctx.needs_input_grad[0]:
        grad_values = rows_to_grad(rows, row_grads, values.shape, ctx.sparse_grad)
    return grad_values, None, grad_weights, None


_gather_op.register_autograd(functools.partial(_gather_grad, backward=_gather_backward_op),
                             setup_context=_gather_setup)


_WeightedGather = eager_function("_WeightedGather", _gather_forward, _gather_setup, _gather_grad, _gather_backward_impl)


def rows_to_grad(rows, row_grads, shape, sparse):
    """A coalesced sparse COO gradient (as nn.Embedding(sparse=True) gives), or a dense one."""
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), row_grads, shape, is_coalesced=True,
                                       check_invariants=False)
    return row_grads.new_zeros(shape).index_add_(0, rows, row_grads)


def weighted_gather(values, ids, weights, sparse_grad=True, check_values=True):
    """out[n] = sum_j weights[n, j] * values[ids[n, j]]: (n_slots, Dv), (N, L), (N, L) -> (N, Dv).

    Accumulates in fp32 and returns values' dtype. The gradient for `values` is a coalesced sparse
    COO tensor holding only the touched rows (`sparse_grad=False` gives a dense one, which is
    n_slots x Dv). `check_values=False` skips the id-range and NaN scans (device syncs on GPUs).
    """
    checks.check_weighted_gather(values, ids, weights, values_checked(check_values))
    op = _gather_op if traced() else _WeightedGather.apply
    return op(values.contiguous(), ids.long().contiguous(), weights.contiguous(), sparse_grad)


# ---- fused sparse optimizer steps --------------------------------------------------------------

def _sgd_step(values: Tensor, rows: Tensor, grads: Tensor, lr: float, weight_decay: float,
              allow_mask: Optional[Tensor]) -> None:
    backend_module(values.device).sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask)


def _adam_step(values: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grads: Tensor, step: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               allow_mask: Optional[Tensor]) -> None:
    backend_module(values.device).sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1,
                                                   beta2, eps, weight_decay, allow_mask)


_sgd_step_op = torch.library.custom_op("engram::sparse_sgd_step", _sgd_step, mutates_args=("values",))
_adam_step_op = torch.library.custom_op("engram::sparse_adam_step", _adam_step,
                                        mutates_args=("values", "exp_avg", "exp_avg_sq"))


def _contiguous(allow_mask):
    return None if allow_mask is None else allow_mask.contiguous()


def sparse_sgd_step(values, rows, grads, lr, weight_decay=0.0, allow_mask=None, check_values=True):
    """In place on `values`: SGD on the given unique rows; rows outside `allow_mask` stay unchanged."""
    checks.check_sparse_step("sparse_sgd_step", values, rows, grads, allow_mask, (), values_checked(check_values))
    step = _sgd_step_op if traced() else _sgd_step
    step(values, rows.long().contiguous(), grads.contiguous(), float(lr), float(weight_decay), _contiguous(allow_mask))


def sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, allow_mask=None, check_values=True):
    """In place: lazy Adam on the given unique rows of `values` and its fp32 state (see naive.py)."""
    checks.check_sparse_step("sparse_adam_step", values, rows, grads, allow_mask, (exp_avg, exp_avg_sq),
                             values_checked(check_values))
    if step < 1:
        raise ValueError(f"sparse_adam_step: step counts updates and starts at 1, got {step}")
    update = _adam_step_op if traced() else _adam_step
    update(values, exp_avg, exp_avg_sq, rows.long().contiguous(), grads.contiguous(), int(step), float(lr),
           float(beta1), float(beta2), float(eps), float(weight_decay), _contiguous(allow_mask))
