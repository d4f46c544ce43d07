"""Decode attention from the packed KV cache: `pytest benchmarks/test_kvcache_bench.py --benchmark-only`.

One query token (batch 1) against a cache of `context` tokens: the newest 128 in the
full-precision residual window, the rest KIVI-packed (group 64). Backends:
  sdpa       F.scaled_dot_product_attention(enable_gqa=True) over the uncompressed cache (fp32 on
             CPU, bf16 on GPU): the baseline every `speedup_vs_sdpa` in extra_info is against;
  torch|cpu|triton|cuda   engram_kernels.decode_attention under use_backend(name) (torch is the
             reference: dequantize everything, then attend);
  hf_quanto  transformers' QuantizedCache layer (optimum-quanto, when installed): one update() with
             the new token (it re-quantizes the whole cache every 128 steps, amortized here) and SDPA
             over the dequantized states it returns.
Configs: `smollm2` heads (9 query / 3 KV heads, head dim 64) and `llama8b` heads (32 / 8, 128) at
2k and 8k tokens on CPU; `llama8b` at 4k, 32k and 128k on GPU; `llama8b` at 256 tokens on both,
where a call is mostly host overhead (checks, dispatch, launches), the floor every decode step
pays once per layer. Ops: kv_decode_int4, kv_decode_int2. extra_info `checks_us`: the host time of
the input checks per call, repeated with one set of inputs (as the layers of one decode step call it);
`python_us`: the same for all of a call's Python before the backend's kernel wrapper (checks, backend
lookup, argument preparation).

    -k "cpu_ctx"   the CPU configs          -k "gpu_ctx"   the GPU configs (about 30 s on an H100)
"""
import dataclasses
import functools
import time

import pytest
import torch
import torch.nn.functional as F

from engram_kernels import backends
from engram_kernels.ops.kvcache import PackedKV, checks, decode_attention, functional, quantize_kv

RESIDUAL, GROUP = 128, 64


@dataclasses.dataclass(frozen=True)
class Config:
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int
    device: str  # the device type the config runs on


CONFIGS = {
    "llama8b-256-cpu_ctx": Config(32, 8, 128, 256, "cpu"),
    "smollm2-2k-cpu_ctx": Config(9, 3, 64, 2048, "cpu"),
    "smollm2-8k-cpu_ctx": Config(9, 3, 64, 8192, "cpu"),
    "llama8b-2k-cpu_ctx": Config(32, 8, 128, 2048, "cpu"),
    "llama8b-8k-cpu_ctx": Config(32, 8, 128, 8192, "cpu"),
    "llama8b-256-gpu_ctx": Config(32, 8, 128, 256, "cuda"),
    "llama8b-4k-gpu_ctx": Config(32, 8, 128, 4096, "cuda"),
    "llama8b-32k-gpu_ctx": Config(32, 8, 128, 32768, "cuda"),
    "llama8b-128k-gpu_ctx": Config(32, 8, 128, 131072, "cuda"),
}
KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKENDS = ("sdpa", "torch", "cpu", "triton", "cuda", "hf_quanto")
PASSES = ("decode",)
_sdpa_seconds = {}  # config -> mean seconds of the sdpa baseline (it runs first, see conftest ordering)


def rounds(device):
    return (2, 15) if device.type == "cpu" else (1, 5)  # on GPUs a round is conftest.GPU_CALLS_PER_ROUND calls


@dataclasses.dataclass
class Inputs:
    query: torch.Tensor           # (1, Hq, 1, D)
    keys: torch.Tensor            # (1, Hkv, T, D) the uncompressed cache
    values: torch.Tensor
    packed: dict                  # bits -> PackedKV of the oldest T - RESIDUAL tokens
    residual_keys: torch.Tensor   # (1, Hkv, RESIDUAL, D)
    residual_values: torch.Tensor


_cached = {}


def inputs_for(config, device):
    """One config's tensors, built once; only one config is held at a time (128k bf16 is 0.5 GB)."""
    if config not in _cached:
        _cached.clear()
        c = CONFIGS[config]
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        gen = torch.Generator(device=device).manual_seed(0)
        keys, values = (torch.randn(1, c.kv_heads, c.context, c.head_dim, generator=gen, device=device, dtype=dtype)
                        for _ in range(2))
        query = torch.randn(1, c.q_heads, 1, c.head_dim, generator=gen, device=device, dtype=dtype)
        split = c.context - RESIDUAL
        packed = {bits: quantize_kv(keys[:, :, :split], values[:, :, :split], bits, GROUP) for bits in (4, 2)}
        _cached[config] = Inputs(query, keys, values, packed, keys[:, :, split:].contiguous(),
                                 values[:, :, split:].contiguous())
    return _cached[config]


# ---- bytes moved --------------------------------------------------------------------------------

def sdpa_bytes(c, elt):
    return 2 * c.kv_heads * c.context * c.head_dim * elt + 2 * c.q_heads * c.head_dim * elt


def packed_bytes(c, packed: PackedKV, elt):
    """Codes, scales and zero points of the packed tokens, the residual window, query and output."""
    return (packed.nbytes() + 2 * c.kv_heads * RESIDUAL * c.head_dim * elt
            + 2 * c.q_heads * c.head_dim * elt)


# ---- the op per backend -------------------------------------------------------------------------

def hf_quanto_step(c, x, bits):
    try:
        from transformers.cache_utils import QuantoQuantizedLayer
        layer = QuantoQuantizedLayer(nbits=bits, q_group_size=GROUP, residual_length=RESIDUAL)
    except ImportError as exc:
        pytest.skip(f"transformers' quanto QuantizedCache backend unavailable: {exc}")
    layer.update(x.keys, x.values)  # prefill: quantizes the whole cache
    new_key, new_value = x.keys[:, :, -1:].clone(), x.values[:, :, -1:].clone()

    def step():
        keys, values = layer.update(new_key, new_value)
        return F.scaled_dot_product_attention(x.query, keys, values, enable_gqa=True)
    return step


def decode_fn(backend, c, x, bits):
    if backend == "sdpa":
        return lambda: F.scaled_dot_product_attention(x.query, x.keys, x.values, enable_gqa=True)
    if backend == "hf_quanto":
        return hf_quanto_step(c, x, bits)
    packed = x.packed[bits]
    return lambda: decode_attention(x.query, packed, x.residual_keys, x.residual_values, check_values=False)


def skip_unless_runnable(backend, config, device, bits):
    c = CONFIGS[config]
    if c.device != device.type:
        pytest.skip(f"{config} runs on {c.device}")
    if backend == "sdpa" and bits != 4:
        pytest.skip("the sdpa baseline does not depend on bits: measured once, under kv_decode_int4")
    if backend in KERNEL_BACKENDS and not backends.is_available(backend, device.type, "kvcache"):
        pytest.skip(f"{backend} unavailable on {device.type}: {backends.describe(backend, 'kvcache')}")
    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton on CPU is the interpreter, not worth timing")


def run_benchmark(benchmark, request, backend, config, bits):
    device, peak_gbps = request.getfixturevalue("device"), request.getfixturevalue("peak_gbps")
    skip_unless_runnable(backend, config, device, bits)
    c = CONFIGS[config]
    try:
        x = inputs_for(config, device)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of GPU memory")
    elt = x.query.element_size()
    fn = decode_fn(backend, c, x, bits)
    scope = backends.use_backend(backend) if backend in KERNEL_BACKENDS else backends.use_backend(None)
    with scope:
        benchmark.group = f"kv_decode_int{bits} {config}"
        warmup, timed = rounds(device)
        timing = request.getfixturevalue("timed")(fn, timed, warmup)
        memory = request.getfixturevalue("memory_of")(fn)
    seconds = benchmark.stats.stats.mean
    nbytes = sdpa_bytes(c, elt) if backend == "sdpa" else packed_bytes(c, x.packed[bits], elt)
    if backend == "sdpa":
        _sdpa_seconds[config] = seconds
    baseline = _sdpa_seconds.get(config)
    benchmark.extra_info.update(
        op=f"kv_decode_int{bits}", device=str(device), dtype=str(x.query.dtype).removeprefix("torch."),
        context=c.context, q_heads=c.q_heads, kv_heads=c.kv_heads, head_dim=c.head_dim, bits=bits,
        group_size=GROUP, residual=RESIDUAL, bytes_moved=nbytes, gbps=round(nbytes / seconds / 1e9, 2),
        pct_peak=round(100 * nbytes / seconds / 1e9 / peak_gbps, 1), peak_gbps=peak_gbps,
        kv_bytes=sdpa_bytes(c, elt) if backend == "sdpa" else x.packed[bits].nbytes(),
        speedup_vs_sdpa=round(baseline / seconds, 2) if baseline else None, **timing, **memory)
    if backend in KERNEL_BACKENDS:
        benchmark.extra_info["checks_us"] = checks_us(x, bits)
        with backends.use_backend(backend):
            benchmark.extra_info["python_us"] = python_us(x, bits)
    if backend == "triton":
        benchmark.extra_info["triton_launch_ms"] = triton_launch_timings()


def median_us(fn, calls=2000):
    """Microseconds per call of fn, the median of 5 loops of `calls` calls."""
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - start) / calls * 1e6)
    return round(sorted(loops)[2], 2)


def checks_us(x, bits):
    """Host time of decode_attention's input checks per call, the part of a call's host overhead that
    does not depend on the backend."""
    args = (x.query, *x.packed[bits].tensors(), x.residual_keys, x.residual_values, bits, GROUP, False)
    return median_us(functools.partial(checks.check_decode_attention, *args))


class _NoKernel:
    """A backend module whose decode_attention returns at once: python_us times everything else."""
    @staticmethod
    def decode_attention(query, *args):
        return query


def python_us(x, bits):
    """Host time per decode_attention call of everything before the backend's kernel wrapper (checks,
    backend lookup, argument preparation), with that wrapper replaced by a no-op."""
    def lookup_then_skip(device):
        functional.backends.op_module("kvcache", device)
        return _NoKernel

    real, functional.backend_module = functional.backend_module, lookup_then_skip
    try:
        return median_us(decode_fn("cuda", None, x, bits))  # any kernel backend: the same call up to the kernel
    finally:
        functional.backend_module = real


def triton_launch_timings():
    """Every decode shape bucket timed so far: {bucket: {(tiles, warps, stages): ms}}, as strings."""
    from engram_kernels.ops.kvcache import triton_kernels
    return {str(bucket): {str(launch): round(ms, 4) for launch, ms in timings.items()}
            for bucket, timings in triton_kernels.DECODE_TIMINGS.items()}


def parametrize(test):
    for name, values in (("backend", BACKENDS), ("config", list(CONFIGS)), ("pass_", PASSES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@parametrize
def test_kv_decode_int4(benchmark, request, backend, config, pass_):
    run_benchmark(benchmark, request, backend, config, 4)


@parametrize
def test_kv_decode_int2(benchmark, request, backend, config, pass_):
    run_benchmark(benchmark, request, backend, config, 2)

