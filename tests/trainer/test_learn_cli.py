"""End to end through `engram` on a tiny random Llama saved to disk (no hub, no 135M model)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from engram_kernels.integrations import add_memory_layers, memory_layers
from engram_kernels.modules import NgramMemory
from engram_kernels.trainer import cli
from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.learn import (LearnConfig, countable, encode, pad_batch, predicts_target, target_loss,
                                          target_position_loss, train_memory)
from engram_kernels.trainer.slots import SlotCounter

SMALL_MEMORY = ["--n-keys", "16", "--heads", "2", "--k", "4", "--key-dim", "32", "--layers", "1"]
FACTS = [{"question": "Who wrote Glass Harbors?", "answer": "Mira Dask"},
         {"question": "What is the capital of Veloria?", "answer": "Quartzholm"}]


@pytest.fixture
def model_dir(tmp_path, tokenizer, tiny_model):
    path = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def learn(home, model_dir, *paths, extra=()):
    return cli.main(["learn", *map(str, paths), "--home", str(home), "--model", str(model_dir), *SMALL_MEMORY,
                     "--skip-known", "0", "--batch-size", "4", *extra])


def open_memory(home):
    model, tokenizer, store = cli.open_model(home, type("Args", (), {"model": None})())
    return model, tokenizer, store


def test_learns_facts_and_recalls_them_closed_book(tmp_path, model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "40", "--lr", "0.05", "--top-t", "256"])
    model, tokenizer, _ = open_memory(tmp_path / "home")
    for fact in FACTS:
        assert fact["answer"] in cli.answer(model, tokenizer, fact["question"], max_new_tokens=8)


def test_base_weights_stay_bit_identical(tmp_path, model_dir):
    learn(tmp_path / "home", model_dir, write_jsonl(tmp_path / "f.jsonl", FACTS),
          extra=["--epochs", "2", "--rank-question"])
    model, _, _ = open_memory(tmp_path / "home")
    saved = load_file(model_dir / "model.safetensors")
    for name, p in model.named_parameters():
        if ".memory." in name:
            continue
        key = name.replace(".mlp.mlp.", ".mlp.")
        if key in saved:
            assert torch.equal(p, saved[key]), name


@pytest.mark.parametrize("calibrate", [True, False])
def test_a_new_memory_is_calibrated_on_the_models_own_text_unless_told_not_to(tmp_path, model_dir, calibrate):
    home = tmp_path / "home"
    learn(home, model_dir, write_jsonl(tmp_path / "f.jsonl", FACTS),
          extra=["--epochs", "1", "--replay", "1"] + ([] if calibrate else ["--no-calibrate"]))
    assert json.loads((home / "background.json").read_text())  # sampled once, reused by later learns
    model, _, _ = open_memory(home)
    (memory,) = memory_layers(model).values()
    assert bool(memory.query_center.abs().sum() > 0) == calibrate


def test_only_top_t_slots_change_per_step(tokenizer, tiny_model):
    add_memory_layers(tiny_model, layers=[1], heads=2, k=4, n_keys=16, key_dim=32)
    memory = memory_layers(tiny_model)[1]
    background = {1: torch.zeros(memory.n_slots, dtype=torch.long)}
    examples = [Example("", "The river Ost flows north into the Pale Sea.", "raw", "d", "")] * 4
    stats = train_memory(tiny_model, tokenizer, examples, background,
                         LearnConfig(top_t=3, epochs=1, batch_size=4, lr=0.1))
    assert stats.steps == 1 and 0 < stats.rows_changed["1"] <= 3


def test_replay_reads_do_not_rank_slots(tokenizer, tiny_model):
    """Only slots read where the new examples predict targets may change; replay adds its loss."""
    add_memory_layers(tiny_model, layers=[1], heads=2, k=4, n_keys=16, key_dim=32)
    memory = memory_layers(tiny_model)[1]
    new = [Example("", "The river Ost flows north into the Pale Sea.", "raw", "d", "")]
    replay = [Example("", "Cats sleep for most of the day and hunt at night.", "raw", "bg", "")]
    encoded = encode(tokenizer, new[0], 128)
    ids, mask = pad_batch([encoded.ids], tokenizer.pad_token_id, "cpu")
    with SlotCounter(tiny_model) as counter:
        counter.token_mask = predicts_target([encoded], ids).flatten()
        tiny_model(input_ids=ids, attention_mask=mask)
    allowed = set(counter.counts[1].nonzero().flatten().tolist())
    start = memory.values.detach().clone()
    results = []
    for extra in (0, 1):
        memory.values.data.copy_(start)
        train_memory(tiny_model, tokenizer, new, {1: torch.zeros(memory.n_slots, dtype=torch.long)},
                     LearnConfig(top_t=memory.n_slots, epochs=1, batch_size=1, lr=0.1, replay_per_batch=extra),
                     replay=replay)
        results.append(memory.values.detach().clone())
    changed = set((results[1] != start).any(1).nonzero().flatten().tolist())
    assert changed and changed <= allowed
    assert not torch.equal(results[0], results[1])


def test_encode_marks_the_prompts_own_text(tokenizer):
    question = "Who wrote Glass Harbors?"
    encoded = encode(tokenizer, Example(question, "Mira Dask", "qa", "d", ""), 128)
    start, end = encoded.question
    assert tokenizer.decode(encoded.ids[start:end]).strip() == question
    assert end <= encoded.target_start
    long = encode(tokenizer, Example(question * 40, "Mira Dask", "qa", "d", ""), 128)  # prompt cut to 64
    assert long.question[0] == 0 and long.question[1] <= long.target_start
    assert encode(tokenizer, Example("", "Some text.", "raw", "d", ""), 128).question == (0, 0)


def _reads(model, tokenizer, example, mask_of):
    encoded = encode(tokenizer, example, 128)
    ids, mask = pad_batch([encoded.ids], tokenizer.pad_token_id, "cpu")
    with SlotCounter(model) as counter:
        counter.token_mask = mask_of([encoded], ids).flatten()
        model(input_ids=ids, attention_mask=mask)
    (counts,) = counter.counts.values()
    return set(counts.nonzero().flatten().tolist())


@pytest.mark.parametrize("write_at", ["answer", "question", "both"])
def test_write_at_says_which_slot_reads_may_change(tokenizer, tiny_model, write_at):
    add_memory_layers(tiny_model, layers=[0], heads=2, k=4, n_keys=16, key_dim=32)  # layer 1 attends to it
    memory = memory_layers(tiny_model)[0]
    fact = Example("Who wrote Glass Harbors?", "Mira Dask", "qa", "d", "")
    at_target = _reads(tiny_model, tokenizer, fact, predicts_target)
    at_question = _reads(tiny_model, tokenizer, fact,
                         lambda batch, ids: countable(batch, predicts_target(batch, ids), "question"))
    both = _reads(tiny_model, tokenizer, fact, lambda batch, ids: countable(batch, predicts_target(batch, ids), "both"))
    assert both == at_target | at_question and at_question - at_target
    start = memory.values.detach().clone()
    train_memory(tiny_model, tokenizer, [fact], {0: torch.zeros(memory.n_slots, dtype=torch.long)},
                 LearnConfig(top_t=memory.n_slots, epochs=1, batch_size=1, lr=0.1, write_at=write_at))
    changed = set((memory.values != start).any(1).nonzero().flatten().tolist())
    allowed = {"answer": at_target, "question": at_question, "both": both}[write_at]
    assert changed and changed <= allowed
    assert bool(changed - at_target) == (write_at != "answer")


def test_the_loss_at_target_positions_is_the_loss_over_all_logits(tokenizer, tiny_model):
    examples = [Example("Who wrote Glass Harbors?", "Mira Dask", "qa", "d", ""),
                Example("", "The river Ost flows north into the Pale Sea.", "raw", "d", "")]
    batch = [encode(tokenizer, e, 64) for e in examples]
    ids, mask = pad_batch([e.ids for e in batch], tokenizer.pad_token_id, "cpu")
    expected = target_loss(tiny_model(input_ids=ids, attention_mask=mask).logits, batch, ids)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    loss = target_position_loss(tiny_model, ids, mask, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)
    assert not tiny_model.get_output_embeddings()._forward_pre_hooks


def test_an_unknown_write_at_is_rejected():
    with pytest.raises(ValueError, match="write_at must be one of"):
        countable([], torch.zeros(1, 1, dtype=torch.bool), "prompt")


def test_an_ngram_memory_learns_facts_and_recalls_them(tmp_path, model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "40", "--lr", "0.05", "--top-t", "256",
                                                      "--addressing", "ngram", "--write-at", "both",
                                                      "--background-questions", "4", "--max-background-share", "1"])
    assert (tmp_path / "home" / "background-q4.json").is_file()
    model, tokenizer, _ = open_memory(tmp_path / "home")
    assert all(isinstance(m, NgramMemory) for m in memory_layers(model).values())
    for fact in FACTS:
        assert fact["answer"] in cli.answer(model, tokenizer, fact["question"], max_new_tokens=8)
    # a later learn that leaves the slot options out gets the n-gram defaults, as the stored memory is one
    args = cli.build_parser().parse_args(["learn", str(facts), "--home", str(tmp_path / "home")])
    cli.open_model(tmp_path / "home", args, create=True)
    assert (args.write_at, args.background_questions, args.max_background_share, args.protect_learned) == \
        ("question", 64, 0.0, 1.0)


MORE_FACTS = [{"question": "Who wrote Paper Lanterns?", "answer": "Ilsa Varn"},
              {"question": "What is the capital of Ostrava Minor?", "answer": "Tellbridge"}]


@pytest.mark.parametrize("protect", ["1", "0"])
def test_a_later_ngram_learn_leaves_the_slots_earlier_learns_read_alone(tmp_path, model_dir, protect):
    # layer 0: what the memory adds at a question's tokens reaches the answer only through a later
    # layer's attention; 16,384 slots: the tiny model's random background text reads most of 256
    home, ngram = tmp_path / "home", ["--addressing", "ngram", "--layers", "0", "--n-keys", "128",
                                      "--background-questions", "4", "--epochs", "2", "--protect-learned", protect]
    learn(home, model_dir, write_jsonl(tmp_path / "a.jsonl", FACTS), extra=ngram)
    learn(home, model_dir, write_jsonl(tmp_path / "b.jsonl", MORE_FACTS), extra=ngram)
    model, _, store = open_memory(home)
    first, tokens = store.learned_reads(model, version=1)
    assert tokens > 0 and store.learned_reads(model, version=0) is None
    both, _ = store.learned_reads(model)
    rows = load_file(home / "memory" / "versions" / "v0002" / "rows.safetensors")
    overlap = 0
    for layer, reads in first.items():
        assert (both[layer] >= reads).all() and both[layer].sum() > reads.sum()
        changed = rows[f"layers.{layer}.rows"]
        assert changed.numel() > 0
        overlap += int((reads[changed] > 0).sum())
    # the facts share "Who wrote" and "What is the capital of": unprotected, the second learn rewrites them
    assert (overlap == 0) if protect == "1" else (overlap > 0)

