"""KV-cache compression quality on SmolLM2-135M-Instruct: full-precision cache vs int4 vs int2.

    OMP_NUM_THREADS=1 python scripts/kv_quality.py [--text-offset N] [--questions N] [--out eval_results/kv_quality.json]

Measures, per cache setting:
  * perplexity of a fixed text (the first SQuAD dev passages in ../shared/data, `--text-tokens`
    tokens): a `--prefill`-token prompt, then `--chunk` new tokens per step through the packed decode
    attention (causal within the step), so every later token attends to the quantized cache as in
    generation (`--chunk 1` is generation exactly; 16 is 16x cheaper on CPU);
  * answer accuracy on the first `--questions` questions of each retention_*.json (greedy,
    chat-formatted, gold answer contained in the answer). Questions are ~50 tokens, shorter than the
    default 128-token residual window, so retention runs in a stress setting: residual window 0,
    group 32, every whole group of the prompt and answer is quantized;
  * variants beyond plain KIVI: int2 with group 32; the first 16 tokens (attention sinks) kept in full
    precision (`sink_length=16`); keys quantized over the middle 70% of each group's range
    (`key_clip=0.7`); keys and values stored rotated (`rotate=True`). The clip ratio was chosen on
    this text; `--text-offset 1536` runs the same settings on the next, unseen slice;
  * KV bytes per token: the packed store alone (the long-context rate) and everything held at the
    end of the text with the residual window counted at bf16 size, each against a bf16 cache.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from engram_kernels.modules.kv_cache import QuantizedKVCache, enable_packed_kv_attention
from engram_kernels.trainer.dreaming import format_prompt
from engram_kernels.trainer.evaluate import load_retention, score_answers
from engram_kernels.trainer.models import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
BF16_BYTES = 2


def fixed_text_ids(tokenizer, n_tokens, offset=0):
    passages = [p["context"] for p in json.loads((DATA / "squad_dev.json").read_text())]
    ids = tokenizer("\n\n".join(passages), add_special_tokens=False).input_ids
    if len(ids) < offset + n_tokens:
        raise ValueError(f"the fixed text has only {len(ids)} tokens, asked for {offset} + {n_tokens}")
    return torch.tensor([ids[offset:offset + n_tokens]])


def make_cache(model, setting):
    """The cache a setting names; options it leaves out are off (plain KIVI), not the class defaults."""
    return None if setting["bits"] is None else QuantizedKVCache(
        model.config, bits=setting["bits"], group_size=setting["group_size"],
        residual_length=setting["residual_length"], sink_length=setting.get("sink_length", 0),
        key_clip=setting.get("key_clip", 1.0), rotate=setting.get("rotate", False))


@torch.no_grad()
def perplexity(model, ids, setting, prefill, chunk):
    """exp(mean NLL) of ids[prefill:], decoding `chunk` tokens per step after a `prefill`-token prompt."""
    cache = make_cache(model, setting)
    if cache is None:  # full precision: one forward is the same computation
        logits = model(ids).logits[0, prefill - 1:-1]
        return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, prefill:]).item()), None
    logits = [model(ids[:, :prefill], past_key_values=cache).logits[0, -1:]]
    for t in range(prefill, ids.shape[1] - 1, chunk):
        logits.append(model(ids[:, t:min(t + chunk, ids.shape[1] - 1)], past_key_values=cache).logits[0])
    nll = torch.nn.functional.cross_entropy(torch.cat(logits), ids[0, prefill:])
    return math.exp(nll.item()), cache


def bytes_per_token(model, cache):
    """(packed-store bytes per packed token, all bytes per token with the residual in bf16)."""
    cfg = model.config
    per_token_bf16 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * BF16_BYTES
    packed = sum(layer.packed.nbytes() for layer in cache.layers)
    packed_tokens = cache.layers[0].packed.num_tokens
    residual_tokens = cache.layers[0].keys.shape[2]  # sinks and residual window
    total = (packed + residual_tokens * per_token_bf16) / (packed_tokens + residual_tokens)
    return packed / packed_tokens, total, per_token_bf16


@torch.no_grad()
def answer(model, tokenizer, question, setting, max_new_tokens):
    ids = tokenizer(format_prompt(tokenizer, question), add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, past_key_values=make_cache(model, setting), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def retention(model, tokenizer, setting, n_questions, max_new_tokens):
    scores = {}
    for path in sorted(DATA.glob("retention_*.json")):
        questions = load_retention(path, n_questions)
        answers = [answer(model, tokenizer, q.question, setting, max_new_tokens) for q in questions]
        scores[path.stem] = score_answers("retention", questions, answers)["acc"]
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def settings(group_size, residual_length):
    full = {"name": "fp", "bits": None}
    base = {"group_size": group_size, "residual_length": residual_length}
    tuned = {"sink_length": 16, "key_clip": 0.7}  # QuantizedKVCache's int2 defaults (int4: sinks only)
    packed = [{"name": "int4", "bits": 4, **base}, {"name": "int4-rot", "bits": 4, **base, "rotate": True},
              {"name": "int4-sink16", "bits": 4, **base, "sink_length": 16},
              {"name": "int2", "bits": 2, **base}, {"name": "int2-g32", "bits": 2, **base, "group_size": 32},
              {"name": "int2-sink16", "bits": 2, **base, "sink_length": 16},
              {"name": "int2-sink16-clip0.7", "bits": 2, **base, **tuned},
              {"name": "int2-sink16-clip0.7-rot", "bits": 2, **base, **tuned, "rotate": True}]
    stress = {"group_size": 32, "residual_length": 0}
    stressed = [{"name": "int4-r0-g32", "bits": 4, **stress}, {"name": "int2-r0-g32", "bits": 2, **stress},
                {"name": "int2-r0-g32-sink16-clip0.7", "bits": 2, **stress, **tuned}]
    return full, packed, stressed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-tokens", type=int, default=1536)
    parser.add_argument("--chunk", type=int, default=16, help="new tokens per decode step in the perplexity run")
    parser.add_argument("--text-offset", type=int, default=0,
                        help="first token of the text (a later slice checks settings chosen on the first)")
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--questions", type=int, default=15, help="per retention file (0: skip retention)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "eval_results" / "kv_quality.json"))
    args = parser.parse_args(argv)

    start = time.time()
    model, tokenizer = load_model()
    enable_packed_kv_attention(model)
    ids = fixed_text_ids(tokenizer, args.text_tokens, args.text_offset)
    full, packed, stress = settings(args.group_size, args.residual_length)
    rows = []
    for setting in [full, *packed, *stress]:
        began = time.time()
        ppl, cache = perplexity(model, ids, setting, args.prefill, args.chunk)
        row = {**setting, "perplexity": round(ppl, 4)}
        if cache is not None:
            packed_rate, total_rate, bf16_rate = bytes_per_token(model, cache)
            row.update(packed_bytes_per_token=round(packed_rate, 1), bytes_per_token=round(total_rate, 1),
                       ratio_vs_bf16=round(bf16_rate / total_rate, 2),
                       packed_ratio_vs_bf16=round(bf16_rate / packed_rate, 2))
        else:
            cfg = model.config
            row.update(bytes_per_token=2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * BF16_BYTES,
                       ratio_vs_bf16=1.0)
        if args.questions and (setting is full or setting in stress):
            row["retention"] = retention(model, tokenizer, setting, args.questions, args.max_new_tokens)
        row["seconds"] = round(time.time() - began, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        row["perplexity_increase"] = round(row["perplexity"] - rows[0]["perplexity"], 4)
    result = {"model": "SmolLM2-135M-Instruct (fp32 on CPU)", "text": f"SQuAD dev passages joined, tokens "
              f"{args.text_offset}..{args.text_offset + args.text_tokens}, {args.prefill}-token prefill then "
              f"{args.chunk} tokens per step",
              "retention": f"first {args.questions} questions of each retention file, greedy, "
                           f"{args.max_new_tokens} new tokens; quantized caches in the r0-g32 stress setting",
              "settings": rows, "seconds": round(time.time() - start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    print(f"written to {out} in {result['seconds']} s")


def markdown(rows):
    lines = ["| cache | bytes/token (x smaller than bf16) | packed-only bytes/token (x) | perplexity (increase) | "
             "retention acc |", "|---|---|---|---|---|"]
    for r in rows:
        packed = (f"{r['packed_bytes_per_token']:,} ({r['packed_ratio_vs_bf16']}x)"
                  if "packed_bytes_per_token" in r else "")
        ret = f"{r['retention']['mean']:.3f}" if "retention" in r else ""
        lines.append(f"| {r['name']} | {r['bytes_per_token']:,} ({r['ratio_vs_bf16']}x) | {packed} | "
                     f"{r['perplexity']:.3f} ({r['perplexity_increase']:+.3f}) | {ret} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
