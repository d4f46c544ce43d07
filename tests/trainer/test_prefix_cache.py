"""The hidden states below the memory, served from a cache while the memory trains."""
import copy
import functools

import pytest
import torch

from engram_kernels.integrations import add_memory_layers, memory_layers
from engram_kernels.trainer import learn
from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.learn import LearnConfig, pad_batch, train_memory
from engram_kernels.trainer.prefix_cache import PrefixCache
from engram_kernels.trainer.slots import BackgroundCounts

TEXTS = ["The capital of Veloria is Quartzholm.", "Mira Dask wrote Glass Harbors.", "A fox jumps."]


def batch(tokenizer, texts, left=False):
    return pad_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id, "cpu", left=left)


@pytest.fixture(params=["product_keys", "ngram"])
def memory_model(request, tiny_model):
    config = dict(n_keys=16, heads=2, k=4, key_dim=32) if request.param == "product_keys" else dict(n_slots=256)
    add_memory_layers(tiny_model, layers=[1], addressing=request.param, value_init="normal", **config)
    return tiny_model


def test_each_row_runs_the_blocks_below_once_and_the_logits_stay_the_same(tokenizer, memory_model):
    ids, mask = batch(tokenizer, TEXTS)
    real = mask.bool()  # padding's own logits differ: its states are not kept
    expected = memory_model(input_ids=ids, attention_mask=mask).logits
    below = []
    memory_model.model.layers[0].mlp.register_forward_pre_hook(lambda _, args: below.append(args[0].shape[0]))
    with PrefixCache(memory_model) as cache:
        first, first_mask = batch(tokenizer, TEXTS[1::-1])  # another order and batch size
        first_logits = memory_model(input_ids=first, attention_mask=first_mask).logits
        logits = memory_model(input_ids=ids, attention_mask=mask).logits
        memory_model(input_ids=ids, attention_mask=mask)
    assert below == [2, 1] and (cache.hits, cache.misses) == (3, 0)  # the third text joined in the second call
    torch.testing.assert_close(logits[real], expected[real])
    torch.testing.assert_close(first_logits[first_mask.bool()], expected[:2].flip(0)[first_mask.bool()])
    assert "forward" not in vars(memory_model.model.layers[0])  # the blocks are themselves again


def test_left_padding_and_rows_past_max_bytes_run_in_full(tokenizer, memory_model):
    with PrefixCache(memory_model) as cache:
        ids, mask = batch(tokenizer, TEXTS[:2], left=True)
        memory_model(input_ids=ids, attention_mask=mask)
    assert (cache.hits, cache.misses, cache.states) == (0, 1, {})
    ids, mask = batch(tokenizer, TEXTS)
    with PrefixCache(memory_model, max_bytes=0) as cache:
        memory_model(input_ids=ids, attention_mask=mask)
        memory_model(input_ids=ids, attention_mask=mask)
    assert (cache.hits, cache.misses, cache.states) == (0, 2, {})


def test_training_with_the_cache_writes_what_training_without_it_writes(tokenizer, tiny_model, monkeypatch):
    examples = [Example(f"Who wrote book {i}?", f"Author {i}", "qa", "d", "") for i in range(6)]
    results, caches = [], []

    def recorded(model, max_bytes):
        caches.append(PrefixCache(model, max_bytes))
        return caches[-1]

    for max_bytes in (1 << 30, 0):
        monkeypatch.setattr(learn, "PrefixCache", functools.partial(recorded, max_bytes=max_bytes))
        model = copy.deepcopy(tiny_model)
        torch.manual_seed(0)  # the same memory keys
        add_memory_layers(model, layers=[1], n_keys=16, heads=2, k=4, key_dim=32)
        counts = BackgroundCounts({1: torch.zeros(256, dtype=torch.long)}, tokens=1)
        train_memory(model, tokenizer, examples, counts, LearnConfig(epochs=3, batch_size=4, lr=0.05, top_t=64))
        results.append(memory_layers(model)[1].values.detach())
    assert caches[0].hits == 6 and caches[1].hits == 0
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    assert results[0].abs().sum() > 0

