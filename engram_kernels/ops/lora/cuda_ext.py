"""`cuda` backend: the CUDA kernels in csrc/cuda/lora.cu for dropout and the SGMV segments, with the
frozen GEMMs in cuBLAS (composite.py).

Importable without a GPU: the extension is only looked up when a kernel is called, which happens
once the backend has been chosen for a CUDA tensor.
"""
import functools

from ...backends import require_extension
from . import composite

_ext = functools.partial(require_extension, "_C_lora_cuda")


class _Kernels:
    dy_products = staticmethod(composite.gemm_dy_products)

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
