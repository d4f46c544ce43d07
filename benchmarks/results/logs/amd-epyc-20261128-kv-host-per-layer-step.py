"""Host time per layer and decode step of a tiny random Llama (8 layers, hidden 64: compute is negligible,
so this is transformers' and the cache's Python), DynamicCache with SDPA against QuantizedKVCache int4
with the packed attention, 64 steps after a 1024-token prompt (one flush included), three rounds.

    python benchmarks/results/logs/amd-epyc-20261128-kv-host-per-layer-step.py
"""
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache
from engram_kernels.modules import QuantizedKVCache, enable_packed_kv_attention
torch.set_num_threads(1)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  num_hidden_layers=8, vocab_size=128)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 128, (1, 1024))
def run(backend, steps=64):
    if backend == "dynamic":
        model.set_attn_implementation("sdpa"); cache = DynamicCache(config=cfg)
    else:
        enable_packed_kv_attention(model); cache = QuantizedKVCache(cfg, bits=4)
    with torch.inference_mode():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1e6 / cfg.num_hidden_layers
for r in range(3):
    print({b: round(run(b), 1) for b in ("dynamic", "int4")}, "us per layer-step")
