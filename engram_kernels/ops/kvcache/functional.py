"""Public KV-cache ops: validation, backend dispatch and torch.library registration.

Each op is a `torch.library.custom_op` under `engram::` (one opaque node for torch.compile, with a
fake implementation for shapes); eager calls go straight to the backend, skipping the custom-op
dispatcher's per-call overhead, which a decode step pays once per layer. Inference only: no autograd.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ... import backends
from ..eager import traced, values_checked
from . import checks, naive

def backend_module(device):
    """The module implementing the KV-cache ops for the backend chosen on `device`."""
    return backends.op_module("kvcache", device)


class PackedKV(NamedTuple):
    """A KIVI-quantized key/value store (layout: see naive.py)."""
    key_codes: Tensor
    key_scale: Tensor
    key_zero: Tensor
    value_codes: Tensor
    value_scale: Tensor
    value_zero: Tensor
    bits: int
    group_size: int

    @property
    def num_tokens(self):
        return self.key_codes.shape[2]

    @property
    def head_dim(self):
        return self.key_codes.shape[-1] * 8 // self.bits

    def tensors(self):
        return self[:6]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())


# ---- quantize / dequantize ----------------------------------------------------------------------

def _quantize_keys(keys: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(keys.device).quantize_keys(keys, bits, group_size)


def _quantize_values(values: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(values.device).quantize_values(values, bits, group_size)


def _dequantize_keys(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                     dtype: torch.dtype) -> Tensor:
    return backend_module(codes.device).dequantize_keys(codes, scale, zero, bits, group_size, dtype)


def _dequantize_values(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                       dtype: torch.dtype) -> Tensor:
    return backend_module(codes.device).dequantize_values(codes, scale, zero, bits, group_size, dtype)


_quantize_keys_op = torch.library.custom_op("engram::kv_quantize_keys", _quantize_keys, mutates_args=())
_quantize_values_op = torch.library.custom_op("engram::kv_quantize_values", _quantize_values, mutates_args=())
_dequantize_keys_op = torch.library.custom_op("engram::kv_dequantize_keys", _dequantize_keys, mutates_args=())
_dequantize_values_op = torch.library.custom_op("engram::kv_dequantize_values", _dequantize_values,
                                                mutates_args=())


def _packed_like(x, bits):
    return x.new_empty(*x.shape[:-1], x.shape[-1] * bits // 8, dtype=torch.uint8)


@_quantize_keys_op.register_fake
def _(keys, bits, group_size):
    b, h, t, d = keys.shape
    groups = keys.new_empty(b, h, math.ceil(t / group_size), d, dtype=naive.SCALE_DTYPE)
    return _packed_like(keys, bits), groups, torch.empty_like(groups)


@_quantize_values_op.register_fake
def _(values, bits, group_size):
    b, h, t, d = values.shape
    groups = values.new_empty(b, h, t, d // naive.value_group(d, group_size), dtype=naive.SCALE_DTYPE)
    return _packed_like(values, bits), groups, torch.empty_like(groups)


def _fake_dequantize(codes, scale, zero, bits, group_size, dtype):
    return codes.new_empty(*codes.shape[:-1], codes.shape[-1] * 8 // bits, dtype=dtype)


_dequantize_keys_op.register_fake(_fake_dequantize)
_dequantize_values_op.register_fake(_fake_dequantize)


def quantize_keys(keys, bits=4, group_size=64, check_values=True, clip=1.0):
    """Keys (B, H, T, D) -> (codes uint8 (B, H, T, D*bits/8), scale, zero fp16 (B, H, ceil(T/G), D)):
    per-channel asymmetric quantization over groups of `group_size` tokens (KIVI). `clip` < 1
    quantizes each group over the middle `clip` of its range (see naive.clip_key_range)."""
    checks.check_quantize("quantize_keys", keys, bits, group_size, values_checked(check_values))
    checks.check_clip("quantize_keys", clip)
    keys = naive.clip_key_range(keys, group_size, clip)
    op = _quantize_keys_op if traced() else _quantize_keys
    return op(keys.contiguous(), bits, group_size)


def quantize_values(values, bits=4, group_size=64, check_values=True):
    """Values (B, H, T, D) -> (codes uint8 (B, H, T, D*bits/8), scale, zero fp16 (B, H, T, D/Gv)):
    per-token asymmetric quantization over groups of Gv = min(group_size, D) channels (KIVI)."""
    checks.check_quantize("quantize_values", values, bits, group_size, values_checked(check_values))
    op = _quantize_values_op if traced() else _quantize_values
    return op(values.contiguous(), bits, group_size)


def dequantize_keys(codes, scale, zero, bits=4, group_size=64, dtype=torch.float32):
    checks.check_dequantize("dequantize_keys", codes, scale, zero, bits, group_size, dtype)
    op = _dequantize_keys_op if traced() else _dequantize_keys
    return op(codes.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size, dtype)


def dequantize_values(codes, scale, zero, bits=4, group_size=64, dtype=torch.float32):
    checks.check_dequantize("dequantize_values", codes, scale, zero, bits, group_size, dtype)
    op = _dequantize_values_op if traced() else _dequantize_values
    return op(codes.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size, dtype)


def quantize_kv(keys, values, bits=4, group_size=64, check_values=True, key_clip=1.0):
    """Both halves of a cache (B, H, T, D) -> PackedKV."""
    checks.check_kv_pair("quantize_kv", keys, values)
    return PackedKV(*quantize_keys(keys, bits, group_size, check_values, key_clip),
                    *quantize_values(values, bits, group_size, check_values), bits, group_size)


def dequantize_kv(packed, dtype=torch.float32):
    """PackedKV -> (keys, values) (B, H, T, D) in `dtype`."""
    p = packed
    return (dequantize_keys(p.key_codes, p.key_scale, p.key_zero, p.bits, p.group_size, dtype),
            dequantize_values(p.value_codes, p.value_scale, p.value_zero, p.bits, p.group_size, dtype))


# ---- decode attention ---------------------------------------------------------------------------

def _decode_attention(query: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
                      value_scale: Tensor, value_zero: Tensor, residual_keys: Tensor, residual_values: Tensor,
                      bits: int, group_size: int, scale: float) -> Tensor:
    return backend_module(query.device).decode_attention(
        query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
        residual_values, bits, group_size, scale)


_decode_attention_op = torch.library.custom_op("engram::kv_decode_attention", _decode_attention, mutates_args=())


@_decode_attention_op.register_fake
def _(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
      residual_values, bits, group_size, scale):
    return torch.empty_like(query)


def decode_attention(query, packed: PackedKV, residual_keys: Optional[Tensor] = None,
                     residual_values: Optional[Tensor] = None, scale: Optional[float] = None,
                     check_values=True):
    """Causal attention of the newest Tq query tokens straight from a packed cache.

    query (B, Hq, Tq, D); `packed` holds the oldest Tp tokens (Hkv KV heads, Hq a multiple of Hkv:
    grouped-query attention); residual_keys/values (B, Hkv, R, D), in the query's dtype, hold the
    newest R tokens in full precision. The query tokens are the last Tq of the Tp + R cached ones
    and see every token up to their own. Dequantization is fused into QK^T and PV; the softmax runs
    in fp32. Returns (B, Hq, Tq, D) in the query's dtype. `scale` defaults to D**-0.5.
    """
    p = packed
    checks.check_scale("decode_attention", scale)
    contiguous = checks.check_decode_attention(query, *p.tensors(), residual_keys, residual_values, p.bits,
                                               p.group_size, values_checked(check_values))
    b, _, _, d = query.shape
    if query.numel() == 0:  # no batch rows or no heads: nothing for a kernel to do
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    if residual_keys is None:
        residual_keys = residual_values = query.new_empty(b, p.key_codes.shape[1], 0, d)
    tensors = (query, *p.tensors(), residual_keys, residual_values)
    if not contiguous:
        tensors = tuple(t.contiguous() for t in tensors)
    scale = d ** -0.5 if scale is None else float(scale)
    op = _decode_attention_op if traced() else _decode_attention
    return op(*tensors, p.bits, p.group_size, scale)
