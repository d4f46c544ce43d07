"""The frozen GEMM of the LoRA `smollm2` config (4096 x 576 @ 576 x 1536, fp32, 2 threads) through torch's
F.linear (MKL's sgemm) and through oneDNN with a weight packed once (what torch.compile's CPU freezing
uses), and dx = dy W the same two ways. Best of 5 loops of 20 calls; GFLOP/s.

    python benchmarks/results/logs/amd-epyc-20261128-frozen-gemm-mkl-vs-onednn.py
"""
import time

import torch

torch.set_num_threads(2)
x, w, dy = torch.randn(4096, 576), torch.randn(1536, 576), torch.randn(4096, 1536)
gflop = 2 * 4096 * 576 * 1536 / 1e9


def best_ms(fn, calls=20):
    for _ in range(3):
        fn()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - start) / calls * 1e3)
    return min(loops)


def report(name, fn):
    ms = best_ms(fn)
    print(f"{name:44s} {ms:7.2f} ms {gflop / ms * 1e3:6.0f} GFLOP/s")


packed_w = torch.ops.mkldnn._reorder_linear_weight(w, 4096)
packed_wt = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 4096)
assert torch.allclose(torch.ops.mkldnn._linear_pointwise(x, packed_w, None, "none", [], ""), x @ w.t(), atol=1e-3)
report("forward, F.linear (MKL)", lambda: torch.nn.functional.linear(x, w))
report("forward, oneDNN, packed weight", lambda: torch.ops.mkldnn._linear_pointwise(x, packed_w, None, "none", [], ""))
report("dx = dy W, torch.mm (MKL)", lambda: dy @ w)
report("dx = dy W, oneDNN, packed W^T", lambda: torch.ops.mkldnn._linear_pointwise(dy, packed_wt, None, "none", [], ""))
