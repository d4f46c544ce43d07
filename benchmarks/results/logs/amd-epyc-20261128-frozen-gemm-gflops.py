"""The frozen GEMMs of the LoRA `smollm2` config alone, as torch (MKL) runs them on this machine:
x W^T (4096x576 @ 576x1536) and dy W (the dx of the backward), fp32, fastest of 15 calls, three rounds.
Why it was run: `multi64` 5x faster than peft's mixed batch on the AMD VM needs our time below `base`,
which is these two GEMMs; their rate says how close `base` already is to what this CPU does.

    python benchmarks/results/logs/amd-epyc-20261128-frozen-gemm-gflops.py   (output: the .log beside it)
"""
import time

import torch

torch.manual_seed(0)
x, w, dy = torch.randn(4096, 576), torch.randn(1536, 576), torch.randn(4096, 1536)
flops = 2 * 4096 * 576 * 1536


def fastest(f, calls=15):
    f()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}")
for _ in range(3):
    a, b = fastest(lambda: x @ w.t()), fastest(lambda: dy @ w)
    print(f"x W^T {a * 1e3:.1f} ms ({flops / a / 1e9:.0f} GFLOP/s), dy W {b * 1e3:.1f} ms ({flops / b / 1e9:.0f} GFLOP/s)")
