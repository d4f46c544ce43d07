"""Input validation, run before any kernel so bad input fails with a clear Python error."""
import math

import torch

from ..memory.checks import ID_DTYPES, _fail, check_float, check_same_device


def check_same_dtype(op, **tensors):
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{op}: all tensors must have one dtype, got "
                        + ", ".join(f"{n} {d}" for n, d in dtypes.items()))


def check_scale(op, scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a Python number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale!r}")


def check_dropout(op, p, seed):
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        _fail(op, f"dropout must be a float in [0, 1), got {p!r}")
    if not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, got {type(seed).__name__}")


def check_base(op, x, weight, bias):
    check_float(op, "x", x, None)
    check_float(op, "weight", weight, 2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        _fail(op, f"x's last dimension must be in_features={weight.shape[1]} (weight is (out, in)="
                  f"{tuple(weight.shape)}), got x of shape {tuple(x.shape)}")
    if bias is not None:
        check_float(op, "bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            _fail(op, f"bias must have shape (out_features,)=({weight.shape[0]},), got {tuple(bias.shape)}")


def check_lora_linear(x, weight, lora_a, lora_b, scale, bias, p, seed):
    op = "lora_linear"
    check_base(op, x, weight, bias)
    check_float(op, "lora_a", lora_a, 2)
    check_float(op, "lora_b", lora_b, 2)
    check_same_device(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    check_same_dtype(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    out_features, in_features = weight.shape
    if lora_a.shape[1] != in_features:
        _fail(op, f"lora_a must have shape (r, in_features)=(r, {in_features}), got {tuple(lora_a.shape)}")
    if lora_b.shape != (out_features, lora_a.shape[0]):
        _fail(op, f"rank mismatch: lora_a {tuple(lora_a.shape)} has r={lora_a.shape[0]}, so lora_b must be "
                  f"(out_features, r)=({out_features}, {lora_a.shape[0]}), got {tuple(lora_b.shape)}")
    check_scale(op, scale)
    check_dropout(op, p, seed)


def check_lora_linear_multi(x, weight, lora_a, lora_b, scales, adapter_ids, bias, check_values):
    op = "lora_linear_multi"
    check_base(op, x, weight, bias)
    check_float(op, "lora_a", lora_a, 3)
    check_float(op, "lora_b", lora_b, 3)
    check_float(op, "scales", scales, 1)
    if scales.requires_grad:
        raise ValueError(f"{op}: scales must not require grad (the op computes no gradient for them)")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{op}: adapter_ids must be an int64 or int32 tensor, "
                        f"got {getattr(adapter_ids, 'dtype', type(adapter_ids))}")
    check_same_device(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales,
                      adapter_ids=adapter_ids, bias=bias)
    check_same_dtype(op, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    n_adapters, rank, in_features = lora_a.shape
    if in_features != weight.shape[1]:
        _fail(op, f"lora_a must have shape (n_adapters, r, in_features)=(n, r, {weight.shape[1]}), "
                  f"got {tuple(lora_a.shape)}")
    if lora_b.shape != (n_adapters, weight.shape[0], rank):
        _fail(op, f"rank mismatch: lora_a {tuple(lora_a.shape)} needs lora_b of shape (n_adapters, out, r)="
                  f"({n_adapters}, {weight.shape[0]}, {rank}), got {tuple(lora_b.shape)}")
    if scales.shape != (n_adapters,):
        _fail(op, f"scales must have shape (n_adapters,)=({n_adapters},), got {tuple(scales.shape)}")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if adapter_ids.shape != x.shape[:-1]:
        _fail(op, f"adapter_ids must have x's leading shape {tuple(x.shape[:-1])} (one id per row), "
                  f"got {tuple(adapter_ids.shape)}")
    if check_values:
        _check_multi_values(op, scales, adapter_ids if rows else None, n_adapters)


def _check_multi_values(op, scales, adapter_ids, n_adapters):
    """Finite scales and ids in range, read back in one transfer (one device sync per call)."""
    stats = [scales.double().sum()]  # fp32 scales cannot overflow a float64 sum: non-finite iff one is
    if adapter_ids is not None:
        stats += [adapter_ids.min().double(), adapter_ids.max().double()]
    total, *ids_range = torch.stack(stats).tolist()
    if not math.isfinite(total):
        _fail(op, "scales contains NaN or Inf")
    if ids_range:
        lo, hi = int(ids_range[0]), int(ids_range[1])
        if lo < -1 or hi >= n_adapters:
            raise IndexError(f"{op}: adapter_ids must lie in [-1, {n_adapters}) (-1: no adapter), "
                             f"found values in [{lo}, {hi}]")


def check_merge(op, weight, lora_a, lora_b, scale):
    check_float(op, "weight", weight, 2)
    check_float(op, "lora_a", lora_a, 2)
    check_float(op, "lora_b", lora_b, 2)
    check_same_device(op, weight=weight, lora_a=lora_a, lora_b=lora_b)
    if lora_a.shape[1] != weight.shape[1] or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        _fail(op, f"weight {tuple(weight.shape)} needs lora_a (r, {weight.shape[1]}) and lora_b "
                  f"({weight.shape[0]}, r); got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    check_scale(op, scale)
