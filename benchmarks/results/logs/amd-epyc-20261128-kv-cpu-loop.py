"""CPU KV decode against fp32 SDPA, best of 5 loops of 200 calls (a tight loop: warm caches, spinning
OpenMP threads). Prints, per thread count: (ours ms, SDPA ms, ratio) for SmolLM2 heads at 8k, Llama-8B
heads at 8k and SmolLM2 heads at 2k.

    python benchmarks/results/logs/amd-epyc-20261128-kv-cpu-loop.py [THREADS ...]   (default: 1 2)
"""
import time, torch, sys
import torch.nn.functional as F
from engram_kernels.ops.kvcache import quantize_kv, decode_attention
from engram_kernels import backends
def bench(hq, hkv, d, T, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, T, d, generator=g); v = torch.randn(1, hkv, T, d, generator=g)
    q = torch.randn(1, hq, 1, d, generator=g)
    p = quantize_kv(k[:, :, :T-128], v[:, :, :T-128], 4, 64)
    rk, rv = k[:, :, T-128:].contiguous(), v[:, :, T-128:].contiguous()
    def t(fn, n=200):
        for _ in range(10): fn()
        best = []
        for _ in range(5):
            s = time.perf_counter()
            for _ in range(n): fn()
            best.append((time.perf_counter() - s) / n * 1e3)
        return min(best)
    with backends.use_backend("cpu"):
        ours = t(lambda: decode_attention(q, p, rk, rv, check_values=False))
    sdpa = t(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return round(ours, 4), round(sdpa, 4), round(sdpa / ours, 2)
for th in [int(a) for a in sys.argv[1:]] or (1, 2):
    print(th, "smollm2-8k", bench(9, 3, 64, 8192, th), "llama8b-8k", bench(32, 8, 128, 8192, th), "smollm2-2k", bench(9, 3, 64, 2048, th))
