"""NgramMemory: slots addressed by hashed n-grams of the tokens, in tiny random Hugging Face models."""
import copy

import pytest
import torch

from engram_kernels.integrations import add_memory_layers, load_memory, memory_layers, save_memory
from engram_kernels.modules import NgramMemory
from engram_kernels.trainer.slots import SlotCounter

from test_hf_integration import TOKENS, build

NGRAM = dict(addressing="ngram", n_slots=97, heads=2)


def slots(memory, tokens):
    memory.set_tokens(torch.tensor([tokens]), continues=False)
    return memory.slot_ids(memory.tokens)


def test_an_ngram_reads_the_same_slots_in_any_context():
    memory = NgramMemory(8, n_slots=1000, orders=(1, 2, 3), heads=2)
    a, b = slots(memory, [5, 6, 7, 1, 2]), slots(memory, [9, 9, 5, 6, 7])
    assert a.shape == (5, 6) and int(a.min()) >= 0 and int(a.max()) < 1000
    assert torch.equal(a[2], b[4])           # the trigram 5 6 7 ends both
    assert torch.equal(a[3, :2], slots(memory, [4, 1])[1, :2])  # the unigram 1: only its unigram reads agree
    assert not torch.equal(a[3, 2:], slots(memory, [4, 1])[1, 2:])
    assert torch.equal(a, slots(NgramMemory(8, n_slots=1000), [5, 6, 7, 1, 2]))  # seeded: same slots each time
    assert not torch.equal(a, slots(NgramMemory(8, n_slots=1000, seed=1), [5, 6, 7, 1, 2]))


def test_zero_memory_keeps_logits_and_generate_with_cache_matches_full_forwards():
    model = build("llama")
    with torch.no_grad():
        before = model(TOKENS).logits
        add_memory_layers(model, layers=[0], **NGRAM)
        assert torch.equal(model(TOKENS).logits, before)
        torch.nn.init.normal_(memory_layers(model)[0].values)
        generated = model.generate(TOKENS[:, :4], attention_mask=torch.ones_like(TOKENS[:, :4]), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
        stepwise = TOKENS[:, :4]
        for _ in range(5):
            stepwise = torch.cat([stepwise, model(stepwise).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, stepwise)


def test_ngram_memory_saves_loads_and_survives_a_deep_copy(tmp_path):
    model = build("llama")
    add_memory_layers(model, layers=[1], **NGRAM)
    torch.nn.init.normal_(memory_layers(model)[1].values)
    with torch.no_grad():
        expected = model(TOKENS).logits
        assert torch.equal(copy.deepcopy(model)(TOKENS).logits, expected)
    save_memory(model, tmp_path)
    fresh = build("llama")
    load_memory(fresh, tmp_path)
    assert isinstance(memory_layers(fresh)[1], NgramMemory)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS).logits, expected)


def test_slot_counter_counts_every_ngram_read():
    model = build("llama")
    add_memory_layers(model, layers=[1], **NGRAM)
    with SlotCounter(model) as counter, torch.no_grad():
        model(TOKENS)
    assert int(counter.counts[1].sum()) == TOKENS.numel() * memory_layers(model)[1].reads


def test_bad_ngram_inputs_are_rejected():
    with pytest.raises(ValueError, match="orders must be positive"):
        NgramMemory(8, orders=(0, 2))
    with pytest.raises(ValueError, match="addressing must be one of"):
        add_memory_layers(build("llama"), addressing="hashed")
    model = add_memory_layers(build("llama"), layers=[0], **NGRAM)
    with pytest.raises(ValueError, match="must be called with input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(RuntimeError, match="no token ids for this input"):
        memory_layers(model)[0](torch.zeros(1, 5, 64))
