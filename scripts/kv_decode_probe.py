"""Times every Triton decode-attention launch candidate against bf16 SDPA on this GPU, with each
compiled kernel's registers and spills; shows where the time of one decode call goes. Each context
runs twice: codes to 16-bit operands by inline PTX (the default) and by Triton bit operations
(ENGRAM_KV_PTX=0), each checked against the reference first; then the `cuda` backend (tensor cores).
SDPA and `cuda` also get their GPU time with L2 flushed before each call and their host time per call.

    python scripts/kv_decode_probe.py [--cuda-only] [--sweep] [--ablation] [CONTEXT ...]
                                        (default 32768 131072; Llama-8B heads, int4)

--cuda-only skips the Triton candidates (their tuning takes most of the probe's time); --sweep then
times the `cuda` backend and SDPA at contexts from 1k to 128k (the time that does not grow with the
context, by a straight line), and the `cuda` backend at 128k with one setting changed at a time
(including its L2 prefetches off and the merge by each head's last block, ENGRAM_KV_MERGE=fused, also
at 32k; and at 32k the merge kernel launched after the decode grid instead of as its programmatic
dependent, ENGRAM_KV_PDL=0). --ablation times the timing-only builds of the tensor-core kernel with
parts of its work left out (engram_kernels._C_kvcache_ablation, which
scripts/prebuild_gpu_extensions.sh builds) at 32k and 128k: where its time goes.
"""
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

from engram_kernels import backends
from engram_kernels.ops.kvcache import decode_attention, quantize_kv, triton_kernels


def elapsed_ms(fn, reps=20):
    return triton_kernels._elapsed_ms(fn, reps)


def queue_behind_sleep(fn):
    """Runs fn once (compiles, allocates), then holds the stream with a ~60 ms sleep kernel, so that the
    calls issued next queue up: none waits for the GPU, and the GPU runs them with no host gaps."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)


def gpu_ms(fn, reps=20):
    """GPU time alone: the calls queue up behind a sleep kernel, so launch overhead is hidden."""
    queue_behind_sleep(fn)
    return elapsed_ms(fn, reps)


def host_us(fn, reps=20):
    """Host time per call in µs (the calls queue up behind a sleep kernel). Where it exceeds the GPU
    time, back-to-back calls (the benchmark's rounds) run at the host's pace."""
    queue_behind_sleep(fn)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    return host * 1e6


def cold_gpu_ms(fn, reps=10):
    """GPU time of one call after a 256 MB write has flushed L2 (median of reps): in a model, the other
    layers' caches pass through L2 between two calls of one layer, while back-to-back calls over a
    cache that fits in L2 (32k tokens packed: 37.6 MB; an H100's L2: 50 MB) may find it there."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    queue_behind_sleep(fn)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def make_case(context, batch=1, q_heads=32, kv_heads=8, head_dim=128, bits=4, group=64, residual=128,
              device="cuda", dtype=torch.bfloat16):
    """(query, keys, values, packed cache, residual keys, residual values) of random states."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    keys, values = (torch.randn(batch, kv_heads, context, head_dim, generator=gen, device=device, dtype=dtype)
                    for _ in range(2))
    query = torch.randn(batch, q_heads, 1, head_dim, generator=gen, device=device, dtype=dtype)
    split = context - residual
    packed = quantize_kv(keys[:, :, :split], values[:, :, :split], bits, group)
    return query, keys, values, packed, keys[:, :, split:].contiguous(), values[:, :, split:].contiguous()


def probe(context, triton=True):
    query, keys, values, packed, rk, rv = make_case(context)

    def sdpa():
        return F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

    def decode():
        return decode_attention(query, packed, rk, rv, check_values=False)

    print(f"context {context}: packed {packed.nbytes() / 1e6:.1f} MB")
    print(f"  sdpa bf16 call {elapsed_ms(sdpa):.4f} ms, GPU time alone {gpu_ms(sdpa):.4f} ms "
          f"(L2 flushed before each call {cold_gpu_ms(sdpa):.4f} ms), host {host_us(sdpa):.1f} us per call")
    with backends.use_backend("torch"):
        expected = decode().float()
    for ptx in (True, False) if triton else ():
        triton_kernels.USE_PTX = ptx
        with backends.use_backend("triton"):
            error = (decode().float() - expected).abs().max().item()
            call, gpu = elapsed_ms(decode), gpu_ms(decode)
        print(f"  codes by {'inline PTX' if ptx else 'Triton bit ops'}: max |triton - reference| {error:.2e}")
        for bucket, timings in triton_kernels.DECODE_TIMINGS.items():
            print(f"  bucket {bucket}")
            for launch, ms in sorted(timings.items(), key=lambda kv: kv[1]):
                print(f"    tiles/split, warps, stages {launch}: {ms:.4f} ms")
        print(f"  triton decode_attention call {call:.4f} ms, GPU time alone {gpu:.4f} ms")
        print_compiled_kernels()
        triton_kernels.DECODE_TIMINGS.clear()
    triton_kernels.USE_PTX = True
    if backends.is_available("cuda", "cuda", "kvcache"):  # the tensor-core kernel (kvcache_decode_mma.cuh)
        with backends.use_backend("cuda"):
            error = (decode().float() - expected).abs().max().item()
            call, gpu, cold, host = elapsed_ms(decode), gpu_ms(decode), cold_gpu_ms(decode), host_us(decode)
        print(f"  cuda decode_attention: max |cuda - reference| {error:.2e}, call {call:.4f} ms, "
              f"GPU time alone {gpu:.4f} ms (L2 flushed before each call {cold:.4f} ms), host {host:.1f} us per call")


def sweep():
    """GPU time of the `cuda` backend at 128k tokens per KV head-batch, one setting changed at a time:
    which of them the kernel's time follows (bytes, key groups, grid shape, query rows)."""
    cases = {"int4 group 64 (base)": {}, "int2": {"bits": 2}, "group 128": {"group": 128},
             "group 256": {"group": 256}, "batch 4 x 32k": {"batch": 4, "context": 32768},
             "1 query row per KV head": {"q_heads": 8}, "8 query rows per KV head": {"q_heads": 64},
             "no residual window": {"residual": 0}, "no L2 prefetch": {}, "fused merge": {},
             "32k": {"context": 32768}, "32k, fused merge": {"context": 32768},
             "32k, merge kernel launched after the decode grid": {"context": 32768}}
    switches = {"no L2 prefetch": {"ENGRAM_KV_L2_PREFETCH": "0"}, "fused merge": {"ENGRAM_KV_MERGE": "fused"},
                "32k, fused merge": {"ENGRAM_KV_MERGE": "fused"},
                "32k, merge kernel launched after the decode grid": {"ENGRAM_KV_PDL": "0"}}
    defaults = {"ENGRAM_KV_L2_PREFETCH": "1", "ENGRAM_KV_MERGE": "kernel", "ENGRAM_KV_PDL": "1"}
    for name, change in cases.items():
        with environment(**{**defaults, **switches.get(name, {})}):
            ms, megabytes = cuda_gpu_ms(**{"context": 131072, **change})
        print(f"  sweep {name}: GPU time alone {ms:.4f} ms ({megabytes:.1f} MB packed)")
        torch.cuda.empty_cache()


def scaling(contexts=(1024, 4096, 16384, 32768, 65536, 131072)):
    """GPU time of the `cuda` backend and of SDPA against context, and the straight line through the
    shortest and longest: the part that does not grow with the context (launches, a block's first
    loads, the merge) against the cost per 1k tokens; at 32k the first decides much of the ratio."""
    times = {}
    for context in contexts:
        query, keys, values, _, _, _ = make_case(context)
        sdpa = gpu_ms(lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True))
        del query, keys, values
        times[context] = (cuda_gpu_ms(context=context)[0], sdpa)
        print(f"  scaling {context // 1024}k: cuda {times[context][0]:.4f} ms, sdpa {sdpa:.4f} ms "
              f"({sdpa / times[context][0]:.2f}x)")
        torch.cuda.empty_cache()
    short, long = contexts[0], contexts[-1]
    for i, name in enumerate(("cuda", "sdpa")):
        per_k = (times[long][i] - times[short][i]) / ((long - short) / 1024)
        print(f"  scaling {name}: {times[short][i] - per_k * short / 1024:.4f} ms + {per_k * 1e3:.3f} us per 1k tokens")


def ablation(contexts=(32768, 131072)):
    """GPU time of each timing-only build of the tensor-core kernel (wrong results by design) against
    the build that does all the work: what leaving each part out saves."""
    try:
        from engram_kernels import _C_kvcache_ablation as builds
    except ImportError as exc:
        print(f"  ablation: no timing-only kernels here ({exc}); scripts/prebuild_gpu_extensions.sh builds them")
        return
    for context in contexts:
        query, _, _, packed, rk, rv = make_case(context)
        full = None
        for name, bits in builds.ABLATIONS.items():
            ms = gpu_ms(lambda: builds.ablated_decode(bits, query, *packed.tensors(), rk, rv, packed.group_size))
            full = full or ms
            print(f"  ablation at {context // 1024}k, {name}: GPU time alone {ms:.4f} ms ({ms - full:+.4f} ms)")


@contextlib.contextmanager
def environment(**values):
    """Environment variables set for the block (the kernels' timing switches read them per call)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def cuda_gpu_ms(**settings):
    """(GPU time of one `cuda` decode call, packed MB) for make_case(**settings)."""
    query, _, _, packed, rk, rv = make_case(**settings)
    with backends.use_backend("cuda"):
        return gpu_ms(lambda: decode_attention(query, packed, rk, rv, check_values=False)), packed.nbytes() / 1e6


def print_compiled_kernels():
    """Registers and spills of each compiled decode kernel (Triton internals: best effort)."""
    try:
        for caches in triton_kernels._decode_kernel.device_caches.values():
            for kernel in caches[0].values():
                kernel._init_handles()
                meta = kernel.metadata
                print(f"  compiled decode kernel, {meta.num_warps} warps, {meta.num_stages} stages: "
                      f"{kernel.n_regs} registers, {kernel.n_spills} spills, {meta.shared} B shared")
    except (AttributeError, IndexError, TypeError) as exc:
        print(f"  (compiled kernel details unavailable: {exc!r})")


if __name__ == "__main__":
    args = sys.argv[1:]
    for context in [int(c) for c in args if not c.startswith("--")] or [32768, 131072]:
        probe(context, triton="--cuda-only" not in args)
    if "--sweep" in args:
        scaling()
        sweep()
    if "--ablation" in args:
        ablation()
