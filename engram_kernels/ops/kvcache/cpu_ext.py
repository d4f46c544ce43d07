"""`cpu` backend: the C++ kernels in csrc/cpu/kvcache.cpp (fp32 compute, OpenMP).

The kernels take fp32 inputs; bf16/fp16 queries, keys and values are converted here (storage
formats only, see the README), and results converted back.
"""
from ...backends import extension

_C = extension("_C_kvcache_cpu")


def quantize_keys(keys, bits, group_size):
    return tuple(_C.quantize_keys(keys.float().contiguous(), bits, group_size))


def quantize_values(values, bits, group_size):
    return tuple(_C.quantize_values(values.float().contiguous(), bits, group_size))


def dequantize_keys(codes, scale, zero, bits, group_size, dtype):
    return _C.dequantize_keys(codes, scale, zero, bits, group_size).to(dtype)


def dequantize_values(codes, scale, zero, bits, group_size, dtype):
    return _C.dequantize_values(codes, scale, zero, bits, group_size).to(dtype)


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                     residual_values, bits, group_size, scale):
    out = _C.decode_attention(query.float().contiguous(), key_codes, key_scale, key_zero, value_codes, value_scale,
                              value_zero, residual_keys.float().contiguous(), residual_values.float().contiguous(),
                              bits, group_size, scale)
    return out.to(query.dtype)
