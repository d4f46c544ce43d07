"""PNG plots of `engram eval` results: learned vs retained per method, and first-batch recall over a
sequential run.

    python -m engram_kernels.trainer.plot RESULTS.json [MORE.json ...] --out PLOT.png
    engram eval ... --json RESULTS.json --plot PLOT.png

Needs matplotlib (`pip install "engram_kernels[eval]"`); it is imported only here.
"""
import argparse
import json
import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'engram_kernels[eval]'") from exc
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def _tradeoff(ax, reports):
    """Learned accuracy against retention after learning, one point per method and results file."""
    for name, report in reports:
        for method, result in _scored(report):
            retention = result.get("retention_acc")
            if retention is None:
                continue
            ax.scatter(retention, result["learned_acc"], s=40)
            ax.annotate(f"{method} ({name})" if len(reports) > 1 else method, (retention, result["learned_acc"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        before = next((r.get("retention_before") for r in report.get("methods", {}).values()
                       if r.get("retention_before") is not None), None)
        if before is not None:
            ax.axvline(before, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("retention accuracy after learning (dotted: before)")
    ax.set_ylabel("learned accuracy (closed book)")
    ax.set_title("learned vs retained")
    ax.grid(alpha=0.3)


def _learned(ax, reports):
    """Learned accuracy per method, for runs without retention questions."""
    labels, heights = [], []
    for name, report in reports:
        for method, result in _scored(report):
            labels.append(f"{method} ({name})" if len(reports) > 1 else method)
            heights.append(result["learned_acc"])
    ax.bar(range(len(heights)), heights)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("learned accuracy (closed book)")
    ax.set_title("learned (no retention questions in this run)")


def _scored(report):
    return [(m, r) for m, r in report.get("methods", {}).items()
            if "skipped" not in r and r.get("learned_acc") is not None]


def _sequential(ax, reports):
    longest = 0
    for name, report in reports:
        recall = (report.get("sequential") or {}).get("first_batch_recall")
        if recall:
            ax.plot(range(1, len(recall) + 1), recall, marker="o", label=name)
            longest = max(longest, len(recall))
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("learn call")
    ax.set_ylabel("first-batch accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("first batch over sequential learns")
    ax.grid(alpha=0.3)
    if len(reports) > 1:
        ax.legend(fontsize=8)


def plot_reports(reports, out_path):
    """reports: [(label, engram eval JSON dict)]. Writes one PNG with the panels the data allow."""
    with_retention = any(r.get("retention_acc") is not None for _, report in reports for _, r in _scored(report))
    with_methods = any(_scored(report) for _, report in reports)
    panels = [p for p, wanted in ((_tradeoff, with_retention), (_learned, with_methods and not with_retention),
                                  (_sequential, any(r.get("sequential") for _, r in reports))) if wanted]
    if not panels:
        raise ValueError("nothing to plot: the results hold neither methods nor a sequential run")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        panel(ax, reports)
    data = {r.get("data") for _, r in reports if r.get("data")}
    model = {r.get("model") for _, r in reports if r.get("model")}
    fig.suptitle(", ".join(sorted(str(x) for x in model | data)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="engram eval --json files")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    reports = [(Path(p).stem, json.loads(Path(p).read_text())) for p in args.results]
    print(plot_reports(reports, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
