"""decode_attention's Python host time per call, before and after 792ae85 (CPU; no GPU needed).

    python benchmarks/results/logs/amd-epyc-20261128-kv-python-us.py CHECKOUT   (a built checkout)

The same measurement as `python_us` in benchmarks/test_kvcache_bench.py (which 11d7b03 lacks):
everything a call does before the backend's kernel wrapper, with that wrapper replaced by a no-op
(llama8b heads: 32 query / 8 KV heads, D 128, 4k tokens with 128 in the residual window, batch 1),
and the input checks alone. Median of 9 loops of 5,000 calls.
"""
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

from engram_kernels import backends  # noqa: E402
from engram_kernels.ops.kvcache import checks, decode_attention, functional, quantize_kv  # noqa: E402


class NoKernel:
    @staticmethod
    def decode_attention(query, *args):
        return query


def lookup_then_skip(device):
    backends.op_module("kvcache", device)
    return NoKernel


def median_us(fn, loops=9, calls=5000):
    for _ in range(500):
        fn()
    times = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return round(statistics.median(times), 2)


torch.manual_seed(0)
packed = quantize_kv(torch.randn(1, 8, 4096 - 128, 128), torch.randn(1, 8, 4096 - 128, 128), 4, 64)
functional.backend_module = lookup_then_skip
for dtype in (torch.float32, torch.bfloat16):
    q = torch.randn(1, 32, 1, 128, dtype=dtype)
    rk, rv = torch.randn(1, 8, 128, 128, dtype=dtype), torch.randn(1, 8, 128, 128, dtype=dtype)
    args = (q, *packed.tensors(), rk, rv, 4, 64, False)
    print(f"{sys.argv[1]} {dtype}: python_us {median_us(lambda: decode_attention(q, packed, rk, rv, check_values=False))}"
          f", checks_us {median_us(lambda: checks.check_decode_attention(*args))}")
