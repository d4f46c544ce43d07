"""Public LoRA ops: validation, backend dispatch, torch.library registration and autograd.

As for the memory ops, every op is a `torch.library.custom_op` under `engram::` (one opaque node for
torch.compile, with a fake implementation), and eager calls take an equivalent
`torch.autograd.Function`, which costs a third of the custom-op dispatcher's overhead.

The backward saves x, the frozen weight, the adapter and u = drop(x) Aᵀ (N, r) — never drop(x),
the dropout mask (regenerated from its seed) or ΔW = B A.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from ... import backends
from ..eager import eager_function, traced, values_checked
from . import checks, naive

def backend_module(device):
    """The module implementing the LoRA ops for the backend chosen on `device`."""
    return backends.op_module("lora", device)


def _frozen_grads(grad_y, x, needs_weight, needs_bias):
    """Gradients of the base layer's own parameters, for the rare caller that does not freeze them."""
    grad_w = grad_y.t().mm(x) if needs_weight else None
    grad_bias = grad_y.sum(0) if needs_bias else None
    return grad_w, grad_bias


# ---- single adapter -------------------------------------------------------------------------------

def _lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                  p: float, seed: int) -> tuple[Tensor, Tensor]:
    return backend_module(x.device).lora_forward(x, weight, bias, lora_a, lora_b, scale, p, seed)


def _lora_backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, u: Tensor,
                        scale: float, p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(x.device).lora_backward(grad_y, x, weight, lora_a, lora_b, u, scale, p, seed)


_lora_op = torch.library.custom_op("engram::lora_linear", _lora_forward, mutates_args=())
_lora_backward_op = torch.library.custom_op("engram::lora_linear_backward", _lora_backward_impl, mutates_args=())


@_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@_lora_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, u, scale, p, seed):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale, ctx.p, ctx.seed = scale, p, seed
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # u has no gradient: no (N, r) zeros for it


def _lora_grad(ctx, grad_y, _grad_u, backward):
    if grad_y is None:
        return (None,) * 8
    x, weight, lora_a, lora_b, u = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    dx, da, db = backward(grad_y, x, weight, lora_a, lora_b, u, ctx.scale, ctx.p, ctx.seed)
    grad_w, grad_bias = _frozen_grads(grad_y, x, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return dx, grad_w, grad_bias, da, db, None, None, None


_lora_op.register_autograd(functools.partial(_lora_grad, backward=_lora_backward_op), setup_context=_lora_setup)


_LoRALinear = eager_function("_LoRALinear", _lora_forward, _lora_setup, _lora_grad, _lora_backward_impl)


def _row_major(t):
    """t itself if its rows are contiguous (the joined layout's W and B are column blocks of one
    buffer, which composite.joined_weight recognizes), else a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def random_seed():
    """A dropout seed from torch's generator, so torch.manual_seed makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def lora_linear(x, weight, lora_a, lora_b, scale=1.0, bias=None, dropout=0.0, seed=None):
    """y = x Wᵀ + scale · (drop(x) Aᵀ) Bᵀ (+ bias), fused; ΔW = B A is never formed.

    x (..., in); weight (out, in), frozen (its gradient is only computed if it requires one);
    lora_a (r, in); lora_b (out, r); one dtype for all. `dropout` drops elements of the LoRA
    branch's input (as peft's lora_dropout) with a mask derived from `seed` (None: drawn from
    torch's generator; any int, of which the mask uses the low 32 bits), identical on every backend
    and regenerated in the backward.
    Gradients: x, lora_a, lora_b (and weight / bias if they require one).
    """
    checks.check_lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, 0 if seed is None else seed)
    if dropout and seed is None:
        seed = random_seed()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    op = _lora_op if traced() else _LoRALinear.apply
    y, _ = op(x2, _row_major(weight), bias, lora_a.contiguous(), _row_major(lora_b), float(scale),
              float(dropout), int(seed or 0) % 2**32)  # the mask reads the seed's low 32 bits only
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- many adapters ------------------------------------------------------------------------------

def _multi_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                   scales: Tensor, perm: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    return backend_module(x.device).multi_forward(x, weight, bias, lora_a, lora_b, scales, perm, offsets)


def _multi_backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                         perm: Tensor, offsets: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(x.device).multi_backward(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u)


_multi_op = torch.library.custom_op("engram::lora_linear_multi", _multi_forward, mutates_args=())
_multi_backward_op = torch.library.custom_op("engram::lora_linear_multi_backward", _multi_backward_impl,
                                             mutates_args=())


@_multi_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, perm, offsets):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[1])


@_multi_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _multi_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, perm, offsets = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scales, perm, offsets, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _multi_grad(ctx, grad_y, _grad_u, backward):
    if grad_y is None:
        return (None,) * 8
    x, weight, lora_a, lora_b, scales, perm, offsets, u = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    dx, da, db = backward(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u)
    grad_w, grad_bias = _frozen_grads(grad_y, x, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return dx, grad_w, grad_bias, da, db, None, None, None


_multi_op.register_autograd(functools.partial(_multi_grad, backward=_multi_backward_op), setup_context=_multi_setup)


_LoRALinearMulti = eager_function("_LoRALinearMulti", _multi_forward, _multi_setup, _multi_grad,
                                  _multi_backward_impl)


def per_row_ids(adapter_ids, x):
    """Ids given per sequence (a leading part of x's shape) spread over the sequence's rows."""
    if not (isinstance(adapter_ids, Tensor) and isinstance(x, Tensor)):
        return adapter_ids
    lead = adapter_ids.dim()
    if lead < x.dim() - 1 and adapter_ids.shape == x.shape[:lead]:
        return adapter_ids.view(*adapter_ids.shape, *([1] * (x.dim() - 1 - lead))).expand(x.shape[:-1])
    return adapter_ids


def lora_linear_multi(x, weight, lora_a, lora_b, scales, adapter_ids, bias=None, check_values=True):
    """Many adapters in one batch: row i uses adapter adapter_ids[i] (-1: none).

    x (..., in); weight (out, in); lora_a (n_adapters, r, in); lora_b (n_adapters, out, r);
    scales: a float or a tensor (n_adapters,) (alpha / r per adapter); adapter_ids: one id per row
    (x.shape[:-1]) or per sequence (a leading part of it, e.g. (batch,) for x (batch, seq, in)). Rows are sorted by adapter once and
    each adapter's rows run as one segment (SGMV), so the cost grows with rows, not adapters.
    Gradients for x, lora_a and lora_b (each adapter's from its own rows). `check_values=False`
    skips the id-range scan (a device sync on GPUs).
    """
    n_adapters = lora_a.shape[0] if isinstance(lora_a, Tensor) and lora_a.dim() == 3 else 0
    adapter_ids = per_row_ids(adapter_ids, x)
    if not isinstance(scales, Tensor):
        scales = torch.full((n_adapters,), float(scales), device=getattr(x, "device", None))
    checks.check_lora_linear_multi(x, weight, lora_a, lora_b, scales, adapter_ids, bias,
                                   values_checked(check_values))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    perm, offsets = naive.segments(adapter_ids.reshape(-1), n_adapters)
    op = _multi_op if traced() else _LoRALinearMulti.apply
    y, _ = op(x2, weight.contiguous(), bias, lora_a.contiguous(), lora_b.contiguous(), scales.float().contiguous(),
              perm, offsets)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- merge ----------------------------------------------------------------------------------------

def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).to(torch.int64)


def _smallest_int(delta):
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if delta.numel() == 0 or (int(delta.min()) >= info.min and int(delta.max()) <= info.max):
            return delta.to(dtype)
    return delta


@torch.no_grad()
def merge_lora(weight, lora_a, lora_b, scale=1.0):
    """In place W += scale · B A; returns the residual that makes `unmerge_lora` exact.

    Floating-point W + ΔW - ΔW differs from W in ~10% of fp32 elements; the residual holds, per
    element, the difference between W's bit pattern and the bits the plain unmerge gives, in the
    smallest integer type that fits (int8 for ordinary adapters: a quarter of W in fp32).
    The merge is one GEMM into W (ΔW exists only inside it), so every backend shares it.
    """
    checks.check_merge("merge_lora", weight, lora_a, lora_b, scale)
    original = _bits(weight)
    naive.merge(weight, lora_a, lora_b, scale)
    plain_unmerge = weight.clone()
    naive.unmerge(plain_unmerge, lora_a, lora_b, scale)
    return _smallest_int(original - _bits(plain_unmerge))


@torch.no_grad()
def unmerge_lora(weight, lora_a, lora_b, scale=1.0, residual=None):
    """In place W -= scale · B A; with merge_lora's residual the result is W's original bits."""
    checks.check_merge("unmerge_lora", weight, lora_a, lora_b, scale)
    naive.unmerge(weight, lora_a, lora_b, scale)
    if residual is not None:
        if residual.shape != weight.shape:
            raise ValueError(f"unmerge_lora: residual {tuple(residual.shape)} must match weight {tuple(weight.shape)}")
        int_type = {4: torch.int32, 2: torch.int16}[weight.element_size()]
        exact = (_bits(weight) + residual.to(torch.int64)).to(int_type)
        weight.copy_(exact.view(weight.dtype))
    return weight
