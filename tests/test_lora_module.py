"""LoRALinear, MultiLoRALinear and the Hugging Face integration against peft (tiny random models
built from configs, no downloads): outputs and gradients, peft-format save / load both ways, merge."""
import copy

import pytest
import torch
import transformers
from torch import nn

from backend_cases import backend_cases
from engram_kernels import backends
from engram_kernels.integrations import (apply_lora, load_lora, lora_disabled, lora_layers, lora_parameters,
                                         save_lora, with_adapter_ids)
from engram_kernels.modules import LoRALinear, MultiLoRALinear

peft = pytest.importorskip("peft")

CPU_CASES = [b for b, d in backend_cases("lora") if d == "cpu" and b != "triton"]  # triton: test_lora_ops
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=CPU_CASES)
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def randomize_adapters(model, seed=1):
    """Non-zero B, so the adapters change the outputs (fresh LoRA is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_layer(base, r, alpha, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, **kwargs)
    return peft.tuners.lora.Linear(base, "default", config, r=r, lora_alpha=alpha, **kwargs)


def copy_peft_weights(ours, theirs):
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)


# ---- one layer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_in, d_out, r, alpha, bias, rslora", [
    (576, 1536, 16, 32, False, False), (64, 48, 1, 8, True, False), (40, 24, 64, 16, True, True),
    (33, 17, 8, 8, False, False)])
def test_lora_linear_matches_peft(backend, d_in, d_out, r, alpha, bias, rslora):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias)
    theirs = peft_layer(copy.deepcopy(base), r, alpha, use_rslora=rslora)
    ours = LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora)
    randomize_adapters(theirs)
    copy_peft_weights(ours, theirs)
    x = torch.randn(3, 7, d_in)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(xa), theirs(xb)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4)
    assert ours.base_layer.weight.grad is None


def test_fresh_adapter_is_the_identity_and_base_is_frozen():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_dropout_trains_and_is_off_in_eval(backend):
    layer = LoRALinear(nn.Linear(32, 16), r=4, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(10, 32)
    layer.eval()
    plain = layer(x)
    layer.train()
    torch.manual_seed(0)
    dropped = layer(x)
    assert not torch.allclose(dropped, plain)
    dropped.sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()


def test_merge_unmerge_is_exact_and_keeps_outputs():
    layer = LoRALinear(nn.Linear(48, 40), r=8, alpha=16)
    randomize_adapters(layer)
    original = layer.weight.detach().clone()
    x = torch.randn(6, 48)
    fused = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight.view(torch.int32), original.view(torch.int32))


def test_joined_weights_train_save_and_merge_as_separate_ones(backend, tmp_path):
    """join_weights keeps W and B in one buffer: the same outputs, gradients and optimizer steps as
    separate tensors; a state dict of ordinary tensors; merge round trip; re-joined after .to()."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    plain, joined = LoRALinear(copy.deepcopy(base), r=4, alpha=8), LoRALinear(base, r=4, alpha=8, join_weights=True)
    randomize_adapters(plain)
    joined.load_state_dict(plain.state_dict())
    optimizers = [torch.optim.AdamW([m.lora_A, m.lora_B], lr=1e-2) for m in (plain, joined)]
    x = torch.randn(3, 5, 40)
    for _ in range(3):
        for layer, opt in zip((plain, joined), optimizers):
            opt.zero_grad()
            (layer(x) ** 2).sum().backward()
            opt.step()
        assert joined.joined() and not plain.joined()
        torch.testing.assert_close(joined(x), plain(x), rtol=1e-5, atol=1e-5)
    state = joined.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    save_file(dict(state), tmp_path / "joined.safetensors")
    original = joined.weight.detach().clone()
    expected = plain(x)
    joined.merge()
    torch.testing.assert_close(joined(x), expected, rtol=1e-5, atol=1e-5)
    joined.unmerge()
    assert torch.equal(joined.weight, original) and joined.joined()
    joined.bfloat16()  # new tensors for each parameter: no longer one buffer
    assert not joined.joined()
    torch.testing.assert_close(joined(x.bfloat16()).float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    assert joined.joined()


def test_multi_lora_linear_matches_one_lora_linear_per_adapter(backend):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    multi = MultiLoRALinear(base, n_adapters=3, r=4, alpha=8)
    randomize_adapters(multi)
    x = torch.randn(4, 5, 24)
    ids = torch.tensor([2, -1, 0, 2])  # one id per sequence
    multi.adapter_ids = ids
    y = multi(x)
    for row, a in enumerate(ids.tolist()):
        expected = base(x[row])
        if a >= 0:
            single = LoRALinear(base, r=4, alpha=8)
            with torch.no_grad():
                single.lora_A.copy_(multi.lora_A[a])
                single.lora_B.copy_(multi.lora_B[a])
            expected = single(x[row])
        torch.testing.assert_close(y[row], expected, rtol=1e-5, atol=1e-5)


# ---- Hugging Face models --------------------------------------------------------------------------

def peft_model(base, **config):
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", **config)
    return peft.get_peft_model(base, lora)


def test_apply_lora_targets_attention_and_mlp_not_the_head():
    model = apply_lora(tiny_llama(), r=4)
    names = sorted(lora_layers(model))
    assert len(names) == 2 * 7 and all(".self_attn." in n or ".mlp." in n for n in names)
    assert {p for p in model.parameters() if p.requires_grad} == set(lora_parameters(model))
    only_q = apply_lora(tiny_llama(), target_modules=["q_proj"], r=4)
    assert sorted(lora_layers(only_q)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_model_matches_peft_logits_and_grads(backend):
    theirs = peft_model(tiny_llama())
    randomize_adapters(theirs)
    ours = apply_lora(tiny_llama(), r=8, alpha=16)
    for name, layer in lora_layers(ours).items():
        copy_peft_weights(layer, theirs.get_submodule(f"base_model.model.{name}"))
    out_ours = ours(TOKENS, labels=TOKENS)
    out_theirs = theirs(TOKENS, labels=TOKENS)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-4, atol=1e-4)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in lora_layers(ours).items():
        peft_layer_ = theirs.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(layer.lora_A.grad, peft_layer_.lora_A["default"].weight.grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer_.lora_B["default"].weight.grad, rtol=1e-3, atol=1e-5)


def test_saved_adapter_loads_in_peft(tmp_path):
    ours = apply_lora(tiny_llama(), r=8, alpha=16)
    randomize_adapters(ours)
    save_lora(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, ours(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_here(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_lora(tiny_llama(), tmp_path)
    assert len(lora_layers(ours)) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_round_trip_through_our_format(tmp_path):
    ours = apply_lora(tiny_llama(), r=4, alpha=8, target_modules=["o_proj", "up_proj"])
    randomize_adapters(ours)
    save_lora(ours, tmp_path)
    again = load_lora(tiny_llama(), tmp_path)
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.lora_A, lora_layers(again)[name].lora_A)
        assert torch.equal(layer.lora_B, lora_layers(again)[name].lora_B)


def test_disabled_gives_base_logits_and_merge_is_exact():
    base_logits = tiny_llama()(TOKENS).logits
    model = apply_lora(tiny_llama(), r=4)
    randomize_adapters(model)
    weights = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(model(TOKENS).logits, base_logits)
    with torch.no_grad():
        fused = model(TOKENS).logits
        for layer in lora_layers(model).values():
            layer.merge()
        torch.testing.assert_close(model(TOKENS).logits, fused, rtol=1e-4, atol=1e-4)
        for layer in lora_layers(model).values():
            layer.unmerge()
    assert all(torch.equal(m.weight, weights[n]) for n, m in lora_layers(model).items())


def test_mixed_adapter_batch_matches_peft_adapter_names(backend):
    """Two peft adapters served in one batch (adapter_names=) against MultiLoRALinear layers."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    theirs.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(theirs)
    theirs.eval()
    ours = tiny_llama()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                 "model.layers.1.mlp.up_proj"):
        peft_layer_ = theirs.get_submodule(f"base_model.model.{name}")
        multi = MultiLoRALinear(ours.get_submodule(name), n_adapters=2, r=4, alpha=8)
        with torch.no_grad():
            for a, adapter in enumerate(("default", "second")):
                multi.lora_A[a].copy_(peft_layer_.lora_A[adapter].weight)
                multi.lora_B[a].copy_(peft_layer_.lora_B[adapter].weight)
        parent, _, child = name.rpartition(".")
        setattr(ours.get_submodule(parent), child, multi)
    with torch.no_grad(), with_adapter_ids(ours, torch.tensor([1, 0])):
        logits = ours(TOKENS).logits
    with torch.no_grad():
        expected = theirs(TOKENS, adapter_names=["second", "default"]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_eval_harness_lora_impls_adapt_the_same_layers_and_agree():
    from engram_kernels.trainer import evaluate
    theirs = evaluate.lora_model(tiny_llama(), "peft")
    ours = evaluate.lora_model(tiny_llama(), "engram")
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if isinstance(m, peft.tuners.lora.Linear))
    assert sorted(lora_layers(ours)) == peft_names
    randomize_adapters(theirs)
    for name, layer in lora_layers(ours).items():
        copy_peft_weights(layer, theirs.get_submodule(f"base_model.model.{name}"))
    torch.testing.assert_close(ours(TOKENS, labels=TOKENS).loss, theirs(TOKENS, labels=TOKENS).loss,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown LoRA implementation"):
        evaluate.lora_model(tiny_llama(), "other")


# ---- merged, cast, tied, peft models, other heads -------------------------------------------------

def test_disabled_on_a_merged_model_gives_base_logits_and_merges_back():
    base_logits = tiny_llama()(TOKENS).logits
    model = apply_lora(tiny_llama(), r=4)
    randomize_adapters(model)
    weights = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    with torch.no_grad():
        adapted = model(TOKENS).logits
        for layer in lora_layers(model).values():
            layer.merge()
        with lora_disabled(model):
            torch.testing.assert_close(model(TOKENS).logits, base_logits)
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(TOKENS).logits, adapted, rtol=1e-4, atol=1e-4)
        for layer in lora_layers(model).values():
            layer.unmerge()
    assert all(torch.equal(m.weight, weights[n]) for n, m in lora_layers(model).items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unmerge_after_a_cast_restores_the_weight_within_rounding(dtype):
    layer = LoRALinear(nn.Linear(64, 64), r=8, alpha=64)
    nn.init.normal_(layer.lora_B, std=0.5)
    original = layer.weight.detach().to(dtype)
    layer.merge().to(dtype)
    with pytest.warns(UserWarning, match="within rounding"):
        layer.unmerge()
    assert layer.weight.dtype == dtype and not layer.merged
    torch.testing.assert_close(layer.weight.float(), original.float(), rtol=0, atol=0.05)


def test_a_tied_head_adapts_but_refuses_to_merge():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    with pytest.warns(UserWarning, match="tied to model.embed_tokens.weight"):
        apply_lora(model, target_modules=["lm_head", "q_proj"], r=4)
    randomize_adapters(model)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot merge"):
        model.lm_head.merge()
    lora_layers(model)["model.layers.0.self_attn.q_proj"].merge()  # untied layers still merge
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_apply_lora_refuses_peft_models_and_adapted_layers():
    with pytest.raises(TypeError, match="has peft adapters already"):
        apply_lora(peft_model(tiny_llama()), r=4)
    model = apply_lora(tiny_llama(), target_modules=["q_proj"], r=4)
    with pytest.raises(ValueError, match="has an adapter already"):
        apply_lora(model, target_modules=["q_proj"], r=4)
    apply_lora(model, target_modules=["v_proj"], r=4)  # other layers may still be adapted
    assert len(lora_layers(model)) == 4


def test_classifier_head_is_not_a_default_target_and_the_adapter_loads_in_peft(tmp_path):
    def classifier():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**TINY, num_labels=3, pad_token_id=0)
        return transformers.LlamaForSequenceClassification(config).eval()
    ours = apply_lora(classifier(), r=4)
    assert "score" not in lora_layers(ours) and len(lora_layers(ours)) == 2 * 7
    randomize_adapters(ours)
    save_lora(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(classifier(), tmp_path)
    assert theirs.peft_config["default"].task_type is None  # SEQ_CLS would want the head's weights saved
    with torch.no_grad():
        torch.testing.assert_close(theirs(TOKENS).logits, ours(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_a_subset_of_layers_is_saved_so_peft_adapts_the_same_ones(tmp_path):
    ours = apply_lora(tiny_llama(), target_modules=r"model\.layers\.0\.self_attn\.q_proj", r=4)
    save_lora(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(m, peft.tuners.lora.Linear))
    assert adapted == sorted(lora_layers(ours)) == ["model.layers.0.self_attn.q_proj"]


def test_peft_rank_pattern_with_an_anchored_key_loads(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                             rank_pattern={"^model.layers.0.self_attn.q_proj": 2})
    theirs = peft.get_peft_model(tiny_llama(), config)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_lora(tiny_llama(), tmp_path)
    assert [layer.r for _, layer in sorted(lora_layers(ours).items())] == [2, 4]
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_multi_lora_scales_stay_exact_when_cast():
    multi = MultiLoRALinear(nn.Linear(32, 32), 2, r=12, alpha=16).to(torch.bfloat16)
    assert multi.scales.dtype == torch.float32 and torch.equal(multi.scales, torch.full((2,), 16 / 12))
    assert multi.lora_A.dtype == torch.bfloat16
    multi.adapter_ids = torch.tensor([0, 1])
    assert multi(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("make, error, message", [
    (lambda: LoRALinear(nn.Linear(8, 8), r=0), ValueError, "rank r must be an int >= 1"),
    (lambda: LoRALinear(nn.Linear(8, 8), r=2.5), ValueError, "rank r must be an int >= 1, got 2.5"),
    (lambda: MultiLoRALinear(nn.Linear(8, 8), 2, r=0), ValueError, "rank r must be an int >= 1"),
])
def test_module_arguments_are_checked(make, error, message):
    with pytest.raises(error, match=message):
        make()
