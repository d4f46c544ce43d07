"""decode_attention's input checks (signature cached) warm and right after a 64 MB copy has evicted the CPU caches,
with the C++ signature and with the Python one (python benchmarks/results/logs/amd-epyc-20261128-kv-checks-cold.py)."""
import time, torch, statistics
from engram_kernels.ops.kvcache import checks, quantize_kv
torch.manual_seed(0)
p=quantize_kv(torch.randn(1,3,512,64), torch.randn(1,3,512,64), 4, 64)
q=torch.randn(1,9,1,64); rk=torch.randn(1,3,100,64); rv=torch.randn(1,3,100,64)
args=(q,*p.tensors(),rk,rv,4,64,False)
big=torch.randn(64*1024*1024//4); dst=torch.empty_like(big)
real=checks.extension
for mode in ("cpp","python","cpp","python"):
    checks.extension = real if mode=="cpp" else (lambda n: None)
    checks.check_decode_attention(*args)
    warm=[]; cold=[]
    for i in range(40):
        t=time.perf_counter(); checks.check_decode_attention(*args); warm.append(time.perf_counter()-t)
        dst.copy_(big)  # evict caches
        t=time.perf_counter(); checks.check_decode_attention(*args); cold.append(time.perf_counter()-t)
    print(mode, "warm us", round(statistics.median(warm)*1e6,1), "after a 64 MB copy us", round(statistics.median(cold)*1e6,1))
