"""decode_attention's checks and whole call per layer inside SmolLM2 decode steps on the CPU (QuantizedKVCache int4,
600-token prompt, 48 new tokens per rep), alternating reps with the C++ and the Python input signature;
the first two reps warm up. Needs the converted SmolLM2 in ~/.cache/engram_kernels (README)."""
import time, torch, os, statistics
from transformers import AutoModelForCausalLM, AutoTokenizer
from engram_kernels.modules import QuantizedKVCache, enable_packed_kv_attention
from engram_kernels.ops.kvcache import checks, functional

path=os.path.expanduser("~/.cache/engram_kernels/smollm2-135m-instruct")
tok=AutoTokenizer.from_pretrained(path); model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
enable_packed_kv_attention(model)
ids=tok("The history of the city begins " * 100, return_tensors="pt").input_ids[:, :600]
acc={}
def timed(name, fn):
    def w(*a, **k):
        t=time.perf_counter(); r=fn(*a, **k); acc[name]=acc.get(name,0.0)+time.perf_counter()-t; return r
    return w
real_ext=checks.extension
checks.check_decode_attention=timed("checks", checks.check_decode_attention)
orig_decode=functional.decode_attention
import engram_kernels.modules.kv_cache as kvm
kvm.decode_attention=timed("decode_attention", orig_decode)
res={"cpp":[], "python":[]}
with torch.no_grad():
    for rep in range(8):
        mode = "cpp" if rep % 2 == 0 else "python"
        checks.extension = real_ext if mode == "cpp" else (lambda name: None)
        cache=QuantizedKVCache(model.config, bits=4)
        out=model(ids, past_key_values=cache, use_cache=True); nxt=out.logits[:, -1:].argmax(-1)
        acc.clear(); n=48
        for _ in range(n):
            out=model(nxt, past_key_values=cache, use_cache=True); nxt=out.logits[:, -1:].argmax(-1)
        if rep >= 2:
            res[mode].append((acc["checks"]/n/30*1e6, acc["decode_attention"]/n/30*1e6))
for m,v in res.items():
    print(m, "checks us/call", [round(a,1) for a,_ in v], "decode_attention us/call", [round(b,1) for _,b in v])
