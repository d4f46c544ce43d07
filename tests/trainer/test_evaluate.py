"""`engram eval`: scoring, BM25, data loading and the harness end to end on a tiny random Llama."""
import argparse
import json
import shlex

import pytest
import torch

from engram_kernels.trainer import cli, evaluate
from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.evaluate import (BM25, EvalDataError, contains, lcs_length, load_eval_data,
                                             load_retention, normalize_answer, rouge_l_recall, score_answers,
                                             token_f1)
from engram_kernels.trainer.learn import LearnConfig

SMALL_MEMORY = ["--n-keys", "16", "--heads", "2", "--k", "4", "--key-dim", "32", "--layers", "1",
                "--background-sequences", "8", "--background-len", "16"]
FACTS = [{"question": "Who wrote Glass Harbors?", "answer": "Mira Dask wrote Glass Harbors in 1987."},
         {"question": "What is the capital of Veloria?", "answer": "The capital of Veloria is Quartzholm."},
         {"question": "Where does the river Ost flow?", "answer": "The river Ost flows north into the Pale Sea."}]
PASSAGES = [{"title": "Veloria", "context": "The capital of Veloria is Quartzholm. The river Ost flows north.",
             "questions": [{"question": "What is the capital of Veloria?", "answer": "Quartzholm"}]},
            {"title": "Glass Harbors", "context": "Mira Dask wrote the novel Glass Harbors in 1987.",
             "questions": [{"question": "Who wrote Glass Harbors?", "answer": "Mira Dask"},
                           {"question": "When was Glass Harbors written?", "answer": "1987"}]}]
RETENTION = [{"question": "Where is the Pale Sea?", "answer": "north"},
             {"question": "What jumps over the lazy dog?", "answer": "A fox"}]




@pytest.fixture(autouse=True)
def one_thread():
    # A tiny model gains nothing from threads, and on a busy 2-core machine OpenMP waits make each op slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- scoring

def test_normalize_answer_follows_squad():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_contains_matches_whole_normalized_words():
    assert contains("It is in Paris, France.", "paris") == 1.0
    assert contains("The answer: the Eiffel Tower", "Eiffel Tower!") == 1.0
    assert contains("A comparison of cities", "paris") == 0.0  # not a word of the answer
    assert contains("anything", "the") == 0.0  # a gold answer that normalizes to nothing never matches


def test_token_f1_known_values():
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(2 * 0.75 / 1.75)
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "Paris") == 0.0


def test_lcs_and_rouge_l_recall_known_values():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    gold = "Jaime Vasquez was born in Santiago, Chile."
    assert rouge_l_recall("Vasquez was born in Lima", gold) == pytest.approx(4 / 7)
    assert rouge_l_recall(gold.upper(), gold) == 1.0
    assert rouge_l_recall("nothing alike", gold) == 0.0


def test_score_answers_by_kind():
    facts = [evaluate.Question("q1", ("Mira Dask wrote Glass Harbors",)),
             evaluate.Question("q2", ("Quartzholm is it",))]
    scores = score_answers("qa", facts, ["Mira Dask wrote Glass Harbors in 1987", "no idea"])
    assert scores["acc"] == 0.5 and scores["rouge_l"] == pytest.approx(0.5)
    short = [evaluate.Question("q", ("Paris", "City of Light"))]
    assert score_answers("squad", short, ["the City of Light"]) == {"acc": 1.0, "f1": 1.0}
    assert score_answers("retention", [], []) is None


# ---------------------------------------------------------------- BM25

def test_bm25_ranks_the_passage_sharing_rare_query_words_first():
    corpus = ["The capital of Veloria is Quartzholm.", "The river Ost flows north into the Pale Sea.",
              "Mira Dask wrote the novel Glass Harbors.", "The the the the capital."]
    retriever = BM25(corpus)
    assert retriever.top("Who wrote Glass Harbors?", 1) == [2]
    assert retriever.top("capital of Veloria", 2) == [0, 3]  # "veloria" is rare, "capital" is not
    assert retriever.top("unrelated words", 2) == [0, 1]  # all score 0: earlier passages first
    scores = retriever.scores("Quartzholm")
    assert scores[0] > 0 and scores[1:] == [0.0, 0.0, 0.0]


def test_bm25_prefers_shorter_passages_for_the_same_match():
    retriever = BM25(["ost " + "filler " * 30, "ost river", "other"])
    assert retriever.top("ost", 2) == [1, 0]


def test_bm25_needs_passages():
    with pytest.raises(ValueError, match="at least one passage"):
        BM25([])


# ---------------------------------------------------------------- data

def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_load_eval_data_detects_passages_and_facts(tmp_path):
    squad = load_eval_data(write_json(tmp_path / "squad.json", PASSAGES), limit=1)
    assert squad.kind == "squad" and len(squad.documents) == 1 and squad.documents[0].kind == "text"
    assert squad.documents[0].text.startswith("Veloria\n\n") and [q.item for q in squad.questions] == [0]
    facts = load_eval_data(write_json(tmp_path / "facts.json", FACTS))
    assert facts.kind == "qa" and [d.kind for d in facts.documents] == ["qa"] * 3
    assert facts.questions[1].question == FACTS[1]["question"] and facts.questions[1].item == 1
    assert len(load_retention(write_json(tmp_path / "r.json", RETENTION), limit=1)) == 1


@pytest.mark.parametrize("content, message", [
    ("[]", "non-empty JSON list"), ("{not json", "malformed JSON"), ('[{"text": "x"}]', "records must be"),
    ('[{"question": "q", "answer": ""}]', "non-empty"),
], ids=["empty", "malformed", "unknown", "empty-answer"])
def test_bad_eval_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(EvalDataError, match=message):
        load_eval_data(path)


# ---------------------------------------------------------------- training loop

def test_train_for_stops_when_the_budget_is_spent_and_mixes_in_replay(tokenizer, tiny_model):
    examples = [Example("Who wrote Glass Harbors?", "Mira Dask", "qa", "d", "")] * 4
    replay = [Example("", "A fox jumps over the lazy dog.", "raw", "background", "")]
    seen = []
    tiny_model.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                     with_kwargs=True)
    for p in tiny_model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    seconds, steps, tokens = evaluate.train_for(tiny_model, tokenizer, examples, optimizer,
                                                LearnConfig(batch_size=2), budget_s=0.3, replay=replay,
                                                replay_per_batch=1)
    assert steps >= 1 and tokens > 0 and 0.3 <= seconds < 5
    assert set(seen) == {3}  # 2 learned examples + 1 replay example per batch


# ---------------------------------------------------------------- end to end

@pytest.fixture
def model_dir(tmp_path, tokenizer, tiny_model, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_eval(tmp_path, model_dir, data, methods, *extra):
    out = tmp_path / "out" / "eval.json"
    code = cli.main(["eval", "--data", str(data), "--methods", methods, "--limit", "2", "--model", str(model_dir),
                     "--json", str(out), "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "6",
                     *SMALL_MEMORY, *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_eval_end_to_end_writes_the_documented_json(tmp_path, model_dir, capsys):
    methods = "memory,rag,base" + (",lora,lora_replay" if evaluate.peft_available() else "") + ",full"
    data = write_json(tmp_path / "facts.json", FACTS)
    retention = write_json(tmp_path / "retention.json", RETENTION)
    report = run_eval(tmp_path, model_dir, data, methods, "--retention", str(retention))
    assert list(report["methods"]) == methods.split(",")
    for name, result in report["methods"].items():
        for key in ("learned_acc", "train_fit_acc", "retention_acc", "prompt_tokens_per_question", "train_s",
                    "train_tokens_per_s", "memory_mb"):
            assert isinstance(result[key], (int, float)), (name, key)
        assert 0 <= result["learned_acc"] <= 1 and 0 <= result["retention_acc"] <= 1
    memory, rag, base = (report["methods"][m] for m in ("memory", "rag", "base"))
    assert memory["memory_mb"] > 0 and memory["train_tokens_per_s"] > 0 and memory["train_steps"] == 2
    assert rag["memory_mb"] == base["memory_mb"] == 0 and rag["train_s"] == base["train_s"] == 0
    prompt_tokens = {m: report["methods"][m]["prompt_tokens_per_question"] for m in ("memory", "rag", "base")}
    assert prompt_tokens["rag"] > prompt_tokens["memory"] == prompt_tokens["base"]
    assert base["retention_acc"] == base["retention_before"] and base["forgotten_samples"] == []
    assert all(set(s) == {"question", "gold", "before", "after"} for s in memory["forgotten_samples"])
    for result in (memory, base):  # the missed questions are those that lower the accuracy
        assert len(result["missed_samples"]) == round(2 * (1 - result["learned_acc"]))
    full = report["methods"]["full"]
    assert full["train_s"] >= memory["train_s"] and full["memory_mb"] > memory["memory_mb"] / 100
    assert report["command"].startswith("engram eval ") and "--methods" in report["command"]
    assert report["model"] == str(model_dir) and report["data"] == str(data) and report["date"]
    assert report["learned_items"] == 2 and report["kind"] == "qa"
    assert "| memory |" in capsys.readouterr().out


def test_eval_sequential_on_passages(tmp_path, model_dir, capsys):
    plot = tmp_path / "plot.png"
    report = run_eval(tmp_path, model_dir, write_json(tmp_path / "squad.json", PASSAGES), "base", "--sequential", "2",
                      "--plot", str(plot), "--protect-learned", "2")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert report["kind"] == "squad" and report["questions"] == 3
    sequential = report["sequential"]
    assert sequential["batches"] == 2 and len(sequential["first_batch_recall"]) == 2
    assert [s["items"] for s in sequential["steps"]] == [1, 1]
    assert "learned_f1" in report["methods"]["base"]
    assert "first-batch acc" in capsys.readouterr().out


def test_eval_rejects_unknown_methods_and_a_missing_budget(tmp_path, model_dir):
    data = write_json(tmp_path / "facts.json", FACTS)
    with pytest.raises(SystemExit, match="unknown methods"):
        run_eval(tmp_path, model_dir, data, "memory,magic")
    with pytest.raises(SystemExit, match="--budget-s"):
        run_eval(tmp_path, model_dir, data, "full,base")


def test_lora_is_skipped_with_a_notice_when_peft_is_missing(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "peft_available", lambda: False)
    report = run_eval(tmp_path, model_dir, write_json(tmp_path / "facts.json", FACTS), "lora,base", "--budget-s", "1")
    assert report["methods"]["lora"] == {"skipped": "peft is not installed"}
    assert "skipping lora: peft is not installed" in capsys.readouterr().out


def test_the_recorded_command_parses_back_to_the_same_options():
    parser = evaluate.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "d.json", "--write-at", "question", "--addressing", "ngram", "--no-calibrate",
                              "--retention", "a", "b", "--top-t", "512"])
    words = shlex.split(evaluate.command_line(args))
    assert words[:2] == ["engram", "eval"] and "True" not in words
    assert vars(parser.parse_args(words[2:])) == vars(args)


@pytest.mark.parametrize("given, expected", [
    (["--addressing", "ngram"], ("question", 64, 0.0)),
    ([], ("answer", 0, None)),
    (["--addressing", "ngram", "--write-at", "both", "--background-questions", "0", "--max-background-share", "1"],
     ("both", 0, 1.0)),
])
def test_slot_options_left_out_follow_the_addressing(given, expected):
    parser = evaluate.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "d.json", *given])
    options = evaluate.options_from_args(args)
    assert (options.learn.write_at, options.background_questions, options.learn.max_background_share) == expected
    assert vars(parser.parse_args(shlex.split(evaluate.command_line(args))[2:])) == vars(args)


def test_a_negative_number_of_background_questions_is_a_usage_error(capsys):
    parser = evaluate.add_eval_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d.json", "--background-questions", "-1"])
    assert "must be 0 or more" in capsys.readouterr().err
