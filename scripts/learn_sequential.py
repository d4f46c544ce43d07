"""K `engram learn` calls in a row on one home, through the command line itself: how much of the first
batch each later learn leaves answered.

    OMP_NUM_THREADS=1 python scripts/learn_sequential.py --data ../shared/data/tofu_dev.json --limit 25 \
        --batches 5 --retention ../shared/data/retention_world_facts.json ../shared/data/retention_real_authors.json \
        --json eval_results/OUT.json -- --addressing ngram --layers 8

`engram eval --sequential K` trains in one process; this runs what a user runs: each batch is written to
a file (facts as question/answer JSONL, passages as text) and learned by `engram learn FILE --home HOME
[LEARN OPTIONS]` (journal, dreaming, skipping known examples, a memory version per learn, and what the
home keeps of earlier learns), then the first batch's and the new batch's questions are asked closed-book.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram_kernels.trainer import cli
from engram_kernels.trainer.evaluate import closed_book_prompt, generate_answers, load_eval_data, load_retention
from engram_kernels.trainer.evaluate import score_answers
from engram_kernels.trainer.models import load_model


def write_batch(data, items, path):
    """The batch's facts as question/answer JSONL, or its passages as one text file each."""
    if data.kind == "qa":
        path = path.with_suffix(".jsonl")
        facts = [data.documents[i] for i in items]
        path.write_text("".join(json.dumps({"question": d.question, "answer": d.answer}) + "\n" for d in facts))
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    files = [path / f"passage{i}.txt" for i in items]
    for file, i in zip(files, items):
        file.write_text(data.documents[i].text)
    return files


def ask(model, tokenizer, kind, questions, max_new_tokens):
    answers, _ = generate_answers(model, tokenizer, [closed_book_prompt(tokenizer, q.question) for q in questions],
                                  max_new_tokens)
    return score_answers(kind, questions, answers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--retention", nargs="*", default=[])
    parser.add_argument("--home", help="engram home (default: a fresh temporary folder)")
    parser.add_argument("--json", required=True)
    parser.add_argument("learn_options", nargs=argparse.REMAINDER, help="after --: options for every engram learn")
    args = parser.parse_args(argv)
    learn_options = [o for o in args.learn_options if o != "--"]
    data = load_eval_data(args.data, args.limit)
    retention = [q for path in args.retention for q in load_retention(path)]
    n = len(data.documents)
    groups = [list(range(n * i // args.batches, n * (i + 1) // args.batches)) for i in range(args.batches)]
    home = Path(args.home or tempfile.mkdtemp(prefix="engram-sequential-"))
    max_new = 64 if data.kind == "qa" else 32
    steps = []
    report = {"command": " ".join(["python", "scripts/learn_sequential.py", *sys.argv[1:]]), "data": args.data,
              "learn_options": learn_options, "kind": data.kind, "items": n,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": torch.get_num_threads(),
              "sequential": {"batches": args.batches, "steps": steps}}  # shaped as engram eval's, for its plot
    if retention:
        model, tokenizer = load_model(None)
        report["retention_before"] = ask(model, tokenizer, "retention", retention, 32)["acc"]
        print(f"retention before: {report['retention_before']:.3f}", flush=True)
    first = [q for q in data.questions if q.item in groups[0]]
    for index, group in enumerate(groups, 1):
        files = write_batch(data, group, home.parent / f"{home.name}-batch{index}")
        start = time.perf_counter()
        cli.main(["learn", *map(str, files), "--home", str(home), *learn_options])
        learn_s = time.perf_counter() - start
        model, tokenizer, store = cli.open_model(home, argparse.Namespace(model=None))
        current = [q for q in data.questions if q.item in group]
        step = {"learn": index, "items": len(group), "learn_s": round(learn_s, 1),
                "slots_changed": sum(store.manifest(store.current())["rows_changed"].values()),
                "first_batch_acc": ask(model, tokenizer, data.kind, first, max_new)["acc"],
                "batch_acc": ask(model, tokenizer, data.kind, current, max_new)["acc"]}
        steps.append(step)
        print(f"learn {index}/{args.batches}: {step}", flush=True)
    recall = report["sequential"]["first_batch_recall"] = [s["first_batch_acc"] for s in steps]
    report["sequential"]["first_batch_retained"] = recall[-1] / recall[0] if recall[0] else None
    if retention:
        report["sequential"]["retention_acc"] = ask(model, tokenizer, "retention", retention, 32)["acc"]
        print(f"retention after: {report['sequential']['retention_acc']:.3f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
