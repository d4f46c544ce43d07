"""QuantizedKVCache with transformers' generate on tiny random models (nothing is downloaded)."""
import pytest
import torch
from transformers import (DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from engram_kernels import backends
from engram_kernels.modules.kv_cache import (QuantizedKVCache, QuantizedKVLayer, enable_packed_kv_attention,
                                             hadamard_rotation)
from engram_kernels.ops.kvcache import functional

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
PROMPT, NEW = 21, 30


def tiny_model(config_class=LlamaConfig, model_class=LlamaForCausalLM):
    torch.manual_seed(0)
    return enable_packed_kv_attention(model_class(config_class(**TINY)).eval())


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls that reach a backend's packed decode attention."""
    calls = []
    original = functional._decode_attention

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)
    monkeypatch.setattr(functional, "_decode_attention", counting)
    return calls


def generate(model, cache, prompt, attention_mask=None):
    return model.generate(prompt, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("bits, group_size, residual, sinks, options", [
    (4, 8, 4, 0, {}), (2, 8, 0, 0, {}), (4, 16, 16, 0, {}), (2, 8, 4, 3, {}),
    (2, 8, 4, 3, dict(key_clip=0.7, rotate=True)), (4, 8, 0, 0, dict(rotate=True))])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_generate_packed_equals_dequantized_copy(backend, bits, group_size, residual, sinks, options, decode_calls):
    if not backends.is_available(backend, "cpu", "kvcache"):
        pytest.skip(f"{backend} unavailable")
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    outputs = {}
    with backends.use_backend(backend):
        for packed in (True, False):
            cache = QuantizedKVCache(model.config, bits=bits, group_size=group_size, residual_length=residual,
                                     packed_attention=packed, sink_length=sinks, **options)
            outputs[packed] = generate(model, cache, prompt)
            layer = cache.layers[0]
            total = PROMPT + NEW - 1
            assert cache.get_seq_length() == total and layer.n_sinks == sinks
            assert layer.packed.num_tokens == (total - sinks - residual) // group_size * group_size
            assert residual <= layer.residual_tokens() < residual + group_size
    # Every decode step of every layer went through the packed kernel (and only with packing on).
    assert len(decode_calls) == (NEW - 1) * TINY["num_hidden_layers"]
    assert torch.equal(outputs[True], outputs[False])


def test_cache_is_smaller_and_close_to_full_precision():
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(prompt).logits[:, -1]
        sizes = {}
        for bits in (4, 2):
            cache = QuantizedKVCache(model.config, bits=bits, group_size=32, residual_length=0, sink_length=0)
            model(prompt[:, :-1], past_key_values=cache)
            logits = model(prompt[:, -1:], past_key_values=cache).logits[:, -1]
            sizes[bits] = cache.bytes_per_token()
            assert (logits - reference).abs().max() < (0.05 if bits == 4 else 0.3)
    fp32_bytes = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * TINY["head_dim"] * 4
    assert fp32_bytes / sizes[4] > 4 and fp32_bytes / sizes[2] > 6  # head dim 16: scales weigh more


def test_rotation_leaves_attention_unchanged():
    """With nothing quantized yet (a long residual window), a rotated cache gives the logits of an
    ordinary one: the query is rotated like the keys and the output rotated back."""
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model(ids).logits[:, 30:]
        cache = QuantizedKVCache(model.config, bits=2, residual_length=64, rotate=True)
        model(ids[:, :30], past_key_values=cache)
        logits = torch.cat([model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(30, 40)], 1)
    assert cache.layers[0].packed.num_tokens == 0
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_hadamard_rotation_is_orthogonal():
    for dim in (16, 64, 128, 80):
        r = hadamard_rotation(dim, "cpu")
        torch.testing.assert_close(r @ r.T, torch.eye(dim), rtol=0, atol=1e-5)
        if dim & (dim - 1) == 0:  # Hadamard: every entry +-1/sqrt(dim), so every channel is spread evenly
            torch.testing.assert_close(r.abs(), torch.full((dim, dim), dim ** -0.5))


def test_left_padded_batch_matches_dequantized_copy():
    """Padding masks take the dequantize-then-SDPA path: same tokens as the dequantized cache."""
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0
    outputs = [generate(model, QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=4,
                                                packed_attention=packed), prompt, mask) for packed in (True, False)]
    assert torch.equal(*outputs)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_other_families_generate_with_the_packed_cache(family, decode_calls):
    """Qwen2/3 pack every layer; Gemma3 packs its full-attention layers and keeps sliding ones."""
    config_class, model_class, extra = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
                   dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    }[family]
    torch.manual_seed(0)
    model = enable_packed_kv_attention(model_class(config_class(**TINY, **extra)).eval())
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(4))
    caches = [QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=4, packed_attention=packed)
              for packed in (True, False)]
    outputs = [generate(model, cache, prompt) for cache in caches]
    packed_layers = sum(isinstance(layer, QuantizedKVLayer) for layer in caches[0].layers)
    assert torch.equal(*outputs)
    assert packed_layers == (1 if family == "gemma3" else 2)
    assert len(decode_calls) == (NEW - 1) * packed_layers


def test_without_the_attention_function_the_cache_returns_dequantized_states():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()  # sdpa, not engram_packed_kv
    cache = QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=4)
    assert not cache.layers[0].packed_attention
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(5))
    out = generate(model, cache, prompt)
    assert out.shape == (1, PROMPT + NEW)


def test_a_cache_without_config_returns_dequantized_states():
    """QuantizedKVCache() cannot see the model's attention function: it must not hand an SDPA model
    the new tokens alone. With nothing quantized yet, the tokens equal DynamicCache's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(8))
    expected = generate(model, DynamicCache(config=model.config), prompt)
    assert torch.equal(generate(model, QuantizedKVCache(residual_length=1000, sink_length=0), prompt), expected)


def test_packed_attention_without_the_attention_function_raises():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(8))
    with pytest.raises(RuntimeError, match="enable_packed_kv_attention"):
        generate(model, QuantizedKVCache(model.config, packed_attention=True), prompt)


def test_reset_empties_the_cache_for_reuse():
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(9))

    def cache():
        return QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=4, sink_length=3)
    reused = cache()
    generate(model, reused, prompt)
    reused.reset()
    assert reused.get_seq_length() == 0 and reused.layers[0].packed.num_tokens == 0
    assert reused.nbytes() == 0
    assert torch.equal(generate(model, reused, prompt), generate(model, cache(), prompt))


def test_batch_methods_on_a_fresh_cache():
    cache = QuantizedKVCache(LlamaConfig(**TINY))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.get_seq_length() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        QuantizedKVCache(bits=3)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        QuantizedKVLayer(group_size=0)
    with pytest.raises(ValueError, match="sink_length >= 0"):
        QuantizedKVCache(sink_length=-1)
    with pytest.raises(ValueError, match="clip must be a number"):
        QuantizedKVCache(key_clip=0.0)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        QuantizedKVCache(bits=4.0)
    with pytest.raises(ValueError, match="head dim 96 must be a multiple of the value group"):
        QuantizedKVCache(LlamaConfig(**{**TINY, "head_dim": 96}), group_size=64)  # at construction, not in generate


@pytest.mark.parametrize("residual, sinks, packed_calls", [(4, 0, 3), (8, 2, 3), (0, 2, 1)])
def test_chunked_decode_matches_dequantized_copy(residual, sinks, packed_calls, decode_calls):
    """Several new tokens at once against a cache (chunked prefill / scoring): causal packed
    attention, or (sinks with new tokens already flushed) the dequantized path with a causal mask."""
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 60), generator=torch.Generator().manual_seed(6))
    logits = []
    with torch.no_grad():
        for packed in (True, False):
            cache = QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=residual,
                                     packed_attention=packed, sink_length=sinks)
            model(ids[:, :40], past_key_values=cache)
            logits.append(torch.cat([model(ids[:, t:t + 5], past_key_values=cache).logits for t in (40, 45, 50)], 1))
    assert len(decode_calls) == packed_calls * TINY["num_hidden_layers"]
    assert all(shape[2] == 5 for shape in decode_calls)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
