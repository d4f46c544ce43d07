"""How specific are memory-slot reads? The limit behind the memory method's forgetting, measured.

    OMP_NUM_THREADS=1 python scripts/slot_overlap.py [--configs 4x256 4x256:raw ...]
        [--out eval_results/slot_overlap.json]

For a fresh memory layer (k slots per head x 4 heads, n_keys**2 slots, at the middle decoder layer
of SmolLM2-135M-Instruct, seed 0 as in `engram eval`; queries calibrated on the background text,
or, with ":raw", the random projection as drawn), counts the slots read where a target token
is predicted (what a learn may write, see learn.target_slot_counts) for:
  * the first 25 tofu_dev facts in 5 batches of 5 (the sequential run's batches);
  * the gold answers of the 40 retention questions the evaluation asks (20 per file);
  * the background text the TF-IDF ranking compares against.
and reports which share of one set's reads lands on slots another set also reads. A share near 1
means the other set's learn writes nearly every slot this one reads: no slot ranking can keep them
apart, whatever t is.
"""
import argparse
import json
import sys
from pathlib import Path

from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.evaluate import EvalOptions, Harness, load_eval_data, load_retention
from engram_kernels.trainer.learn import target_slot_counts
from engram_kernels.trainer.models import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def reads(model, tokenizer, examples):
    counts, _ = target_slot_counts(model, tokenizer, examples, 128)
    (_, slots), = counts.items()
    return slots.float()


def share_on(counts, other):
    """Share of `counts`' reads on slots that `other` reads too."""
    return round(float(counts[other > 0].sum() / counts.sum()), 3)


def measure(base, tokenizer, k, n_keys, calibrate):
    memory = dict(heads=4, k=k, n_keys=n_keys, key_dim=256)
    data = load_eval_data(DATA / "tofu_dev.json", 25)
    retention = [q for name in ("retention_world_facts.json", "retention_real_authors.json")
                 for q in load_retention(DATA / name, 20)]
    options = EvalOptions(memory=memory, background_sequences=64, calibrate=calibrate)
    harness = Harness(base, tokenizer, data, retention, options, log=lambda *_: None)
    model, background = harness.fresh_memory()
    batches = [reads(model, tokenizer, harness.training_examples(data.documents[5 * i:5 * i + 5])) for i in range(5)]
    asked = reads(model, tokenizer, [Example(q.question, q.answers[0], "qa", "retention", "") for q in retention])
    background = next(iter(background.values())).float()
    facts = sum(batches)
    return {"k": k, "n_keys": n_keys, "slots": n_keys ** 2, "calibrated": calibrate,
            "slots_read_per_batch": [int((b > 0).sum()) for b in batches],
            "batch1_share_on_batch_j": [share_on(batches[0], b) for b in batches[1:]],
            "batch1_share_on_batches_2_to_5": share_on(batches[0], sum(batches[1:])),
            "retention_share_on_facts": share_on(asked, facts),
            "retention_share_on_background": share_on(asked, background),
            "facts_share_on_background": share_on(facts, background)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["32x256:raw", "4x256:raw", "4x256", "4x512"],
                        metavar="KxN_KEYS[:raw]")
    parser.add_argument("--out", default=str(ROOT / "eval_results" / "slot_overlap.json"))
    args = parser.parse_args(argv)
    base, tokenizer = load_model()
    rows = []
    for config in args.configs:
        size, _, raw = config.partition(":")
        k, n_keys = map(int, size.split("x"))
        rows.append(measure(base, tokenizer, k, n_keys, calibrate=raw != "raw"))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "memory_layer": "middle (15)",
                                          "command": " ".join(["python scripts/slot_overlap.py", *(sys.argv[1:] if argv is None else argv)]),
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
