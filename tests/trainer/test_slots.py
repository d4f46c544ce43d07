"""Slot access counting, background counts and TF-IDF slot selection (sparse memory finetuning)."""
import collections

import pytest
import torch

from engram_kernels.integrations import add_memory_layers, memory_layers
from engram_kernels.trainer.slots import BackgroundCounts, SlotCounter, tfidf_allow_masks, tfidf_scores, with_learned

HEADS, K, N_KEYS = 2, 4, 16


@pytest.fixture
def memory_model(tiny_model):
    return add_memory_layers(tiny_model, heads=HEADS, k=K, n_keys=N_KEYS, key_dim=32)


def _fire(memory, ids):
    for hook in list(memory.access_hooks):
        hook(ids)


def test_counts_equal_a_hand_count(memory_model):
    (layer, memory), = memory_layers(memory_model).items()
    batches = [torch.tensor([[0, 5, 5, 7], [255, 5, 0, 3]]), torch.tensor([[7, 7, 7, 7]])]
    with SlotCounter(memory_model) as counter:
        for ids in batches:
            _fire(memory, ids)
    hand = collections.Counter(int(i) for ids in batches for i in ids.flatten())
    expected = torch.zeros(N_KEYS ** 2, dtype=torch.int64)
    for slot, n in hand.items():
        expected[slot] = n
    assert counter.counts[layer].dtype == torch.int64
    assert torch.equal(counter.counts[layer], expected)
    assert counter.tokens[layer] == 3
    counter.reset()
    assert counter.counts[layer].sum() == 0 and counter.tokens[layer] == 0


def test_token_mask_counts_only_chosen_tokens(memory_model):
    (layer, memory), = memory_layers(memory_model).items()
    with SlotCounter(memory_model) as counter:
        counter.token_mask = torch.tensor([True, False, True])
        _fire(memory, torch.tensor([[1, 2], [3, 4], [1, 9]]))
        assert counter.counts[layer][[1, 2, 3, 4, 9]].tolist() == [2, 1, 0, 0, 1]
        assert counter.tokens[layer] == 2
        with pytest.raises(ValueError, match="token_mask has 3 entries"):
            _fire(memory, torch.tensor([[1, 2]]))


def test_forward_counts_n_h_k_accesses_and_hooks_come_off(memory_model):
    ids = torch.randint(0, memory_model.config.vocab_size, (2, 7))
    with SlotCounter(memory_model) as counter:
        with torch.no_grad():
            memory_model(input_ids=ids)
    for layer, counts in counter.counts.items():
        assert int(counts.sum()) == 2 * 7 * HEADS * K
        assert counter.tokens[layer] == 14
    assert all(not m.access_hooks for m in memory_layers(memory_model).values())
    with torch.no_grad():
        memory_model(input_ids=ids)  # outside the context: nothing more is counted
    assert all(int(c.sum()) == 2 * 7 * HEADS * K for c in counter.counts.values())


def test_counter_needs_memory_layers(tiny_model):
    with pytest.raises(ValueError, match="no memory layers"):
        SlotCounter(tiny_model)


def _background(counts, tokens):
    return BackgroundCounts({0: torch.tensor(counts, dtype=torch.int64)}, tokens, 1)


def test_slot_common_in_background_ranks_below_a_rare_one():
    background = _background([1000, 0, 3, 0, 0, 0], tokens=1000)
    batch = {0: torch.tensor([5, 5, 5, 1, 0, 0])}
    scores = tfidf_scores(batch, background)[0]
    assert scores[1] > scores[2] > scores[0]  # same tf: rarer in background ranks higher
    assert scores[0] == 0  # read by every background token: idf 0
    assert scores[1] > scores[3]  # same idf: read more often by the batch ranks higher
    assert scores[4] == 0 and scores[5] == 0  # not read by the batch
    assert tfidf_allow_masks(batch, background, 1)[0].tolist() == [False, True, False, False, False, False]
    assert tfidf_allow_masks(batch, background, 2)[0].tolist() == [False, True, True, False, False, False]
    capped = tfidf_allow_masks(batch, background, 6, max_background_share=0.002)[0]
    assert capped.tolist() == [False, True, False, True, False, False]  # slots 0 and 2: read by > 2 background tokens


def test_idf_without_token_count_uses_total_reads():
    background = {0: torch.tensor([9, 0])}
    scores = tfidf_scores({0: torch.tensor([1, 1])}, background)[0]
    assert torch.allclose(scores, torch.tensor([0.5 * (torch.log(torch.tensor(10.0)) - torch.log(torch.tensor(10.0))),
                                                0.5 * torch.log(torch.tensor(10.0))]))


@pytest.mark.parametrize("top_t", [0, 1, 7, 20, 10_000])
def test_mask_has_exactly_top_t_entries_among_accessed(top_t):
    gen = torch.Generator().manual_seed(top_t)
    batch = {3: torch.randint(0, 4, (64,), generator=gen) * (torch.rand(64, generator=gen) < 0.3)}
    background = BackgroundCounts({3: torch.randint(0, 50, (64,), generator=gen)}, 100, 2)
    mask = tfidf_allow_masks(batch, background, top_t)[3]
    accessed = batch[3] > 0
    assert mask.dtype == torch.bool and mask.shape == (64,)
    assert int(mask.sum()) == min(top_t, int(accessed.sum()))
    assert not (mask & ~accessed).any()
    scores = tfidf_scores(batch, background)[3]
    if 0 < int(mask.sum()) < int(accessed.sum()):  # every chosen slot scores at least every passed-over one
        assert scores[mask].min() >= scores[accessed & ~mask].max()


def test_mask_input_errors():
    background = _background([1, 2], tokens=3)
    with pytest.raises(ValueError, match="top_t"):
        tfidf_allow_masks({0: torch.tensor([1, 0])}, background, -1)
    with pytest.raises(KeyError, match=r"layers \[5\]"):
        tfidf_allow_masks({5: torch.tensor([1, 0])}, background, 1)
    with pytest.raises(ValueError, match="shape"):
        tfidf_allow_masks({0: torch.tensor([1, 0, 0])}, background, 1)
    with pytest.raises(ValueError, match="max_background_share"):
        tfidf_allow_masks({0: torch.tensor([1, 0])}, background, 1, max_background_share=1.5)


def test_with_learned_adds_weighted_reads_and_lowers_their_rank():
    background = BackgroundCounts({0: torch.tensor([5, 0, 0, 0])}, tokens=10, n_sequences=2)
    merged = with_learned(background, ({0: torch.tensor([0, 3, 0, 0])}, 3), weight=2.0)
    assert merged[0].tolist() == [5, 6, 0, 0] and merged.tokens == 16 and merged.n_sequences == 2
    batch = {0: torch.tensor([0, 1, 1, 0])}
    assert tfidf_allow_masks(batch, background, 1)[0].tolist() == [False, True, False, False]
    assert tfidf_allow_masks(batch, merged, 1)[0].tolist() == [False, False, True, False]
