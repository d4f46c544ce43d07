"""Memory layers in tiny randomly initialized Hugging Face models built from configs (no downloads)."""
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engram_kernels.integrations import (add_memory_layers, calibrate_memory_queries, load_memory, memory_disabled,
                                         memory_layers, memory_parameters, save_memory)
from engram_kernels.optim import FusedSparseAdam

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
MEMORY = dict(heads=2, k=4, n_keys=16, key_dim=32)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=16))


def gemma3():
    config = transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8)
    return transformers.Gemma3ForCausalLM(config)


FAMILIES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3}


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_adding_memory_keeps_logits_identical(family):
    model = build(family)
    with torch.no_grad():
        before = model(TOKENS).logits
        add_memory_layers(model, layers=[0, -1], **MEMORY)
        after = model(TOKENS).logits
    assert sorted(memory_layers(model)) == [0, 2]
    assert torch.equal(before, after)


def _train(model, allow, steps=4):
    """A few steps on the memory only; returns nothing, changes model in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    values = [m.values for m in memory_layers(model).values()]
    others = [p for p in memory_parameters(model) if all(p is not v for v in values)]
    for p in memory_parameters(model):
        p.requires_grad_(True)
    sparse_opt = FusedSparseAdam(values, lr=1e-2)
    for v in values:
        sparse_opt.set_allow_mask(v, allow)
    dense_opt = torch.optim.AdamW(others, lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_changes_only_allowed_memory_rows_and_no_base_weight(family):
    model = build(family)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_memory_layers(model, layers=[1], **MEMORY)
    memory = memory_layers(model)[1]
    allow = torch.zeros(memory.n_slots, dtype=torch.bool)
    allow[: memory.n_slots // 2] = True
    _train(model, allow)
    changed = (memory.values != 0).any(1)
    assert changed.any(), "training did not write anything into memory"
    assert not changed[~allow].any(), "rows outside the allow-mask changed"
    for name, p in model.named_parameters():
        if ".memory." not in name:
            original = name.replace(".mlp.mlp.", ".mlp.")
            assert torch.equal(p, base[original]), f"base parameter {name} changed"


def test_memory_saves_and_loads_apart_from_the_base(tmp_path):
    model = build("llama")
    add_memory_layers(model, layers=[0, 2], **MEMORY)
    calibrate_memory_queries(model, [(TOKENS, torch.ones_like(TOKENS))])  # the calibration saves too
    assert all(m.query_center.abs().sum() > 0 for m in memory_layers(model).values())
    _train(model, torch.ones(MEMORY["n_keys"] ** 2, dtype=torch.bool), steps=2)
    with torch.no_grad():
        expected = model(TOKENS).logits
    save_memory(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors", "memory_config.json"]
    fresh = build("llama")  # same seed: same base weights, no memory
    load_memory(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, expected)


def test_memory_saved_without_a_query_center_loads_uncentered(tmp_path):
    model = build("llama")
    add_memory_layers(model, layers=[1], **MEMORY)
    save_memory(model, tmp_path)
    path = tmp_path / "memory.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("query_center")}
    save_file(tensors, path)
    fresh = build("llama")
    load_memory(fresh, tmp_path)
    assert memory_layers(fresh)[1].query_center.abs().sum() == 0


def test_bad_layer_choices_are_rejected():
    model = build("llama")
    with pytest.raises(IndexError, match=r"layer indices \[5\] out of range"):
        add_memory_layers(model, layers=[5], **MEMORY)
    add_memory_layers(model, layers=[0], **MEMORY)
    with pytest.raises(ValueError, match="already has a memory layer"):
        add_memory_layers(model, layers=[0], **MEMORY)
    with pytest.raises(ValueError, match="found no decoder layers"):
        add_memory_layers(torch.nn.Linear(3, 3))


def test_memory_goes_into_the_language_model_of_a_vision_language_model():
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=dict(**TINY, head_dim=16), vision_config=vision,
                                       mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    add_memory_layers(model, layers=[1], value_init="normal", **MEMORY)
    assert model.model.language_model.layers[1].mlp.memory is memory_layers(model)[1]
    with torch.no_grad(), memory_disabled(model):
        base = model(input_ids=TOKENS).logits
    with torch.no_grad():
        assert not torch.equal(model(input_ids=TOKENS).logits, base)  # text forwards read the memory


def test_a_memory_of_another_width_is_refused(tmp_path):
    wide = build("llama")
    add_memory_layers(wide, layers=[0, 2], **MEMORY)
    save_memory(wide, tmp_path)
    torch.manual_seed(0)
    narrow = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "hidden_size": 32})).eval()
    with pytest.raises(ValueError, match="memory dim 64 does not match LlamaForCausalLM's hidden size 32"):
        load_memory(narrow, tmp_path)
    assert memory_layers(narrow) == {}
    with pytest.raises(ValueError, match=r"takes \(\.\.\., 64\) inputs, got \(2, 32\)"):
        memory_layers(wide)[0](torch.randn(2, 32))


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    model = build("llama")
    add_memory_layers(model, layers=[0, 2], **MEMORY)
    save_memory(model, tmp_path)
    other = build("llama")
    add_memory_layers(other, layers=[2], **{**MEMORY, "k": 2})  # layer 0 loads, then layer 2 disagrees
    with pytest.raises(ValueError, match="layer 2: saved memory config"):
        load_memory(other, tmp_path)
    assert sorted(memory_layers(other)) == [2]
