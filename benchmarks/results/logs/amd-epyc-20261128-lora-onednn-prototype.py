"""What a LoRA layer whose frozen GEMMs go through oneDNN (weight packed once) would cost on this
machine, against `base` as the suite times it (torch's fp32 linear: MKL). A prototype in torch ops, not the
package's backend: `smollm2` shapes (4096 x 576 -> 1536, r 16, fp32, 2 threads), forward + backward
(dx, dA, dB; no dW), one adapter and 64 adapters of 64 rows each (the suite's multi64 assigns them
unevenly). Best of 5 loops of 5 calls.

    python benchmarks/results/logs/amd-epyc-20261128-lora-onednn-prototype.py
"""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
n, d_in, d_out, r, scale, adapters = 4096, 576, 1536, 16, 2.0, 64
x, dy = torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen)
w = torch.randn(d_out, d_in, generator=gen) * 0.02
a, b = torch.randn(adapters, r, d_in, generator=gen) * 0.02, torch.randn(adapters, d_out, r, generator=gen) * 0.02
packed_w = torch.ops.mkldnn._reorder_linear_weight(w, n)
packed_wt = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), n)


def onednn(inp, packed):
    return torch.ops.mkldnn._linear_pointwise(inp, packed, None, "none", [], "")


def base_mkl():
    xg = x.clone().requires_grad_()
    torch.autograd.grad(F.linear(xg, w), (xg,), dy)


def lora_onednn(segments):
    """y = x W^T + s (x A^T) B^T per segment of rows, then dx, dA, dB, by hand (no autograd)."""
    rows = n // segments
    y, dx = onednn(x, packed_w), onednn(dy, packed_wt)
    for i in range(segments):
        xs, dys = x[i * rows:(i + 1) * rows], dy[i * rows:(i + 1) * rows]
        u = xs @ a[i].t()
        y[i * rows:(i + 1) * rows].addmm_(u, b[i].t(), alpha=scale)
        g = (dys @ b[i]).mul_(scale)
        dx[i * rows:(i + 1) * rows].addmm_(g, a[i])
        _, _ = g.t() @ xs, (dys.t() @ u).mul_(scale)  # dA, dB
    return y, dx


def best_ms(fn, calls=5):
    for _ in range(2):
        fn()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - start) / calls * 1e3)
    return min(loops)


y, dx = lora_onednn(1)
u = x @ a[0].t()
assert torch.allclose(y, x @ w.t() + scale * u @ b[0].t(), atol=1e-3)
assert torch.allclose(dx, dy @ w + scale * (dy @ b[0]) @ a[0], atol=1e-3)
base = best_ms(base_mkl)
print(f"base (MKL, as the suite times it)     {base:7.2f} ms")
for segments in (1, adapters):
    ms = best_ms(lambda: lora_onednn(segments))
    print(f"LoRA, oneDNN frozen GEMMs, {segments:2d} adapter(s) {ms:7.2f} ms  {ms / base:.2f}x of base")
