"""`cuda` backend: the CUDA kernels in csrc/cuda/lora.cu for dropout, the SGMV segments and the
backward's two products with dy (one read of dy, csrc/cuda/lora_dy_products.cuh), with the frozen
GEMMs in cuBLAS (composite.py).

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
    """Whether the fused kernel takes these: 16-bit dy with whole 16-byte rows, rank <= 16, sm_80+.
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


class _Kernels:
    dy_products = staticmethod(dy_products)
    x_and_u = staticmethod(composite.torch_x_and_u)  # no kernel of its own yet: a GEMM and a copy

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
