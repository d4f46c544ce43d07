"""The LoRA `smollm2` shapes (4096 x 576 -> 1536, r 16, fp32, 2 threads) with the frozen weight's GEMMs
through torch (MKL's sgemm) and through oneDNN with the weight packed once (what torch.compile's CPU
freezing uses). First the two frozen GEMMs alone (y = x W^T and dx = dy W, GFLOP/s), then a prototype
LoRA layer in torch ops (not the package's backend): frozen forward and dx through oneDNN, the adapter
branch and dx, dA, dB terms by torch GEMMs, one adapter and 64 adapters of 64 rows each (the suite's
multi64 assigns them unevenly), against `base` as the suite times it (F.linear and autograd's dx).
Best of 5 loops of 5-20 calls.

    python benchmarks/results/logs/amd-epyc-20261128-lora-onednn.py
"""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
gen = torch.Generator().manual_seed(0)
n, d_in, d_out, r, scale, adapters = 4096, 576, 1536, 16, 2.0, 64
gflop = 2 * n * d_in * d_out / 1e9
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


def best_ms(fn, calls):
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
assert torch.allclose(onednn(x, packed_w), x @ w.t(), atol=1e-3)
assert torch.allclose(y, x @ w.t() + scale * (x @ a[0].t()) @ b[0].t(), atol=1e-3)
assert torch.allclose(dx, dy @ w + scale * (dy @ b[0]) @ a[0], atol=1e-3)
for name, fn in (("forward, F.linear (MKL)", lambda: F.linear(x, w)),
                 ("forward, oneDNN, packed weight", lambda: onednn(x, packed_w)),
                 ("dx = dy W, torch.mm (MKL)", lambda: dy @ w),
                 ("dx = dy W, oneDNN, packed W^T", lambda: onednn(dy, packed_wt))):
    ms = best_ms(fn, 20)
    print(f"{name:44s} {ms:7.2f} ms {gflop / ms * 1e3:6.0f} GFLOP/s")
base = best_ms(base_mkl, 5)
print(f"{'base (MKL, as the suite times it)':44s} {base:7.2f} ms")
for segments in (1, adapters):
    ms = best_ms(lambda: lora_onednn(segments), 5)
    print(f"{f'LoRA, oneDNN frozen GEMMs, {segments} adapter(s)':44s} {ms:7.2f} ms  {ms / base:.2f}x of base")
