"""Can any memory addressing at the answer position carry a learned fact over to a reworded question?

    OMP_NUM_THREADS=1 python scripts/paraphrase_neighbours.py [--limit 6] [--lookup-layers 15 27]
        [--out eval_results/squad6-paraphrase-neighbours.json]

A memory layer reads slots by the hidden state at the position that predicts the answer. For each
SQuAD test question of the first `--limit` passages whose gold answer is the target of some training
question (`engram eval`'s examples for those passages), this compares that hidden state, at every
decoder layer of SmolLM2-135M-Instruct, with the same position of every training question (cosine
after centering on the training questions). If the nearest training question is rarely one with the
test question's answer, no lookup keyed on that state, however its keys are trained, sends the test
question to the slots its answer was written into.

Then, for a fresh memory (as `engram eval` adds it: calibrated, k 4, seed 0) at each of
`--lookup-layers`, the lookup itself: the share of a test question's first-answer read weight that
lands on slots the same-answer training questions read there, and on slots only other ones read.
"""
import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engram_kernels.integrations import memory_layers
from engram_kernels.trainer.dreaming import Example
from engram_kernels.trainer.evaluate import EvalOptions, Harness, load_eval_data, normalize_answer
from engram_kernels.trainer.learn import encode
from engram_kernels.trainer.models import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


@torch.no_grad()
def answer_states(model, tokenizer, example):
    """(layers, dim): each decoder layer's output where the first answer token is predicted (the
    embeddings are left out: that token is the chat template's last, the same for every question)."""
    encoded = encode(tokenizer, example, 128)
    out = model(input_ids=torch.tensor([encoded.ids]), output_hidden_states=True, logits_to_keep=1)
    return torch.stack([h[0, encoded.target_start - 1] for h in out.hidden_states[1:]])


def layer_row(layer, train_states, tests):
    """Where the nearest same-answer training question ranks among the other-answer ones."""
    keys = train_states[:, layer]
    mean = keys.mean(0)
    keys = F.normalize(keys - mean, dim=-1)
    ranks = []
    for state, same in tests:
        sims = keys @ F.normalize(state[layer] - mean, dim=-1)
        ranks.append(int((sims[~same] > sims[same].max()).sum()))
    return {"layer": layer, "nearest_is_same_answer": round(sum(r == 0 for r in ranks) / len(ranks), 3),
            "in_top5": round(sum(r < 5 for r in ranks) / len(ranks), 3), "median_rank": statistics.median(ranks)}


@torch.no_grad()
def lookup_row(harness, layer, train, tests):
    """Mean share of each test question's read weight (over all heads) on same-answer / other slots."""
    harness.options = dataclasses.replace(harness.options, layers=[layer])
    harness.counts_cache = None  # the eval's cached counts are for its own layer
    model, _ = harness.fresh_memory()
    (memory,) = memory_layers(model).values()
    seen = {}
    hook = memory.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))

    def reads(example):
        encoded = encode(harness.tokenizer, example, 128)
        model(input_ids=torch.tensor([encoded.ids]), logits_to_keep=1)
        ids, weights = memory.lookup(seen["x"][0, encoded.target_start - 1])
        return ids[0], weights[0] / memory.heads

    train_slots = [reads(e)[0] for e in train]
    same_share, other_share = [], []
    for question, same in tests:
        ids, weights = reads(question)
        on_same = torch.isin(ids, torch.cat([s for s, hit in zip(train_slots, same) if hit]))
        on_other = torch.isin(ids, torch.cat([s for s, hit in zip(train_slots, same) if not hit])) & ~on_same
        same_share.append(float(weights[on_same].sum()))
        other_share.append(float(weights[on_other].sum()))
    hook.remove()
    return {"layer": layer, "k": memory.k, "weight_on_same_answer_slots": round(statistics.mean(same_share), 3),
            "weight_on_other_answer_slots": round(statistics.mean(other_share), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6, help="SQuAD passages")
    parser.add_argument("--lookup-layers", type=int, nargs="*", default=[15, 27])
    parser.add_argument("--out", default=str(ROOT / "eval_results" / "squad6-paraphrase-neighbours.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    data = load_eval_data(DATA / "squad_dev.json", args.limit)
    harness = Harness(model, tokenizer, data, [], EvalOptions(), log=lambda *_: None)
    train = [e for e in harness.examples if e.kind == "qa"]
    train_states = torch.stack([answer_states(model, tokenizer, e) for e in train])
    tests = []
    for q in data.questions:
        gold = normalize_answer(q.answers[0])
        same = torch.tensor([bool(gold) and gold in normalize_answer(e.target) for e in train])
        if same.any():
            tests.append((Example(q.question, q.answers[0], "qa", "test", ""), same))
    states = [(answer_states(model, tokenizer, question), same) for question, same in tests]
    rows = [layer_row(layer, train_states, states) for layer in range(train_states.shape[1])]
    lookups = [lookup_row(harness, layer, train, tests) for layer in args.lookup_layers]
    for row in rows + lookups:
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "passages": args.limit, "training_questions": len(train),
        "test_questions": len(tests), "layer": "decoder layer whose output is compared",
        "command": " ".join(["python scripts/paraphrase_neighbours.py", *(sys.argv[1:] if argv is None else argv)]),
        "rows": rows, "lookups": lookups}, indent=1))


if __name__ == "__main__":
    main()
