"""ATen ops per layer and decode step of SmolLM2 with QuantizedKVCache(bits=4) (defaults: 16 sinks, residual 128),
counted by torch.profiler over 10 steps after a 300-token prompt (CPU; a count, not a timing).

    python benchmarks/results/logs/amd-epyc-20261128-kv-cache-ops-per-step.py CHECKOUT
"""
import sys, os, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer
from engram_kernels.modules import QuantizedKVCache, enable_packed_kv_attention
path=os.path.expanduser("~/.cache/engram_kernels/smollm2-135m-instruct")
tok=AutoTokenizer.from_pretrained(path); model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
enable_packed_kv_attention(model)
ids=tok("The history of the city begins " * 100, return_tensors="pt").input_ids[:, :300]
with torch.no_grad():
    cache=QuantizedKVCache(model.config, bits=4)
    out=model(ids, past_key_values=cache, use_cache=True); nxt=out.logits[:, -1:].argmax(-1)
    model(nxt, past_key_values=cache, use_cache=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            out=model(nxt, past_key_values=cache, use_cache=True)
ev={e.key: e.count for e in prof.key_averages()}
n=10*model.config.num_hidden_layers
print(sys.argv[1], "per layer and step: aten::cat %.1f, aten op events (nested included) %.1f" % (ev.get("aten::cat",0)/n, sum(v for k,v in ev.items() if k.startswith("aten::"))/n))
