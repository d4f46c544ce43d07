"""What DynamicCache's append costs per decode step at SmolLM2's 8k-token cache: 60 torch.cat calls
(keys and values of 30 layers), each copying a (1, 3, 8192, 64) fp32 tensor plus the new token, as
DynamicLayer.update does. Prints ms per step for three rounds of 8 steps (the first pays fresh pages).

    python benchmarks/results/logs/amd-epyc-20261128-dynamic-cache-cat.py
"""
import time

import torch

keys = [torch.randn(1, 3, 8192, 64) for _ in range(60)]
new = torch.randn(1, 3, 1, 64)
for _ in range(3):
    start = time.perf_counter()
    for _ in range(8):
        keys = [torch.cat([k, new], dim=-2) for k in keys]
    print(f"{(time.perf_counter() - start) / 8 * 1e3:.1f} ms per step (60 cats of 6 MB)")
