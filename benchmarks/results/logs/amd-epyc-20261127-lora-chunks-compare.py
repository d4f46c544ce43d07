import time, torch, importlib.util
from engram_kernels import _C_lora_cpu as new
spec = importlib.util.spec_from_file_location("_C_lora_cpu", "/tmp/lora128/_C_lora_cpu.cpython-311-x86_64-linux-gnu.so")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
torch.manual_seed(0)
N, IN, OUT, R = 4096, 576, 1536, 16
x = torch.randn(N, IN); w = torch.randn(OUT, IN) * 0.02; a = torch.randn(R, IN) * 0.02; b = torch.randn(OUT, R) * 0.02
dy = torch.randn(N, OUT)
def t(fn, reps=10):
    fn(); s = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - s) / reps * 1e3
fns = {"base fwd": lambda: x @ w.t()}
for name, m in (("old", old), ("new", new)):
    fns[f"{name} fwd"] = (lambda m: lambda: m.lora_forward(x, w, None, a, b, 2.0, 0.0, 0))(m)
res = {k: [] for k in fns}
for _ in range(8):
    for k, fn in fns.items(): res[k].append(t(fn))
mins = {k: round(min(v), 2) for k, v in res.items()}
print(mins, "old/base", round(mins["old fwd"] / mins["base fwd"], 3), "new/base", round(mins["new fwd"] / mins["base fwd"], 3))
y, u = new.lora_forward(x, w, None, a, b, 2.0, 0.0, 0)
fns = {"base bwd": lambda: dy @ w}
for name, m in (("old", old), ("new", new)):
    fns[f"{name} bwd"] = (lambda m: lambda: m.lora_backward(dy, x, w, a, b, u, 2.0, 0.0, 0))(m)
res = {k: [] for k in fns}
for _ in range(8):
    for k, fn in fns.items(): res[k].append(t(fn))
mins = {k: round(min(v), 2) for k, v in res.items()}
print(mins, "old/base", round(mins["old bwd"] / mins["base bwd"], 3), "new/base", round(mins["new bwd"] / mins["base bwd"], 3))
o, n_ = old.lora_backward(dy, x, w, a, b, u, 2.0, 0.3, 7), new.lora_backward(dy, x, w, a, b, u, 2.0, 0.3, 7)
print("max diff old/new (dropout 0.3)", [ (p - q).abs().max().item() for p, q in zip(o, n_)])
