"""The LoRA forward at `smollm2` (4096 x 576 -> 1536, r 16, fp32) on the CPU: the frozen GEMM alone
(`base`), the `cpu` backend's forward, and the joined-weight form ([x | s·x Aᵀ] [W | B]ᵀ, the GPU
backends' path with `join_weights`, here composed from torch ops). Three rounds, each backend's fastest
of 15 calls, 2 threads:
    python benchmarks/results/logs/amd-epyc-20261128-joined-forward-compare.py
"""
import time

import torch

from engram_kernels.ops.lora import composite, cpu_ext

torch.set_num_threads(2)
torch.manual_seed(0)
N, K, OUT, R = 4096, 576, 1536, 16
x, w = torch.randn(N, K), torch.randn(OUT, K) / 24
a, b = torch.randn(R, K) / 24, torch.randn(OUT, R) * 0.01
w_view, b_view = composite.joined_copies(w, b)
wide = composite.joined_weight(w_view, b_view)


def joined():
    xu = composite.padded_rows(N, K + R, x)
    composite.torch_x_and_u(x, a, 2.0, xu)
    return xu @ wide.t()


runs = {"base": lambda: x @ w.t(), "cpu": lambda: cpu_ext.lora_forward(x, w, None, a, b, 2.0, 0.0, 0)[0],
        "joined": joined}
torch.testing.assert_close(runs["joined"](), runs["cpu"](), rtol=1e-4, atol=1e-4)
for round_ in range(3):
    for name, fn in runs.items():
        times = []
        for _ in range(15):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"round {round_} {name:6s} {min(times) * 1e3:.2f} ms")
