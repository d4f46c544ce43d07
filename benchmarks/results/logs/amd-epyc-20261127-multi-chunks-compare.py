"""Interleaved, min of 10 rounds (each the fastest of 3 calls): the committed CPU multi-adapter LoRA kernels
(a copy of engram_kernels/_C_lora_cpu*.so built at a96ca30, in /tmp/multi_old/) against the build with
amd-epyc-20261127-multi-chunks-trial.patch applied (`git apply` it, then
`ENGRAM_FAMILIES=lora python setup.py -q build_ext --inplace`), both against the frozen GEMM alone.
    python amd-epyc-20261127-multi-chunks-compare.py [SEQ]     (rows per sequence of one adapter; default 32)
"""
import time, torch, importlib.util, sys
from engram_kernels import _C_lora_cpu as new
from engram_kernels.ops.lora import naive
spec = importlib.util.spec_from_file_location("_C_lora_cpu", "/tmp/multi_old/_C_lora_cpu.cpython-311-x86_64-linux-gnu.so")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
torch.manual_seed(0)
N, IN, OUT, R, A, SEQ = 4096, 576, 1536, 16, 64, int(sys.argv[1]) if len(sys.argv) > 1 else 32
x = torch.randn(N, IN); w = torch.randn(OUT, IN) * 0.02
a = torch.randn(A, R, IN) * 0.02; b = torch.randn(A, OUT, R) * 0.02; s = torch.rand(A) + 0.5
gen = torch.Generator().manual_seed(1)
weights = torch.rand(A, generator=gen) ** 3
ids = torch.multinomial(weights, N // SEQ, replacement=True, generator=gen).repeat_interleave(SEQ)
ids[:SEQ] = -1
perm, offsets = naive.segments(ids, A)
dy = torch.randn(N, OUT)
def t(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        st = time.perf_counter(); fn(); best = min(best, time.perf_counter() - st)
    return best * 1e3
def compare(fns, base):
    res = {k: [] for k in fns}
    for _ in range(10):
        for k, fn in fns.items(): res[k].append(t(fn))
    mins = {k: round(min(v), 2) for k, v in res.items()}
    print(mins, {k: round(v / mins[base], 3) for k, v in mins.items() if k != base})
compare({"base fwd": lambda: x @ w.t(),
         "old fwd": lambda: old.multi_forward(x, w, None, a, b, s, perm, offsets),
         "new fwd": lambda: new.multi_forward(x, w, None, a, b, s, perm, offsets)}, "base fwd")
yo, uo = old.multi_forward(x, w, None, a, b, s, perm, offsets)
yn, un = new.multi_forward(x, w, None, a, b, s, perm, offsets)
compare({"base bwd": lambda: dy @ w,
         "old bwd": lambda: old.multi_backward(dy, x, w, a, b, s, perm, offsets, uo),
         "new bwd": lambda: new.multi_backward(dy, x, w, a, b, s, perm, offsets, un)}, "base bwd")
o, n_ = old.multi_backward(dy, x, w, a, b, s, perm, offsets, uo), new.multi_backward(dy, x, w, a, b, s, perm, offsets, un)
print("max diff old/new: y", (yo - yn).abs().max().item(), "u", (uo - un).abs().max().item(),
      "grads", [(p - q).abs().max().item() for p, q in zip(o, n_)])
