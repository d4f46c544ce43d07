"""Input validation for the KV-cache ops, run before any kernel so bad input fails with a clear error."""
import math

import torch

from ...backends import extension
from ..eager import traced
from ..memory.checks import FLOAT_DTYPES, check_finite, check_float, check_same_device
from .naive import SCALE_DTYPE, codes_per_byte, value_group

BITS = (2, 4)
FP16_MAX = torch.finfo(SCALE_DTYPE).max


def _fail(op, message):
    raise ValueError(f"{op}: {message}")


def check_bits(op, bits):
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        _fail(op, f"bits must be 2 or 4, got {bits!r} (an int)")


def check_format(op, head_dim, bits, group_size, values=True):
    """`values`: the op stores values too, whose groups (min(group_size, D) channels) must tile D."""
    check_bits(op, bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        _fail(op, f"group_size must be a positive int, got {group_size!r}")
    if head_dim < 1:
        _fail(op, f"head dim must be >= 1, got {head_dim}")
    per = codes_per_byte(bits)
    if head_dim % per:
        _fail(op, f"head dim {head_dim} must be a multiple of {per} to pack {bits}-bit codes into bytes")
    gv = value_group(head_dim, group_size)
    if values and head_dim % gv:
        _fail(op, f"head dim {head_dim} must be a multiple of the value group min(group_size, D)={gv}")


def check_states(op, name, x, check_values):
    check_float(op, name, x, 4)
    if check_values and x.numel():
        peak = float(x.detach().abs().amax())  # NaN propagates: one reduction checks both
        if not math.isfinite(peak):
            _fail(op, f"{name} contains NaN or Inf")
        if peak > FP16_MAX:
            _fail(op, f"{name} holds values beyond +-{FP16_MAX:g} (|x| up to {peak:g}): the float16 scales and "
                      "zero points cannot represent them")


def check_quantize(op, x, bits, group_size, check_values=True):
    keys = "key" in op
    check_states(op, "keys" if keys else "values", x, check_values)
    check_format(op, x.shape[-1], bits, group_size, values=not keys)


def check_kv_pair(op, keys, values):
    """The two halves of one cache: same (B, H, T, D) and device (each half's own checks follow)."""
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
        return  # quantize_keys / quantize_values name the culprit
    if keys.shape != values.shape:
        _fail(op, f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same (B, H, T, D)")
    check_same_device(op, keys=keys, values=values)


def check_scale(op, scale):
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        _fail(op, f"scale must be a finite number or None (D**-0.5), got {scale!r}")


def check_clip(op, clip):
    if not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        raise ValueError(f"{op}: clip must be a number in (0, 1], got {clip!r}")


def check_codes(op, name, codes, shape):
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"{op}: {name} must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if tuple(codes.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(codes.shape)}")


def check_scales(op, name, t, shape):
    if not isinstance(t, torch.Tensor) or t.dtype != SCALE_DTYPE:
        raise TypeError(f"{op}: {name} must be a float16 tensor, got {getattr(t, 'dtype', type(t))}")
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_packed_keys(op, codes, scale, zero, head_dim, bits, group_size):
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4:
        _fail(op, f"key_codes must be a (B, H, T, D*bits/8) tensor, got {getattr(codes, 'shape', codes)}")
    b, h, t, _ = codes.shape
    check_codes(op, "key_codes", codes, (b, h, t, head_dim * bits // 8))
    groups = (b, h, math.ceil(t / group_size), head_dim)
    check_scales(op, "key_scale", scale, groups)
    check_scales(op, "key_zero", zero, groups)


def check_packed_values(op, codes, scale, zero, head_dim, bits, group_size):
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4:
        _fail(op, f"value_codes must be a (B, H, T, D*bits/8) tensor, got {getattr(codes, 'shape', codes)}")
    b, h, t, _ = codes.shape
    check_codes(op, "value_codes", codes, (b, h, t, head_dim * bits // 8))
    groups = (b, h, t, head_dim // value_group(head_dim, group_size))
    check_scales(op, "value_scale", scale, groups)
    check_scales(op, "value_zero", zero, groups)


def check_dequantize(op, codes, scale, zero, bits, group_size, dtype):
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4:
        _fail(op, f"codes must be a (B, H, T, D*bits/8) tensor, got {getattr(codes, 'shape', codes)}")
    check_bits(op, bits)
    head_dim = codes.shape[-1] * codes_per_byte(bits)
    check_format(op, head_dim, bits, group_size, values=op == "dequantize_values")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")
    check = check_packed_keys if op == "dequantize_keys" else check_packed_values
    check(op, codes, scale, zero, head_dim, bits, group_size)
    check_same_device(op, codes=codes, scale=scale, zero=zero)


# Signatures (bits, group size; dtype, device and shape of every input) whose structure passed
# check_decode_attention: a decode step calls it once per layer with the same shapes, so the layers
# after the first skip the structural checks (~20 us of Python each on a slow host). Values (NaN)
# are never cached. Cleared when full: a growing cache changes its shapes every step.
_DECODE_PASSED = set()
_DECODE_PASSED_MAX = 4096


def _python_signature(tensors, bits, group_size):
    key = [bits, group_size]
    for t in tensors:
        key += (None, None, None) if t is None else (t.shape, t.dtype, t.device)
    return tuple(key)


def _signature(tensors, bits, group_size):
    """The inputs' structure as a hashable key, computed by the C++ extension where it is built (2-3x
    faster; not while torch.compile traces, which cannot see into it); None when there is none to trust
    (not tensors, bits or group size not ints) or, from the extension, when an input is not contiguous."""
    if type(bits) is not int or type(group_size) is not int:
        return None
    ext = None if traced() else extension("_C_kvcache_cpu")
    try:
        if ext is not None:
            return ext.decode_signature(tensors, bits, group_size)
        return _python_signature(tensors, bits, group_size)
    except (TypeError, AttributeError, RuntimeError):  # not tensors: the structural check names the culprit
        return None


def check_decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                           residual_keys, residual_values, bits, group_size, check_values=True):
    """Raises on bad input. Returns True when the inputs' structure matched one checked before and the
    C++ extension saw every input contiguous (the caller may skip .contiguous())."""
    tensors = (query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
               residual_values)
    key = _signature(tensors, bits, group_size)
    known = key is not None and key in _DECODE_PASSED
    if not known:
        _check_decode_structure(*tensors, bits, group_size)
        if key is not None:
            if len(_DECODE_PASSED) >= _DECODE_PASSED_MAX:
                _DECODE_PASSED.clear()
            _DECODE_PASSED.add(key)
    if check_values:
        check_finite("decode_attention", query=query, residual_keys=residual_keys, residual_values=residual_values)
    return known and type(key) is bytes


def _check_decode_structure(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                            residual_keys, residual_values, bits, group_size):
    op = "decode_attention"
    check_float(op, "query", query, 4)
    b, hq, tq, d = query.shape
    check_format(op, d, bits, group_size)
    check_packed_keys(op, key_codes, key_scale, key_zero, d, bits, group_size)
    check_packed_values(op, value_codes, value_scale, value_zero, d, bits, group_size)
    bk, hkv, tp, _ = key_codes.shape
    if value_codes.shape[:3] != key_codes.shape[:3]:
        _fail(op, f"value_codes {tuple(value_codes.shape)} and key_codes {tuple(key_codes.shape)} must hold "
                  "the same (B, H, T)")
    if bk != b:
        _fail(op, f"query batch {b} and packed cache batch {bk} differ")
    if hkv < 1 or hq % hkv:
        _fail(op, f"query (B, Hq, Tq, D)={tuple(query.shape)} needs packed keys (B, Hkv, ...) with Hq a "
                  f"multiple of Hkv, got {tuple(key_codes.shape)}")
    r = _check_residual(op, query, residual_keys, residual_values, (b, hkv, d))
    if tq < 1 or tq > tp + r:
        _fail(op, f"{tq} query tokens need at least as many cached tokens (incl. themselves), got {tp + r}")
    check_same_device(op, query=query, key_codes=key_codes, key_scale=key_scale, key_zero=key_zero,
                      value_codes=value_codes, value_scale=value_scale, value_zero=value_zero,
                      residual_keys=residual_keys, residual_values=residual_values)


def _check_residual(op, query, keys, values, bhd):
    """Length of the full-precision residual window (0 when absent)."""
    if keys is None and values is None:
        return 0
    if keys is None or values is None:
        _fail(op, "residual_keys and residual_values must be given together")
    for name, t in (("residual_keys", keys), ("residual_values", values)):
        check_float(op, name, t, 4)
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} must have the query's dtype {query.dtype}, got {t.dtype}")
    b, h, d = bhd
    if keys.shape != values.shape or (keys.shape[0], keys.shape[1], keys.shape[3]) != (b, h, d):
        _fail(op, f"residual keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                  f"({b}, {h}, R, {d})")
    return keys.shape[2]
