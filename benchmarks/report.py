"""Markdown tables from benchmark result files, one table per file.

    python benchmarks/report.py benchmarks/results/*.json

Reads the files conftest.py writes and pytest-benchmark's --benchmark-json output alike (both hold
a "benchmarks" list with params, extra_info and stats). The last column compares each row with the
baseline its op family is judged against, for the same op, config and pass: the torch reference for
the memory ops ("speedup vs torch"), stock SDPA over the uncompressed cache for KV decode
("speedup vs sdpa"), transformers' DynamicCache for whole decode steps (kv_generate, "speedup vs
dynamic"; a row is STEPS tokens), and for LoRA the frozen layer without an adapter ("time / base", the
overhead a LoRA layer adds; 1.00 is the floor). On GPUs "mean ms" is the time per call
of calls launched back to back; "sync call ms" the latency of one call followed by a synchronize.
"""
import json
import sys
from pathlib import Path

OPS = ("gather", "topk", "lookup", "adam_step", "lora", "kv_decode_int4", "kv_decode_int2", "kv_generate")
CONFIGS = ("smollm2", "large", "large4096", "llama8b", "multi8", "multi64")
PASSES = ("fwd", "bwd", "fwd_bwd", "decode")
BACKENDS = ("base", "sdpa", "dynamic", "torch", "torch_best", "peft", "loop", "hf_quanto", "compiled", "cpu", "triton",
            "cuda", "int4", "int2")
COLUMNS = ("op", "config", "pass", "backend", "mean ms", "sync call ms", "GB/s", "% peak", "% roofline", "peak MB",
           "largest alloc MB", "vs baseline")
MEASURED = ("gbps", "pct_peak", "pct_roofline", "peak_mb", "largest_alloc_mb")  # extra_info keys


def order(values, value):
    return values.index(value) if value in values else len(values)


def row_of(bench):
    params, info = bench.get("params") or {}, bench.get("extra_info") or {}
    op = info.get("op") or bench["name"].split("[")[0].removeprefix("test_")
    return {"op": op, "config": params.get("config"), "pass": params.get("pass_"),
            "backend": params.get("backend"), "mean_s": bench["stats"]["mean"], "info": info}


def sort_key(row):
    return (order(OPS, row["op"]), order(CONFIGS, row["config"]), order(PASSES, row["pass"]),
            order(BACKENDS, row["backend"]))


def number(value, digits=1):
    return "" if value is None else f"{value:,.{digits}f}"


def baseline_backend(op):
    """(backend, how the column reads) each op family is compared with."""
    if op == "kv_generate":
        return "dynamic", "speedup vs dynamic"
    if op.startswith("kv_"):
        return "sdpa", "speedup vs sdpa"
    if op == "lora":
        return "base", "time / base"
    return "torch", "speedup vs torch"


def baseline_key(row):
    """KV decode: the sdpa rows are timed once per config, under the int4 op only."""
    op = "kv" if row["op"].startswith("kv_decode") else row["op"]
    return op, row["config"], row["pass"]


def compare(row, baseline_s):
    if not baseline_s:
        return ""
    _, how = baseline_backend(row["op"])
    ratio = row["mean_s"] / baseline_s if how.startswith("time") else baseline_s / row["mean_s"]
    return f"{ratio:.2f}x {how.split()[0] if how.startswith('speedup') else 'of base'}"


def table(rows):
    baselines = {}
    for r in rows:
        if r["backend"] == baseline_backend(r["op"])[0]:
            baselines[baseline_key(r)] = r["mean_s"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rows, key=sort_key):
        ref = baselines.get(baseline_key(r))
        info = r["info"]
        measured = [number(info.get(key)) for key in MEASURED]
        cells = [r["op"], r["config"], r["pass"], r["backend"], number(r["mean_s"] * 1e3, 2),
                 number(info.get("sync_call_ms"), 2), *measured, compare(r, ref)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def heading(data, path):
    device = data.get("device") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown device")
    git = data.get("git") or data.get("commit_info") or {}
    commit = git.get("commit") or git.get("id") or "unknown"
    commit = commit[:12] + (" (dirty)" if git.get("dirty") else "") if commit.isalnum() else commit
    peak = data.get("peak_gbps")
    details = [f"torch {data['torch']}" if data.get("torch") else None,
               f"triton {data['triton']}" if data.get("triton") else None,
               f"peak {peak:g} GB/s ({data.get('peak_gbps_source', '')})" if peak else None,
               f"commit {commit}", data.get("date") or data.get("datetime")]
    return f"### {device}\n\n{Path(path).name}: " + ", ".join(d for d in details if d)


def report(paths):
    sections = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = [row_of(b) for b in data.get("benchmarks", []) if b.get("stats")]
        sections.append(heading(data, path) + "\n\n" + (table(rows) if rows else "(no benchmarks)"))
    return "\n\n".join(sections)


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(report(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
