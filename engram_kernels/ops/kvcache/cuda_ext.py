"""`cuda` backend: the CUDA kernels in csrc/cuda/kvcache.cu (fp32 math, fp16 scales); decode attention
with 16-bit queries and up to 8 query rows per KV head runs on tensor cores (kvcache_decode_mma.cuh).

Importable without a GPU: the extension is only looked up when a kernel is called. Shapes beyond the
decode kernel's limits (head dims other than 64 and 128, more than DECODE_MAX_ROWS query rows per
KV head) take the Triton kernel, or the reference where Triton is not installed.
"""
import functools

from ...backends import require_extension
from . import naive


@functools.cache  # a missing extension raises again on the next call (exceptions are not cached)
def _ext():
    return require_extension("_C_kvcache_cuda")


def quantize_keys(keys, bits, group_size):
    return tuple(_ext().quantize_keys(keys, bits, group_size))


def quantize_values(values, bits, group_size):
    return tuple(_ext().quantize_values(values, bits, group_size))


def dequantize_keys(codes, scale, zero, bits, group_size, dtype):
    return _ext().dequantize_keys(codes, scale, zero, bits, group_size, dtype)


def dequantize_values(codes, scale, zero, bits, group_size, dtype):
    return _ext().dequantize_values(codes, scale, zero, bits, group_size, dtype)


@functools.cache
def _beyond_the_kernel():
    try:
        from . import triton_kernels
    except ImportError:
        return naive
    return triton_kernels


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                     residual_values, bits, group_size, scale):
    C = _ext()
    _, hq, tq, d = query.shape
    hkv = key_codes.shape[1]
    if d not in (64, 128) or hq // hkv * tq > C.DECODE_MAX_ROWS:
        return _beyond_the_kernel().decode_attention(query, key_codes, key_scale, key_zero, value_codes,
                                                     value_scale, value_zero, residual_keys, residual_values, bits,
                                                     group_size, scale)
    return C.decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                              residual_keys, residual_values, bits, group_size, scale)
