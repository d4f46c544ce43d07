"""Background text: sampled from the model, cached; memory addressing calibrated on it; slot counts."""
import pytest
import torch
from safetensors import safe_open

from engram_kernels.integrations import memory_layers
from engram_kernels.trainer import background as bg
from engram_kernels.trainer.background import (QUESTION_STARTS, add_calibrated_memory, background_counts, question_of,
                                               sample_background)

HEADS, K, N_KEYS = 2, 4, 16
MEMORY = dict(heads=HEADS, k=K, n_keys=N_KEYS, key_dim=32)


@pytest.fixture
def text(tiny_model, tokenizer):
    return sample_background(tiny_model, tokenizer, n_sequences=6, seq_len=12, seed=3)


def test_sampling_is_seeded_leaves_the_callers_rng_and_caches(tiny_model, tokenizer, tmp_path, monkeypatch):
    rng_state = torch.get_rng_state()
    first = sample_background(tiny_model, tokenizer, n_sequences=6, seq_len=12, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert 0 < len(first) <= 6 and all(e.kind == "raw" and e.target for e in first)
    assert sample_background(tiny_model, tokenizer, n_sequences=6, seq_len=12, seed=3) == first
    path = tmp_path / "text.json"
    cached = sample_background(tiny_model, tokenizer, n_sequences=6, seq_len=12, seed=3, cache_path=path)
    monkeypatch.setattr(tiny_model, "generate", None)  # a cache hit must not sample
    assert sample_background(tiny_model, tokenizer, n_sequences=6, seq_len=12, seed=3, cache_path=path) == cached
    with pytest.raises(ValueError, match="positive"):
        sample_background(tiny_model, tokenizer, n_sequences=0)


def test_question_background_adds_question_records(tiny_model, tokenizer):
    text = sample_background(tiny_model, tokenizer, n_sequences=3, seq_len=8, seed=1)
    both = sample_background(tiny_model, tokenizer, n_sequences=3, seq_len=8, seed=1, n_questions=40)
    assert both[:len(text)] == text  # the free text is drawn first, as without questions
    for e in both[len(text):]:  # a random tiny model writes "?" rarely: few or none survive
        assert e.prompt.endswith("?") and e.prompt.startswith(QUESTION_STARTS) and e.target
    assert len(both) <= len(text) + 40
    with pytest.raises(ValueError, match="not negative"):
        sample_background(tiny_model, tokenizer, n_questions=-1)


@pytest.mark.parametrize("start, continuation, question", [
    ("Who", "wrote Hamlet? It was", "Who wrote Hamlet?"),
    ("What", "'s the time? Now.", "What's the time?"),
    ("Why", "? Because", "Why?"),
    ("Which", "river is longest.", None),
])
def test_question_of_cuts_at_the_first_question_mark(start, continuation, question):
    assert question_of(start, continuation) == question


def test_calibrated_memory_is_centered_and_still_a_no_op(tiny_model, tokenizer, text):
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = tiny_model(ids).logits
    add_calibrated_memory(tiny_model, tokenizer, text, **MEMORY)
    (_, memory), = memory_layers(tiny_model).items()
    assert memory.query_center.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, expected)  # values are still zero


def test_uncalibrated_memory_keeps_its_random_projection(tiny_model, tokenizer, text):
    add_calibrated_memory(tiny_model, tokenizer, text, calibrate=False, **MEMORY)
    (_, memory), = memory_layers(tiny_model).items()
    assert memory.query_center.abs().sum() == 0


def test_counts_cover_every_predicted_token_and_are_cached(tiny_model, tokenizer, text, tmp_path, monkeypatch):
    add_calibrated_memory(tiny_model, tokenizer, text, **MEMORY)
    path = tmp_path / "cache" / "counts.safetensors"
    counts = background_counts(tiny_model, tokenizer, text, cache_path=path)
    assert counts.tokens > 0 and counts.n_sequences == len(text)
    for layer, memory in memory_layers(tiny_model).items():
        assert counts[layer].shape == (memory.n_slots,) and counts[layer].dtype == torch.int64
        assert int(counts[layer].sum()) == counts.tokens * HEADS * K
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["tokens"] == str(counts.tokens)

    def no_counting(*args, **kwargs):
        raise AssertionError("cached background counts were recounted")
    monkeypatch.setattr(bg, "target_slot_counts", no_counting)
    cached = background_counts(tiny_model, tokenizer, text, cache_path=path)
    assert cached.tokens == counts.tokens and all(torch.equal(cached[i], counts[i]) for i in counts)
    with pytest.raises(AssertionError, match="recounted"):  # other text: the cache no longer applies
        background_counts(tiny_model, tokenizer, text[1:], cache_path=path)
    with pytest.raises(AssertionError, match="recounted"):  # prompt tokens counted too: neither
        background_counts(tiny_model, tokenizer, text, cache_path=path, write_at="both")
    with torch.no_grad():  # another memory lookup (new keys): neither
        next(iter(memory_layers(tiny_model).values())).keys1.add_(1.0)
    with pytest.raises(AssertionError, match="recounted"):
        background_counts(tiny_model, tokenizer, text, cache_path=path)


def test_corrupt_counts_cache_is_recounted(tiny_model, tokenizer, text, tmp_path):
    add_calibrated_memory(tiny_model, tokenizer, text, **MEMORY)
    path = tmp_path / "counts.safetensors"
    path.write_bytes(b"\x00garbage")
    counts = background_counts(tiny_model, tokenizer, text, cache_path=path)
    assert counts.tokens > 0
    assert background_counts(tiny_model, tokenizer, text, cache_path=path).tokens == counts.tokens


def test_counting_no_text_is_an_error(tiny_model, tokenizer):
    add_calibrated_memory(tiny_model, tokenizer, [], calibrate=False, **MEMORY)
    with pytest.raises(ValueError, match="at least one"):
        background_counts(tiny_model, tokenizer, [])


def test_question_counts_add_the_prompts_own_tokens(tiny_model, tokenizer, text):
    add_calibrated_memory(tiny_model, tokenizer, text, **MEMORY)
    prompted = [e for e in text if e.prompt]
    assert prompted, "background text always has prompted samples"
    plain, with_question, question_only = (background_counts(tiny_model, tokenizer, prompted, write_at=w)
                                           for w in ("answer", "both", "question"))
    assert with_question.tokens > plain.tokens
    assert all(bool((with_question[i] >= plain[i]).all()) for i in plain)
    assert all(torch.equal(question_only[i], with_question[i]) for i in plain)
