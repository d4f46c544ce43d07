"""Pure-PyTorch reference for the LoRA ops.

Every backend is tested against these functions; they favour clarity over speed and memory.

Shapes: N rows (tokens), `in` input features, `out` output features, r the adapter rank.
Single adapter: weight W (out, in) frozen, lora_a A (r, in), lora_b B (out, r), scale s (alpha / r):

    y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ (+ bias)

Multi-adapter: A (n_adapters, r, in), B (n_adapters, out, r), one scale per adapter and one adapter
id per row (-1: the row gets no adapter). The backends sort rows by adapter once ("segments") and
run one small matmul pair per segment (the SGMV idea); `perm` is that stable sort and
`offsets[a]:offsets[a+1]` the sorted rows of adapter a (offsets[0] = the rows without an adapter).
"""
import math

import torch

KEEP_BITS = 24  # dropout compares 24 hash bits with round(keep * 2**24)
_M32 = 0xFFFFFFFF


# ---- dropout: a counter-based hash, so the backward regenerates the forward's mask -----------------

def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keep_threshold(p):
    """round((1 - p) * 2**24), halves away from zero as C's llround (not Python's half-to-even)."""
    return math.floor((1.0 - p) * (1 << KEEP_BITS) + 0.5)


def dropout_mask(n_rows, n_cols, p, seed, device):
    """Bool (n_rows, n_cols): element (i, j) is kept iff hash(seed, i, j) < keep threshold.

    The same function of (seed, i, j) in every backend (C++, Triton, CUDA), so the masks agree
    bit for bit and the backward needs only the seed, not the mask or the dropped input.
    """
    rows = torch.arange(n_rows, device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(n_cols, device=device, dtype=torch.int64).unsqueeze(0)
    h = _fmix32(((rows * 0x9E3779B1) & _M32) ^ (seed & _M32))
    h = _fmix32((h + cols) & _M32)
    return (h >> (32 - KEEP_BITS)) < keep_threshold(p)


def dropped(x, p, seed):
    """drop(x): x with the mask's zeros, scaled by 1 / (1 - p); x itself when p == 0."""
    if p == 0.0:
        return x
    mask = dropout_mask(x.shape[0], x.shape[1], p, seed, x.device)
    return (x.float() * mask / (1.0 - p)).to(x.dtype)


# ---- single adapter --------------------------------------------------------------------------------

def lora_forward(x, weight, bias, lora_a, lora_b, scale, p=0.0, seed=0):
    """(y, u): y = x Wᵀ + s·u Bᵀ (+ bias) with u = drop(x) Aᵀ (N, r), kept for the backward."""
    u = (dropped(x, p, seed).float() @ lora_a.float().t())
    y = x.float() @ weight.float().t() + scale * (u @ lora_b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), u.to(x.dtype)


def lora_backward(grad_y, x, weight, lora_a, lora_b, u, scale, p=0.0, seed=0):
    """(dx, dA, dB) with g = s·dy B (N, r):

        dx = dy W + drop'(g A)     dA = gᵀ drop(x)     dB = s·dyᵀ u
    where drop' applies the forward's mask and 1 / (1 - p) again. ΔW = B A is never formed.
    """
    dy = grad_y.float()
    g = scale * (dy @ lora_b.float())
    dx = dy @ weight.float() + dropped(g @ lora_a.float(), p, seed).float()
    da = g.t() @ dropped(x, p, seed).float()
    db = scale * (dy.t() @ u.float())
    return dx.to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


def dy_products(grad_y, lora_b, u):
    """The backward's two products with dy (N, out): (dy B (N, r), uᵀ dy (r, out)), fp32."""
    return grad_y.float() @ lora_b.float(), u.float().t() @ grad_y.float()


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, p=0.0, seed=0):
    """The single-adapter layer in plain differentiable torch ops (what the tests autograd)."""
    y = x @ weight.t() + scale * ((dropped(x, p, seed) @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias


# ---- many adapters ------------------------------------------------------------------------------

def segments(adapter_ids, n_adapters):
    """(perm, offsets): the stable sort of rows by adapter id, and the int64 segment bounds (n+2,)
    with rows perm[offsets[a+1]:offsets[a+2]] using adapter a and perm[:offsets[1]] none (id -1)."""
    ids = adapter_ids.long()
    perm = torch.argsort(ids, stable=True)
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids + 1, torch.ones_like(ids))
    offsets = torch.zeros(n_adapters + 2, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    return perm, offsets


def _bounds(offsets):
    bounds = offsets.tolist()
    return [(a, bounds[a + 1], bounds[a + 2]) for a in range(len(bounds) - 2) if bounds[a + 2] > bounds[a + 1]]


def multi_forward(x, weight, bias, lora_a, lora_b, scales, perm, offsets):
    """(y, u_sorted): u_sorted (N, r) holds x[perm] A[a]ᵀ for each row's adapter (zeros where none)."""
    xs = x[perm].float()
    u = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    z = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for a, start, end in _bounds(offsets):
        u[start:end] = xs[start:end] @ lora_a[a].float().t()
        z[start:end] = scales[a].float() * (u[start:end] @ lora_b[a].float().t())
    y = x.float() @ weight.float().t()
    y[perm] += z
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), u.to(x.dtype)


def multi_backward(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u_sorted):
    """(dx, dA, dB) of multi_forward, segment by segment."""
    dys, xs, u = grad_y[perm].float(), x[perm].float(), u_sorted.float()
    dxs = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    da = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    for a, start, end in _bounds(offsets):
        g = scales[a].float() * (dys[start:end] @ lora_b[a].float())
        dxs[start:end] = g @ lora_a[a].float()
        da[a] = g.t() @ xs[start:end]
        db[a] = scales[a].float() * (dys[start:end].t() @ u[start:end])
    dx = grad_y.float() @ weight.float()
    dx[perm] += dxs
    return dx.to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


def lora_linear_multi(x, weight, lora_a, lora_b, scales, adapter_ids, bias=None):
    """The multi-adapter layer in plain differentiable torch ops, row by row's adapter mask."""
    y = x @ weight.t()
    for a in range(lora_a.shape[0]):
        rows = (adapter_ids == a).unsqueeze(1).to(x.dtype)
        y = y + rows * (scales[a] * ((x @ lora_a[a].t()) @ lora_b[a].t()))
    return y if bias is None else y + bias


# ---- merge ----------------------------------------------------------------------------------------

def merge(weight, lora_a, lora_b, scale):
    """In place: W += s·B A (the one place ΔW exists, as one GEMM into W)."""
    weight.addmm_(lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scale)


def unmerge(weight, lora_a, lora_b, scale):
    weight.addmm_(lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=-scale)
