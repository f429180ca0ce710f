"""``fastsel report``: a markdown report and PNG plots from a saved results.json."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from .tables import aggregate, format_table, verdict

#: The plots every report has; ``selection_counts_<budget>.png`` come beside them, one per budget.
PLOTS = ("accuracy_vs_budget.png", "accuracy_vs_time.png")
MARKERS = "osD^v<>Pp*hX"


def load_results(out_dir: str) -> Dict[str, Any]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.json in {out_dir!r}: run `fastsel compare --out {out_dir}` first")
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "runs" not in doc or not doc["runs"]:
        raise ValueError(f"{path!r} is not a fastsel results file (no runs)")
    return doc


def _policies(runs: List[Dict[str, Any]]) -> List[str]:
    return list(dict.fromkeys(r["policy"] for r in runs))


def plot(doc: Dict[str, Any], out_dir: str) -> List[str]:
    """Accuracy against budget per policy, accuracy against wall time (colour: policy,
    marker: budget), and per budget the histogram of per-sample selection counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    rows = aggregate(runs)
    written = []
    timed = any(r["budget"].endswith("s") for r in runs)

    fig, ax = plt.subplots(figsize=(6, 4))
    full = next((r for r in rows if r["policy"] == "full"), None)

    for p in _policies(runs):
        if p == "full":
            continue
        pr = [r for r in rows if r["policy"] == p]
        xs = [float(r["budget"].rstrip("s")) for r in pr]
        ax.errorbar(xs, [r["accuracy"] for r in pr], yerr=[r["accuracy_std"] for r in pr],
                    marker="o", capsize=3, label=p)
    if full is not None:
        ax.axhline(full["accuracy"], color="k", linestyle="--", label="full training")
    written.append(_finish(fig, ax, "time budget (s)" if timed else "budget (fraction of full training)",
                           "test accuracy (%)", "Accuracy against budget", out_dir, PLOTS[0]))

    colours = {p: f"C{i % 10}" for i, p in enumerate(_policies(runs))}
    budgets = list(dict.fromkeys(r["budget"] for r in runs))
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for p in _policies(runs):
        for b in budgets:
            pr = [r for r in runs if r["policy"] == p and r["budget"] == b]
            if pr:
                ax.scatter([r["wall_s"] for r in pr], [100 * r["accuracy"] for r in pr], s=24,
                           color=colours[p], marker=markers[b], label=f"{p} @ {b}")
    written.append(_finish(fig, ax, "wall-clock time (s)", "test accuracy (%)",
                           "Accuracy against wall time (every run; colour: policy, marker: budget)",
                           out_dir, PLOTS[1]))

    for b in [b for b in budgets if any(r["budget"] == b and r["policy"] != "full" for r in runs)]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in _policies(runs):
            pr = [r for r in runs if r["policy"] == p and (p == "full" or r["budget"] == b)][:1]
            if not pr:
                continue
            pts = [(i, c) for i, c in enumerate(pr[0]["selection_counts"]) if c > 0]  # log scale
            ax.plot([i for i, _ in pts], [c for _, c in pts], marker="o", color=colours[p], label=p)
        ax.set_yscale("log")
        written.append(_finish(fig, ax, "times a sample was selected", "samples",
                               f"Per-sample selection counts at budget {b} (first seed)", out_dir,
                               selection_plot(b)))
    plt.close("all")
    return written


def selection_plot(budget: str) -> str:
    """The file name of one budget's selection-count plot."""
    return f"selection_counts_{budget.replace('.', '_')}.png"


def plots(doc: Dict[str, Any]) -> List[str]:
    """Every plot a report of ``doc`` has."""
    budgets = dict.fromkeys(r["budget"] for r in doc["runs"] if r["policy"] != "full")
    return list(PLOTS) + [selection_plot(b) for b in budgets]


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, out_dir: str, name: str) -> str:
    """Label, lay out and save one figure; returns its path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def markdown(doc: Dict[str, Any]) -> str:
    rows = aggregate(doc["runs"])
    meta = doc.get("meta", {})
    m = meta.get("machine", {})
    lines = ["# fastsel comparison", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    if m:
        dev = m.get("gpu") or f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('threads')} threads)"
        lines += [f"Machine: {dev}; torch {m.get('torch')}; {meta.get('date', '')}", ""]
    if meta.get("dataset"):
        lines += [f"Dataset: {meta['dataset']}", ""]
    lines += [format_table(rows, markdown=True), "", verdict(rows, doc["runs"]), ""]
    lines += [f"![{p}]({p})" for p in plots(doc)]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str) -> str:
    """Render results.md and the plots next to results.json; returns the markdown path."""
    doc = load_results(out_dir)
    plot(doc, out_dir)
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write(markdown(doc))
    return path
