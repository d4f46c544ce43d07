"""KV-cache ops: every available backend against the pure-PyTorch reference (naive.py), the
reference against SDPA on the dequantized cache, and bad input rejected before any kernel runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backend_cases import GPU, backend_cases, interpreted, tolerance
from engram_kernels import backends
from engram_kernels.ops.kvcache import (PackedKV, checks, decode_attention, dequantize_keys, dequantize_kv,
                                        dequantize_values, functional, naive, quantize_keys, quantize_kv,
                                        quantize_values)

CASES = backend_cases("kvcache")

# (B, H, T, D, bits, G): head dims 64 and 128, T filling no group, a partial last group, several.
QUANT_SHAPES = [(1, 1, 1, 64, 4, 32), (2, 3, 50, 64, 2, 32), (1, 2, 64, 128, 4, 64), (2, 2, 100, 128, 2, 64),
                (1, 2, 37, 64, 4, 128), (1, 1, 20, 8, 2, 4)]
# (B, Hq, Hkv, Tq, D, Tp, R, G): GQA 1..4 query heads per KV head, 1-3 query tokens, empty packed
# store, no residual window, packed lengths that do not fill a group.
DECODE_SHAPES = [(1, 4, 4, 1, 64, 64, 16, 32), (2, 6, 2, 1, 64, 50, 0, 32), (1, 9, 3, 2, 64, 100, 7, 64),
                 (1, 8, 2, 1, 128, 130, 5, 64), (2, 4, 1, 3, 128, 64, 3, 32), (1, 2, 1, 1, 64, 0, 9, 32),
                 (1, 4, 2, 2, 64, 33, 1, 128),
                 # 12 query tokens, no residual window: packed tokens masked for some rows, whole blocks for some
                 (1, 2, 2, 12, 64, 48, 0, 32)]


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def kv_case(request):
    backend, device = request.param
    with backends.use_backend(backend):
        yield backend, device


def _dtypes(case):
    backend, device = case
    if interpreted(backend, device):
        return [torch.float32]
    return [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]


def _decode_dtypes(case):
    """The Triton and CUDA decode kernels also run fp16: their 16-bit operands take the codes by bit
    tricks that differ per dtype (and the interpreter's fp16 dot is right where its bf16 dot is not)."""
    if case[0] not in ("triton", "cuda"):
        return _dtypes(case)
    return _dtypes(case) + [torch.float16]


def _skip_heavy(case, work, limit):
    if interpreted(*case) and work > limit:
        pytest.skip("too large for the Triton interpreter")


# Every distinct shape is a fresh Triton compile on a GPU (seconds each): the GPU check runs these.
TRITON_GPU_QUANT = {QUANT_SHAPES[i] for i in (1, 2, 4)}
TRITON_GPU_DECODE = {DECODE_SHAPES[i] for i in (1, 2, 4, 5)}


def _skip_compile_heavy(case, shape, chosen):
    if case == ("triton", "cuda") and shape not in chosen:
        pytest.skip("Triton on GPU: a subset of shapes keeps JIT compiling within the GPU check's budget")


def _randn(*shape, seed, device, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype)


@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_quantize_matches_reference(kv_case, shape):
    b, h, t, d, bits, g = shape
    _skip_compile_heavy(kv_case, shape, TRITON_GPU_QUANT)
    _, device = kv_case
    for dtype in _dtypes(kv_case):
        x = _randn(b, h, t, d, seed=t * d + bits, device=device, dtype=dtype)
        for quantize in (quantize_keys, quantize_values):
            got = quantize(x, bits, g)
            expected = getattr(naive, quantize.__name__)(x.cpu(), bits, g)
            for name, a, e in zip(("codes", "scale", "zero"), got, expected):
                assert a.dtype == e.dtype and a.shape == e.shape, name
                if name == "codes":  # a value on a rounding boundary may land one code apart
                    diff = (naive.unpack(a.cpu(), bits).int() - naive.unpack(e, bits).int()).abs()
                    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"{quantize.__name__} codes"
                else:
                    torch.testing.assert_close(a.cpu(), e, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("t, g", [(64, 32), (37, 16), (5, 8)])
def test_clip_key_range_keeps_the_middle_of_each_group(t, g):
    keys = torch.randn(2, 3, t, 16) * torch.linspace(0.1, 5, 16)  # channels of different ranges
    clipped = naive.clip_key_range(keys, g, 0.6)
    for start in range(0, t, g):
        x, c = keys[:, :, start:start + g], clipped[:, :, start:start + g]
        lo, hi = x.amin(2), x.amax(2)
        mid, half = (lo + hi) / 2, (hi - lo) * 0.3
        torch.testing.assert_close(c.amin(2), mid - half)
        torch.testing.assert_close(c.amax(2), mid + half)
        inside = (x >= (mid - half)[:, :, None]) & (x <= (mid + half)[:, :, None])
        assert torch.equal(c[inside], x[inside])
    assert naive.clip_key_range(keys, g, 1.0) is keys


def test_clipped_quantization_spends_levels_on_the_bulk():
    """int2 codes over a clipped range: the bulk is reproduced better, though the extremes are cut."""
    keys = torch.randn(1, 4, 256, 64, generator=torch.Generator().manual_seed(7))
    errors = {}
    for clip in (1.0, 0.7):
        packed = quantize_kv(keys, keys, 2, 64, key_clip=clip)
        errors[clip] = (dequantize_kv(packed)[0] - keys).pow(2).mean()
    assert errors[0.7] < 0.8 * errors[1.0]


@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_dequantize_matches_reference_and_bounds_error(kv_case, shape):
    b, h, t, d, bits, g = shape
    _skip_compile_heavy(kv_case, shape, TRITON_GPU_QUANT)
    _, device = kv_case
    x = _randn(b, h, t, d, seed=3, device="cpu", dtype=torch.float32)
    with backends.use_backend("torch"):
        packed = quantize_kv(x, x, bits, g)
    packed = packed._replace(**{f: getattr(packed, f).to(device) for f in packed._fields[:6]})
    keys, values = dequantize_kv(packed)
    ref_keys, ref_values = naive.full_cache(*(t.cpu() for t in packed.tensors()), None, None, bits, g)
    torch.testing.assert_close(keys.cpu(), ref_keys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=1e-6, atol=1e-6)
    # Half a step of the coarsest group, plus the fp16 rounding of scale and zero.
    key_step = packed.key_scale.float().amax().item()
    value_step = packed.value_scale.float().amax().item()
    assert (keys.cpu() - x).abs().max() <= 0.5 * key_step * 1.01 + 2e-3
    assert (values.cpu() - x).abs().max() <= 0.5 * value_step * 1.01 + 2e-3
    assert dequantize_keys(*packed[:3], bits, g, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert dequantize_values(*packed[3:6], bits, g, dtype=torch.float16).dtype == torch.float16


def _decode_inputs(shape, bits, device, dtype, seed=0):
    b, hq, hkv, tq, d, tp, r, g = shape
    cpu = dict(device="cpu", dtype=torch.float32)
    keys, values = _randn(b, hkv, tp, d, seed=seed, **cpu), _randn(b, hkv, tp, d, seed=seed + 1, **cpu)
    with backends.use_backend("torch"):
        packed = quantize_kv(keys, values, bits, g)
    packed = packed._replace(**{f: getattr(packed, f).to(device) for f in packed._fields[:6]})
    query = _randn(b, hq, tq, d, seed=seed + 2, device=device, dtype=dtype)
    residual = [_randn(b, hkv, r, d, seed=seed + i, device=device, dtype=dtype) for i in (3, 4)]
    return query, packed, residual


@pytest.mark.parametrize("bits", (4, 2))
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
def test_decode_attention_matches_reference(kv_case, shape, bits):
    _skip_heavy(kv_case, shape[1] * (shape[5] + shape[6]), 2000)
    _skip_compile_heavy(kv_case, shape, TRITON_GPU_DECODE)
    _, device = kv_case
    for dtype in _decode_dtypes(kv_case):
        query, packed, (rk, rv) = _decode_inputs(shape, bits, device, dtype)
        residual = (rk, rv) if shape[6] else (None, None)
        out = decode_attention(query, packed, *residual)
        expected = naive.decode_attention(query.cpu(), *(t.cpu() for t in packed.tensors()),
                                          *(t.cpu() if t is not None else None for t in residual), bits,
                                          packed.group_size, shape[4] ** -0.5)
        assert out.dtype == dtype and out.shape == query.shape
        torch.testing.assert_close(out.cpu().float(), expected.float(), **tolerance(dtype))


def test_triton_decode_is_repeatable_and_resets_its_split_counters(kv_case):
    """The last split of each head merges the others, found by a per-head counter that must be back
    at zero after every call, or the next call would merge early."""
    backend, device = kv_case
    if backend != "triton":
        pytest.skip("the split counters are the Triton kernel's")
    from engram_kernels.ops.kvcache import triton_kernels
    query, packed, (rk, rv) = _decode_inputs(DECODE_SHAPES[2], 4, device, torch.float32)
    first, second = (decode_attention(query, packed, rk, rv) for _ in range(2))
    assert torch.equal(first, second)
    assert not triton_kernels._COUNTERS[query.device].any()


@pytest.mark.parametrize("merge", ["kernel", "fused"])
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 128, 2000, 5, 64), (2, 8, 2, 2, 64, 1000, 7, 32)], ids=str)
def test_cuda_decode_merges_its_splits_either_way(kv_case, monkeypatch, merge, shape):
    """The tensor-core kernel's split-K partials are merged by a second kernel or, with
    ENGRAM_KV_MERGE=fused, by each head's last block, found by a per-head counter that must be back
    at zero after every call (a later call would merge early): three calls agree with the reference."""
    backend, device = kv_case
    if backend != "cuda":
        pytest.skip("ENGRAM_KV_MERGE is the CUDA tensor-core kernel's switch")
    monkeypatch.setenv("ENGRAM_KV_MERGE", merge)
    for dtype in (torch.bfloat16, torch.float16):
        query, packed, (rk, rv) = _decode_inputs(shape, 4, device, dtype)
        outs = [decode_attention(query, packed, rk, rv) for _ in range(3)]
        expected = naive.decode_attention(query.cpu(), *(t.cpu() for t in packed.tensors()), rk.cpu(), rv.cpu(), 4,
                                          packed.group_size, shape[4] ** -0.5)
        assert all(torch.equal(outs[0], out) for out in outs[1:])
        torch.testing.assert_close(outs[0].cpu().float(), expected.float(), **tolerance(dtype))


def test_decode_attention_of_a_batch_slice(kv_case):
    """The second sequence of a batch: every tensor a contiguous view at an offset into its storage. With
    63 packed tokens its value scales start 4 bytes past an 8-byte boundary, which the CUDA tensor-core
    kernel (whole-word scale loads) declines for its CUDA-core one; each backend matches the reference."""
    _, device = kv_case
    shape = (2, 8, 1, 1, 128, 63, 5, 64)
    for dtype in _decode_dtypes(kv_case):
        query, packed, (rk, rv) = _decode_inputs(shape, 4, device, dtype)
        query, *cache, rk, rv = (t[1:] for t in (query, *packed.tensors(), rk, rv))
        sliced = packed._replace(**dict(zip(packed._fields[:6], cache)))
        assert sliced.value_scale.storage_offset() * 2 % 8 == 4
        out = decode_attention(query, sliced, rk, rv)
        expected = naive.decode_attention(*(t.cpu() for t in (query, *cache, rk, rv)), 4, packed.group_size,
                                          shape[4] ** -0.5)
        torch.testing.assert_close(out.cpu().float(), expected.float(), **tolerance(dtype))


def _strided_copy(t):
    """The same values and shape in a non-contiguous layout (last two dims stored transposed)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_decode_attention_of_strided_inputs_after_contiguous_ones(kv_case):
    """Non-contiguous inputs whose shapes match a call that passed the checks (and skipped the
    .contiguous() copies) are still copied: each backend matches the reference."""
    _, device = kv_case
    shape = (1, 4, 2, 1, 64, 70, 6, 32)
    for dtype in _decode_dtypes(kv_case):
        query, packed, (rk, rv) = _decode_inputs(shape, 4, device, dtype)
        first = decode_attention(query, packed, rk, rv)
        strided = packed._replace(**{f: _strided_copy(getattr(packed, f)) for f in packed._fields[:6]})
        assert not strided.key_codes.is_contiguous()
        out = decode_attention(_strided_copy(query), strided, _strided_copy(rk), _strided_copy(rv))
        torch.testing.assert_close(out, first, rtol=0, atol=0)


@pytest.mark.parametrize("compiled", [True, False], ids=["extension", "python"])
def test_decode_signature_tells_structures_apart(compiled, monkeypatch):
    """The key under which passed checks are cached changes with any input's dtype, shape, device or
    presence, and with bits and group size; the extension gives none for a non-contiguous input."""
    if compiled and backends.extension("_C_kvcache_cpu") is None:
        pytest.skip("the C++ extension is not built")
    if not compiled:
        monkeypatch.setattr(checks, "extension", lambda name: None)
    packed, query, residual = _packed(), torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8)
    inputs = (query, *packed.tensors(), residual, residual)
    key = checks._signature(inputs, 4, 4)
    assert key == checks._signature(tuple(t.clone() for t in inputs), 4, 4)
    variants = [(inputs, 2, 4), (inputs, 4, 8), (inputs[:7] + (None, None), 4, 4),
                ((query.double(),) + inputs[1:], 4, 4), ((query[:, :2],) + inputs[1:], 4, 4),
                (inputs[:6] + (inputs[6].to("meta"),) + inputs[7:], 4, 4),
                ((query.view(1, 4, 8, 1),) + inputs[1:], 4, 4)]
    keys = [checks._signature(*v) for v in variants]
    assert None not in keys and len({key, *keys}) == len(keys) + 1
    assert checks._signature(inputs, 4.0, 4) is None and checks._signature((query, "x"), 4, 4) is None
    strided = checks._signature(inputs[:7] + (_strided_copy(residual), residual), 4, 4)
    assert strided is None if compiled else strided == key


def test_decode_attention_of_an_empty_batch_is_empty(kv_case):
    """No batch rows (or no heads) with a non-empty packed store: an empty result, no kernel launch
    (the backends size their splits per head)."""
    _, device = kv_case
    query, packed, (rk, rv) = _decode_inputs((1, 4, 2, 1, 64, 40, 3, 32), 4, device, torch.float32)
    empty = packed._replace(**{f: getattr(packed, f)[:0] for f in packed._fields[:6]})
    out = decode_attention(query[:0], empty, rk[:0], rv[:0])
    assert out.shape == (0, 4, 1, 64) and out.device == query.device


@pytest.mark.skipif(not GPU, reason="the CUDA and Triton kernels' grid limits")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_quantize_past_the_grid_limits(backend):
    """More rows than the CUDA kernels' capped grids hold (4 * 2**20) and more tiles than a grid's
    second axis (65535): every row is written."""
    if not backends.is_available(backend, "cuda", "kvcache"):
        pytest.skip(f"{backend} unavailable")
    x = _randn(1, 1, 4 * 2**20 + 100, 16, seed=4, device="cuda", dtype=torch.bfloat16)
    with backends.use_backend(backend):
        packed = quantize_kv(x, x, 4, 16)
        keys, values = dequantize_kv(packed, torch.float32)
    tail = x[:, :, -300:].float()
    for got in (keys, values):
        assert (got[:, :, -300:] - tail).abs().max() < 0.2 * tail.abs().max()


def test_key_groups_need_not_tile_the_head_dim(kv_case):
    """Key groups run along tokens: only value groups (channels) must divide the head dim."""
    _, device = kv_case
    keys = _randn(1, 2, 100, 64, seed=3, device=device, dtype=torch.float32)
    codes, scale, zero = quantize_keys(keys, 4, 48)
    expected = naive.quantize_keys(keys.cpu(), 4, 48)
    assert torch.equal(codes.cpu(), expected[0]) and scale.shape == (1, 2, 3, 64)
    torch.testing.assert_close(dequantize_keys(codes, scale, zero, 4, 48).cpu(),
                               naive.dequantize_keys(*expected, 4, 48, torch.float32))


@pytest.mark.parametrize("shape", DECODE_SHAPES[:4], ids=str)
def test_reference_equals_sdpa_on_dequantized_cache(shape):
    query, packed, (rk, rv) = _decode_inputs(shape, 4, "cpu", torch.float32, seed=5)
    keys, values = dequantize_kv(packed)
    keys, values = torch.cat([keys, rk], 2), torch.cat([values, rv], 2)
    tq, kv_len = query.shape[2], keys.shape[2]
    mask = naive.causal_mask(tq, kv_len, "cpu")
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    with backends.use_backend("torch"):
        out = decode_attention(query, packed, rk, rv)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_scale_and_int4_close_to_full_precision():
    """int4 attention stays near fp attention on the unquantized cache (a sanity bound, not a
    backend comparison)."""
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 256, 64, generator=gen), torch.randn(1, 2, 256, 64, generator=gen)
    query = torch.randn(1, 4, 1, 64, generator=gen)
    exact = F.scaled_dot_product_attention(query, keys, values, enable_gqa=True, scale=0.1)
    out = decode_attention(query, quantize_kv(keys, values, 4, 32), scale=0.1)
    assert (out - exact).abs().max() < 0.1


# ---- bad input ----------------------------------------------------------------------------------

@pytest.fixture
def no_kernel_may_run(monkeypatch):
    def refuse(device):
        raise AssertionError("a kernel ran before the input was rejected")
    monkeypatch.setattr(functional, "backend_module", refuse)


@pytest.mark.usefixtures("no_kernel_may_run")
@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize_keys(torch.randn(1, 1, 4, 6), 2, 2), ValueError, "head dim 6 must be a multiple of 4"),
    (lambda: quantize_keys(torch.randn(1, 1, 4, 7), 4, 2), ValueError, "head dim 7 must be a multiple of 2"),
    (lambda: quantize_values(torch.randn(1, 1, 4, 8), 3, 4), ValueError, "bits must be 2 or 4, got 3"),
    (lambda: quantize_values(torch.randn(1, 1, 4, 8), 8, 4), ValueError, "bits must be 2 or 4"),
    (lambda: quantize_values(torch.randn(1, 1, 4, 8), 4.0, 4), ValueError, r"bits must be 2 or 4, got 4.0 \(an int\)"),
    (lambda: quantize_keys(torch.randn(1, 1, 4, 0), 4, 4), ValueError, "head dim must be >= 1"),
    (lambda: quantize_keys(torch.full((1, 1, 4, 8), 7e4), 4, 4), ValueError, r"beyond \+-65504"),
    (lambda: quantize_values(torch.full((1, 1, 4, 8), -1e5), 4, 4), ValueError, "float16 scales"),
    (lambda: quantize_values(torch.randn(1, 1, 4, 24), 4, 16), ValueError, r"multiple of the value group"),
    (lambda: quantize_keys(torch.randn(1, 1, 4, 8), 4, 0), ValueError, "group_size must be a positive int"),
    (lambda: quantize_keys(torch.randn(1, 1, 4, 8), 2, 4, clip=0), ValueError, r"clip must be a number in \(0, 1\]"),
    (lambda: quantize_kv(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 2, 4, key_clip=1.5), ValueError,
     "clip must be"),
    (lambda: quantize_kv(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), 4, 4), ValueError,
     r"keys \(1, 2, 4, 8\) and values \(1, 1, 4, 8\) must have the same"),
    (lambda: quantize_keys(torch.randn(1, 1, 4, 8).double(), 4, 4), TypeError, "keys must be float32"),
    (lambda: quantize_keys(torch.randn(4, 8), 4, 4), ValueError, "keys must have 4 dimensions"),
    (lambda: quantize_values(torch.full((1, 1, 4, 8), float("nan")), 4, 4), ValueError, "values contains NaN"),
    (lambda: dequantize_keys(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 1, 8, dtype=torch.float16),
                             torch.zeros(1, 1, 1, 8, dtype=torch.float16), 4, 4), TypeError, "must be a uint8"),
    (lambda: dequantize_keys(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 1, 1, 8),
                             torch.zeros(1, 1, 1, 8), 4, 4), TypeError, "key_scale must be a float16"),
    (lambda: dequantize_values(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 1, 2, 1, dtype=torch.float16),
                               torch.zeros(1, 1, 2, 1, dtype=torch.float16), 4, 8), ValueError,
     r"value_scale must have shape \(1, 1, 4, 1\)"),
])
def test_bad_input_is_rejected(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _packed(d=8, t=8, h=2, bits=4, g=4):
    return PackedKV(*naive.quantize_keys(torch.randn(1, h, t, d), bits, g),
                    *naive.quantize_values(torch.randn(1, h, t, d), bits, g), bits, g)


@pytest.mark.usefixtures("no_kernel_may_run")
@pytest.mark.parametrize("make, error, message", [
    (lambda p: (torch.randn(1, 4, 1, 8).double(), p, None, None), TypeError, "query must be float32"),
    (lambda p: (torch.randn(1, 3, 1, 8), p, None, None), ValueError, "Hq a multiple of Hkv"),
    (lambda p: (torch.randn(2, 4, 1, 8), p, None, None), ValueError, "query batch 2 and packed cache batch 1 differ"),
    (lambda p: (torch.randn(1, 4, 1, 16), p, None, None), ValueError, r"key_codes must have shape"),
    (lambda p: (torch.randn(1, 4, 9, 8), p, None, None), ValueError, "9 query tokens need at least"),
    (lambda p: (torch.randn(1, 4, 1, 8), p, torch.randn(1, 2, 3, 8), None), ValueError, "given together"),
    (lambda p: (torch.randn(1, 4, 1, 8), p, torch.randn(1, 2, 3, 8).half(), torch.randn(1, 2, 3, 8).half()),
     TypeError, "residual_keys must have the query's dtype"),
    (lambda p: (torch.randn(1, 4, 1, 8), p, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)), ValueError,
     "must both be"),
    (lambda p: (torch.randn(1, 4, 1, 8), p._replace(bits=3), None, None), ValueError, "bits must be 2 or 4"),
    (lambda p: (torch.randn(1, 4, 1, 8) * float("inf"), p, None, None), ValueError, "query contains NaN or Inf"),
    (lambda p: (torch.randn(1, 4, 1, 8), p, None, None, float("nan")), ValueError, "scale must be a finite number"),
])
def test_decode_attention_rejects(make, error, message):
    packed = _packed()
    # a valid call on the same store first: the structural checks it passed are cached by signature
    checks.check_decode_attention(torch.randn(1, 4, 1, 8), *packed.tensors(), None, None, 4, 4)
    with pytest.raises(error, match=message):
        decode_attention(*make(packed))


@pytest.mark.usefixtures("no_kernel_may_run")
def test_decode_attention_checks_every_call_once_cached():
    packed = _packed()
    query, residual = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8)
    for _ in range(2):  # the second call hits the signature cache
        checks.check_decode_attention(query, *packed.tensors(), residual, residual, 4, 4)
    with pytest.raises(ValueError, match="residual_values contains NaN"):
        checks.check_decode_attention(query, *packed.tensors(), residual, residual * float("nan"), 4, 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        checks.check_decode_attention(query, *packed.tensors(), residual, residual, 4, 4.0)
    with pytest.raises(TypeError, match="value_zero must be a float16"):
        checks.check_decode_attention(query, *packed.tensors()[:5], packed.value_zero.float(), residual, residual,
                                      4, 4)
    with pytest.raises(ValueError, match="one device"):
        checks.check_decode_attention(query, *packed.tensors(), residual.to("meta"), residual, 4, 4)


_HOPPER_COMPILE = """
import sys, torch
sys.path.insert(0, "scripts")
from triton_sass_stats import compile_decode
for bits, dtype, ptx in ((4, torch.bfloat16, True), (2, torch.bfloat16, True), (4, torch.float16, True),
                         (4, torch.bfloat16, False)):
    compile_decode(bits, 4, 3, dtype, ptx)
print("compiled")
"""


@pytest.mark.skipif(GPU, reason="GPU runs compile and run the kernels for real")
def test_triton_decode_compiles_for_hopper():
    """The decode kernel compiles to sm_90 code, no GPU needed: its inline PTX (which the interpreter
    never runs), the atomic counter and the per-plane dots, int4 and int2, bf16 and fp16. In a
    subprocess, since this process runs Triton's interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def _run_plane_ptx(asm, word):
    """Runs the few PTX instructions of triton_kernels._plane_asm on one 32-bit input ($2)."""
    regs = {"$2": word}

    def value(x):
        return regs[x] if x in regs else int(x, 0)

    for statement in asm.strip("{} ").split(";"):
        op, _, operands = statement.strip().partition(" ")
        args = [a.strip() for a in operands.split(",")]
        if op == "shr.b32":
            regs[args[0]] = value(args[1]) >> value(args[2])
        elif op == "and.b32":
            regs[args[0]] = value(args[1]) & value(args[2])
        elif op == "mov.b32":
            regs[args[0]] = value(args[1])
        elif op == "prmt.b32":  # bytes 0-3 of a, 4-7 of b; a selector nibble picks each output byte
            src = [(value(args[1]) >> 8 * i) & 0xFF for i in range(4)] + [(value(args[2]) >> 8 * i) & 0xFF
                                                                       for i in range(4)]
            regs[args[0]] = sum(src[(value(args[3]) >> 4 * k) & 7] << 8 * k for k in range(4))
        else:
            assert op in ("", ".reg"), op
    return regs["$0"], regs["$1"]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("magic_bits", [0x4300, 0x6400])
def test_inline_ptx_unpacks_like_the_bit_path(bits, magic_bits):
    """The decode kernel's inline PTX (GPU only) gives each packed byte k (pack=4: byte k of $2 is
    element k) the 16-bit operand the interpreter's bit path gives it: plane i's code under the
    magic high byte, elements 0, 1 in $0 and 2, 3 in $1, low half first."""
    from engram_kernels.ops.kvcache import triton_kernels
    words = torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    for plane in range(8 // bits):
        asm = triton_kernels._plane_asm(bits, plane, magic_bits)
        for word in words + [0, 2**32 - 1]:
            low, high = _run_plane_ptx(asm, word)
            got = [low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16]
            expected = [((word >> 8 * k) & 0xFF) >> plane * bits & (1 << bits) - 1 | magic_bits for k in range(4)]
            assert got == expected, (plane, hex(word))


def test_decode_attention_compiles_in_one_graph_with_value_checks_on():
    """The NaN checks read the data, which no graph can: torch.compile traces past them."""
    query, packed, (rk, rv) = _decode_inputs(DECODE_SHAPES[0], 4, "cpu", torch.float32)
    compiled = torch.compile(lambda q: decode_attention(q, packed, rk, rv), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(query), decode_attention(query, packed, rk, rv))
