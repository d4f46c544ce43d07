"""End to end through `engram` on a tiny random Llama saved to disk (no hub, no 135M model)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from engram_kernels.integrations import add_memory_layers, memory_layers
from engram_kernels.trainer import cli
from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.learn import LearnConfig, train_memory
from engram_kernels.trainer.versions import MemoryStore

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
    learn(tmp_path / "home", model_dir, write_jsonl(tmp_path / "f.jsonl", FACTS), extra=["--epochs", "2"])
    model, _, _ = open_memory(tmp_path / "home")
    saved = load_file(model_dir / "model.safetensors")
    for name, p in model.named_parameters():
        if ".memory." in name:
            continue
        key = name.replace(".mlp.mlp.", ".mlp.")
        if key in saved:
            assert torch.equal(p, saved[key]), name


def test_only_top_t_slots_change_per_step(tokenizer, tiny_model):
    add_memory_layers(tiny_model, layers=[1], heads=2, k=4, n_keys=16, key_dim=32)
    memory = memory_layers(tiny_model)[1]
    background = {1: torch.zeros(memory.n_slots, dtype=torch.long)}
    examples = [Example("", "The river Ost flows north into the Pale Sea.", "raw", "d", "")] * 4
    stats = train_memory(tiny_model, tokenizer, examples, background,
                         LearnConfig(top_t=3, epochs=1, batch_size=4, lr=0.1))
    assert stats.steps == 1 and 0 < stats.rows_changed["1"] <= 3


def test_reingesting_the_same_content_is_a_no_op(tmp_path, model_dir, capsys):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    assert "nothing new to learn" in capsys.readouterr().out
    assert [m["version"] for m in MemoryStore(tmp_path / "home").versions()] == [1]


def test_a_crash_after_saving_a_version_loses_and_duplicates_nothing(tmp_path, model_dir, monkeypatch):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    from engram_kernels.trainer import journal

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the version and the journal")
    monkeypatch.setattr(journal.Journal, "mark_learned", crash)
    with pytest.raises(KeyboardInterrupt):
        learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    monkeypatch.undo()
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    store = MemoryStore(tmp_path / "home")
    assert [m["version"] for m in store.versions()] == [1] and store.current() == 1
    with journal.Journal(tmp_path / "home" / "journal.sqlite") as j:
        assert not j.pending()


def test_a_crash_during_training_is_retried_on_the_next_run(tmp_path, model_dir, monkeypatch):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while training")
    monkeypatch.setattr(cli, "train_memory", crash)
    with pytest.raises(KeyboardInterrupt):
        learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    monkeypatch.undo()
    learn(tmp_path / "home", model_dir, facts, extra=["--epochs", "1"])
    manifest = MemoryStore(tmp_path / "home").versions()
    assert len(manifest) == 1 and len(manifest[0]["documents"]) == len(FACTS)


def test_rollback_restores_a_version_exactly(tmp_path, model_dir, capsys):
    home = tmp_path / "home"
    learn(home, model_dir, write_jsonl(tmp_path / "a.jsonl", FACTS[:1]), extra=["--epochs", "2"])
    values_v1 = memory_layers(open_memory(home)[0])[1].values.clone()
    learn(home, model_dir, write_jsonl(tmp_path / "b.jsonl", FACTS[1:]), extra=["--epochs", "2"])
    assert not torch.equal(memory_layers(open_memory(home)[0])[1].values, values_v1)
    cli.main(["memory", "rollback", "1", "--home", str(home)])
    assert torch.equal(memory_layers(open_memory(home)[0])[1].values, values_v1)
    cli.main(["memory", "list", "--home", str(home)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["*", "1", "0"] in [r[:3] for r in rows] and ["2", "1"] in [r[:2] for r in rows]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe not utf-8", "UTF-8"),
    (b"x" * 200_001, "over the limit"),
], ids=["empty", "binary", "non-utf8", "long-line"])
def test_bad_files_are_clear_errors(tmp_path, model_dir, content, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=f"(?i){message}"):
        learn(tmp_path / "home", model_dir, path)


def test_missing_model_path_is_a_clear_error(tmp_path):
    facts = write_jsonl(tmp_path / "f.jsonl", FACTS)
    with pytest.raises((SystemExit, FileNotFoundError), match="no-such-model"):
        cli.main(["learn", str(facts), "--home", str(tmp_path / "home"), "--model", str(tmp_path / "no-such-model")])
