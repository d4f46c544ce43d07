"""Whole decode steps of a model with each KV cache:
`pytest benchmarks/test_kvcache_generate_bench.py --benchmark-only`.

What `generate` costs per new token once the prompt is in the cache, with the model's weights, the
cache's own bookkeeping (appends, flushes into the packed store) and the attention of every layer
in the time. Backends (the cache):
  dynamic    transformers' DynamicCache (full precision) with SDPA, generate's default: the
             baseline of every `speedup_vs_dynamic` in extra_info. It appends by torch.cat, so each
             step also copies the whole cache;
  static     transformers' StaticCache (full precision, preallocated for the prompt and the
             steps; written in place, attention over all of it under a mask) with SDPA: the
             baseline of `speedup_vs_static`;
  int4, int2 QuantizedKVCache(bits=...) with enable_packed_kv_attention (decode_attention on the
             fastest available kernel backend; ENGRAM_BACKEND forces one);
  hf_quanto  transformers' QuantizedCache (optimum-quanto backend, int4), when installed.
Configs: SmolLM2-135M-Instruct (the default model, fp32) after a 2k- and an 8k-token prompt of this
repository's text on CPU; on GPU a Llama with Llama-3-8B's layer shapes (4 of its 32 layers, random
weights, bf16) after 32k and 128k random tokens: per layer what an 8B model pays. The prompt is
prefilled once per config with a DynamicCache; each cache is built from those keys and values as
its own prefill would (quantized after), outside the timing. A round is STEPS greedy decode steps
from a fresh copy of that cache; `ms_per_token` in extra_info is the mean round over STEPS.

    -k "cpu_ctx"   the CPU configs          -k "gpu_ctx"   the GPU configs
"""
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from engram_kernels.modules import QuantizedKVCache, enable_packed_kv_attention

STEPS = 8
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    context: int
    device: str  # the device type the config runs on


CONFIGS = {
    "smollm2-2k-cpu_ctx": Config("smollm2", 2048, "cpu"),
    "smollm2-8k-cpu_ctx": Config("smollm2", 8192, "cpu"),
    "llama8b4l-32k-gpu_ctx": Config("llama8b-4-layers", 32768, "cuda"),
    "llama8b4l-128k-gpu_ctx": Config("llama8b-4-layers", 131072, "cuda"),
}
BACKENDS = ("dynamic", "static", "int4", "int2", "hf_quanto")
BASELINES = ("dynamic", "static")
PASSES = ("decode",)
_baseline_seconds = {}  # (config, baseline) -> mean seconds (the baselines run first: conftest ordering)


def rounds(device):
    return (1, 5) if device.type == "cpu" else (2, 10)


# ---- model and prompt ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def load(model_name, device):
    """The model in eval mode (one held at a time)."""
    if model_name == "smollm2":
        from engram_kernels.trainer.models import load_model
        try:
            model, tokenizer = load_model(dtype=torch.float32)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            pytest.skip(f"the default model is not installed: {exc}")
        return model.to(device), tokenizer
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=4, vocab_size=32000, max_position_embeddings=262144, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval(), None


def prompt_ids(tokenizer, context, vocab_size, device):
    """`context` tokens: this repository's own text where a tokenizer exists, else random ids."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, context), generator=gen).to(device)
    texts = [path.read_text() for path in (REPO / "README.md", REPO / "benchmarks" / "HISTORY.md")]
    texts += [path.read_text() for path in sorted((REPO / "engram_kernels").rglob("*.py"))]
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[:, :context]
    assert ids.shape[1] == context, f"only {ids.shape[1]} tokens of text for a {context}-token prompt"
    return ids.to(device)


@dataclasses.dataclass
class Prefilled:
    model: torch.nn.Module
    cache: DynamicCache
    next_token: torch.Tensor  # (1, 1): the greedy token after the prompt


_prefilled = {}


def prefilled(config, device):
    """The model and its DynamicCache after the config's prompt, built once (one config held at a time)."""
    if config not in _prefilled:
        _prefilled.clear()
        c = CONFIGS[config]
        model, tokenizer = load(c.model, device)
        ids = prompt_ids(tokenizer, c.context, model.config.vocab_size, device)
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        _prefilled[config] = Prefilled(model, cache, logits[:, -1].argmax(-1, keepdim=True))
    return _prefilled[config]


@pytest.fixture(scope="module", autouse=True)
def release_models():
    """The model and its prefilled cache go when this file's benchmarks are done (GPU memory for the next file)."""
    yield
    _prefilled.clear()
    load.cache_clear()


# ---- the caches ---------------------------------------------------------------------------------

def empty_cache(backend, model, context):
    if backend == "dynamic":
        return DynamicCache(config=model.config)
    if backend == "static":
        return StaticCache(config=model.config, max_cache_len=context + STEPS)
    if backend in ("int4", "int2"):
        return QuantizedKVCache(model.config, bits=int(backend[-1]))
    try:
        from transformers import QuantizedCache
        return QuantizedCache("quanto", model.config, nbits=4, q_group_size=64, residual_length=128)
    except ImportError as exc:
        pytest.skip(f"transformers' quanto QuantizedCache backend unavailable: {exc}")


def cache_from(backend, p: Prefilled):
    """A cache of `backend` holding the prompt: each layer's prefill keys and values handed to its update."""
    cache = empty_cache(backend, p.model, p.cache.get_seq_length())
    with torch.inference_mode():
        for index, layer in enumerate(p.cache.layers):
            cache.update(layer.keys, layer.values, index)
    return cache


def tensor_bytes(t):
    """Bytes of a tensor, or of the tensors inside a tensor subclass (quanto's packed codes and scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.nbytes


def cache_bytes(cache):
    """Every tensor the cache's layers hold (full-precision, packed, scales and zero points)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    return sum(tensor_bytes(t) for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))


def decode_steps(model, cache, token, device):
    with torch.inference_mode():
        for _ in range(STEPS):
            logits = model(token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return token


def test_kv_generate(benchmark, request, backend, config, pass_):
    device = request.getfixturevalue("device")
    c = CONFIGS[config]
    if c.device != device.type:
        pytest.skip(f"{config} runs on {c.device}")
    try:
        p = prefilled(config, device)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of GPU memory")
    if backend in ("int4", "int2"):
        enable_packed_kv_attention(p.model)
    else:
        p.model.set_attn_implementation("sdpa")
    kv_bytes = cache_bytes(cache_from(backend, p))

    def fresh():
        return (p.model, cache_from(backend, p), p.next_token, device), {}

    benchmark.group = f"kv_generate {config}"
    warmup, timed = rounds(device)
    benchmark.pedantic(decode_steps, setup=fresh, rounds=timed, warmup_rounds=warmup)
    seconds = benchmark.stats.stats.mean
    if backend in BASELINES:
        _baseline_seconds[config, backend] = seconds
    speedups = {f"speedup_vs_{name}": round(_baseline_seconds[config, name] / seconds, 2)
                for name in BASELINES if (config, name) in _baseline_seconds}
    benchmark.extra_info.update(
        op="kv_generate", device=str(device), model=c.model, dtype=str(p.model.dtype).removeprefix("torch."),
        context=c.context, steps=STEPS, ms_per_token=round(1e3 * seconds / STEPS, 3),
        tokens_per_s=round(STEPS / seconds, 2), kv_mb=round(kv_bytes / 2**20, 2), **speedups)


def parametrize(test):
    for name, values in (("backend", BACKENDS), ("config", list(CONFIGS)), ("pass_", PASSES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


test_kv_generate = parametrize(test_kv_generate)
