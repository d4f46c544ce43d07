"""`cuda` backend: the CUDA kernels in csrc/cuda/lora.cu for dropout, the SGMV segments, the
backward's two products with dy (one read of dy, csrc/cuda/lora_dy_products.cuh) and, in the same
kernel's copy mode, the joined-weight forward's [x | s·x Aᵀ], with the frozen GEMMs in cuBLAS
(composite.py).

Importable without a GPU: the extension is only looked up when a kernel is called, which happens
once the backend has been chosen for a CUDA tensor.
"""
import functools
import os

import torch
import torch.nn.functional as F

from ...backends import require_extension
from . import composite

_ext = functools.partial(require_extension, "_C_lora_cuda")
FUSED_RANK = 16  # the fused dy kernel's rank; lower ranks are zero-padded to it


def fused_dy_applies(grad_y, u):
    """Whether the fused kernel takes these (dy, or x in its copy mode): 16-bit with whole 16-byte rows,
    rank <= 16, sm_80+.
    ENGRAM_LORA_DY_GEMMS=1 keeps the two cuBLAS GEMMs (to time one against the other)."""
    return (grad_y.dtype in (torch.bfloat16, torch.float16) and u.shape[1] <= FUSED_RANK
            and grad_y.shape[1] % 8 == 0 and torch.cuda.get_device_capability(grad_y.device)[0] >= 8
            and os.environ.get("ENGRAM_LORA_DY_GEMMS", "0") != "1")


def dy_products(grad_y, lora_b, u):
    """(dy B, uᵀ dy) in fp32: the fused kernel where it applies, else two cuBLAS GEMMs."""
    if not fused_dy_applies(grad_y, u):
        return composite.gemm_dy_products(grad_y, lora_b, u)
    rank = u.shape[1]
    lora_b, u = (t if rank == FUSED_RANK else F.pad(t, (0, FUSED_RANK - rank)) for t in (lora_b, u))
    g, d = _ext().fused_dy_products(grad_y, lora_b.contiguous(), u.contiguous())
    return g[:, :rank], d[:rank]


def x_and_u(x, lora_a, scale, xu):
    """[x | s·x Aᵀ] into xu and u = x Aᵀ: the fused kernel's copy mode (one read of x) where it applies,
    else cuBLAS's x Aᵀ and a copy."""
    rank = lora_a.shape[0]
    if not (fused_dy_applies(x, lora_a.t()) and xu.stride(0) % 8 == 0):
        return composite.torch_x_and_u(x, lora_a, scale, xu)
    a_t = F.pad(lora_a.t(), (0, FUSED_RANK - rank)).contiguous()
    u = _ext().fused_x_products(x, a_t, xu)[:, :rank]
    torch.mul(u, scale, out=xu[:, x.shape[1]:])
    return u.to(x.dtype)


class _Kernels:
    dy_products = staticmethod(dy_products)
    x_and_u = staticmethod(x_and_u)

    @staticmethod
    def dropout(x, p, seed):
        return _ext().dropout(x, p, seed & 0xFFFFFFFF)

    @staticmethod
    def shrink(src, perm, offsets, w, scales):
        return _ext().sgmv_shrink(src, perm, offsets, w, scales)

    @staticmethod
    def expand_(dst, perm, offsets, small, w, scales):
        _ext().sgmv_expand_(dst, perm, offsets, small.contiguous(), w, scales)
        return dst

    @staticmethod
    def grouped_outer(small, big, perm, offsets, n_adapters):
        return _ext().grouped_outer(small.contiguous(), big, perm, offsets, n_adapters)


lora_forward, lora_backward, multi_forward, multi_backward = composite.bind(_Kernels)
