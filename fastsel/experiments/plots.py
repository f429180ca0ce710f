"""The PNG plots of a comparison report: accuracy against budget, the gap to the baseline
with its 95% interval (the verdict's, from ``tables.aggregate``), accuracy against wall time,
and per budget the histogram of per-sample selection counts. A policy has one colour in
every plot (``colour``)."""
from __future__ import annotations

import os
import zlib
from typing import Any, Dict, List, Sequence

from . import stats
from .tables import BATCH_LEVEL, aggregate

#: The plots every report has; ``selection_counts_<budget>.png`` come beside them, one per budget.
PLOTS = ("accuracy_vs_budget.png", "gap_vs_baseline.png", "accuracy_vs_time.png")
MARKERS = "osD^v<>Pp*hX"
#: Every policy fastsel ships, in a fixed order: policy i gets palette colour i, whatever
#: else a results file holds. Full training is black.
KNOWN = ("uniform", "rs2", "p-sgd", "c-sgd", "tftb", "infobatch", "rho", "scan", "sb", "osgd", "sift")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


def colour(policy: str) -> str:
    """The policy's colour in every plot: its place in ``KNOWN``, or for another name a
    palette colour picked by a hash of the name (the same in every run and plot)."""
    if policy == "full":
        return "#000000"
    if policy in KNOWN:
        return PALETTE[KNOWN.index(policy)]
    return PALETTE[len(KNOWN) + zlib.crc32(policy.encode()) % (len(PALETTE) - len(KNOWN))]


def _policies(runs: Sequence[Dict[str, Any]]) -> List[str]:
    return [p for p in dict.fromkeys(r["policy"] for r in runs) if p != "full"]


def selection_plot(budget: str) -> str:
    """The file name of one budget's selection-count plot."""
    return f"selection_counts_{budget.replace('.', '_')}.png"


def plots(doc: Dict[str, Any]) -> List[str]:
    """Every plot a report of ``doc`` has."""
    budgets = dict.fromkeys(r["budget"] for r in doc["runs"] if r["policy"] != "full")
    return list(PLOTS) + [selection_plot(b) for b in budgets]


def _budget_value(b: str) -> float:
    return float(b.rstrip("s"))


def plot(doc: Dict[str, Any], out_dir: str) -> List[str]:
    """Write every plot of ``plots(doc)`` into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    rows = aggregate(runs, doc.get("meta", {}).get("baseline", "uniform"))
    try:
        return [_accuracy(plt, runs, rows, out_dir), _gaps(plt, runs, rows, out_dir),
                _time(plt, runs, out_dir)] + _selection(plt, runs, out_dir)
    finally:
        plt.close("all")


def _accuracy(plt: Any, runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], out_dir: str) -> str:
    """Mean test accuracy per policy and budget, the bar spanning the seeds' lowest to
    highest (an accuracy, so never past 100%). With one budget the policies stand side by
    side; with several, one line per policy across the budgets."""
    budgets = list(dict.fromkeys(r["budget"] for r in rows if r["policy"] != "full"))
    timed = any(b.endswith("s") for b in budgets)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    full = next((r for r in rows if r["policy"] == "full"), None)
    names = _policies(runs)
    several = len(budgets) > 1
    values = sorted(_budget_value(b) for b in budgets)
    # several budgets: the policies side by side around each budget, so their bars never overlap
    dodge = 0.5 * min((b - a for a, b in zip(values, values[1:])), default=1.0) / max(1, len(names))
    for i, p in enumerate(names):
        pr = [r for r in rows if r["policy"] == p]
        shift = (i - (len(names) - 1) / 2) * dodge
        xs = [_budget_value(r["budget"]) + shift for r in pr] if several else [i] * len(pr)
        ys = [r["accuracy"] for r in pr]
        err = [[y - r["accuracy_range"][0] for y, r in zip(ys, pr)],
               [r["accuracy_range"][1] - y for y, r in zip(ys, pr)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=colour(p), label=p,
                    linestyle="-" if several else "none")
    if full is not None:
        ax.axhline(full["accuracy"], color=colour("full"), linestyle="--", linewidth=1,
                   label=f"full training ({full['accuracy']:.2f}%)")
    if several:
        ax.set_xticks([_budget_value(b) for b in budgets], budgets)
        xlabel = "time budget (s)" if timed else "budget (fraction of full training)"
    else:
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        xlabel = f"policy (budget {budgets[0]})" if budgets else "policy"
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, ax, xlabel, "test accuracy (%)",
                   "Test accuracy: mean over seeds, bar = lowest to highest seed", out_dir, "accuracy_vs_budget.png")


def _gaps(plt: Any, runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], out_dir: str) -> str:
    """Each policy's paired gap to the baseline with its 95% t-interval, per budget, over a
    band of ± one test image: the verdict's numbers (``tables.aggregate``)."""
    base = rows[0]["baseline"] if rows else "uniform"
    budgets = list(dict.fromkeys(r["budget"] for r in rows if r["gap"] is not None))
    names = [p for p in _policies(runs) if p != base]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(names))
    image = stats.one_image(runs)
    if image:
        ax.axhspan(-image, image, color="0.85", label=f"± one test image ({image:.2f} points)")
    ax.axhline(0, color="k", linewidth=0.8)
    for j, p in enumerate(names):
        for i, b in enumerate(budgets):
            r = next((r for r in rows if r["policy"] == p and r["budget"] == b), None)
            if r is None or r["gap"] is None or not r["gap"].n:
                continue
            g = r["gap"]
            x = i - 0.4 + width * (j + 0.5)
            yerr = [[g.mean - g.lo], [g.hi - g.mean]] if g.defined else None
            filled = r["standing"] in ("better", "worse")
            ax.errorbar([x], [g.mean], yerr=yerr, marker="o", capsize=4, color=colour(p),
                        markerfacecolor=colour(p) if filled else "white", label=p if i == 0 else None)
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlim(-0.6, len(budgets) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, ax, "budget", f"accuracy gap to {base} (points)",
                   f"Gap to {base}, paired by seed: mean and 95% interval\n(filled: better or worse by the verdict)",
                   out_dir, "gap_vs_baseline.png")


def _time(plt: Any, runs: List[Dict[str, Any]], out_dir: str) -> str:
    """Every run's accuracy against its wall time: colour = policy, marker = budget; a red
    ring marks a seed whose time ``stats.time_outliers`` flags."""
    from matplotlib.lines import Line2D
    budgets = list(dict.fromkeys(r["budget"] for r in runs))
    markers = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets)}
    flagged = stats.time_outliers(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.scatter([r["wall_s"]], [100 * r["accuracy"]], s=30, color=colour(r["policy"]),
                   marker=markers[r["budget"]], alpha=0.85)
        if (r["policy"], r["budget"], r["seed"]) in flagged:
            ax.scatter([r["wall_s"]], [100 * r["accuracy"]], s=160, facecolors="none", edgecolors="red")
    handles = [Line2D([], [], color=colour(p), marker="o", linestyle="none", label=p)
               for p in dict.fromkeys(r["policy"] for r in runs)]
    handles += [Line2D([], [], color="0.4", marker=markers[b], linestyle="none", label=f"budget {b}")
                for b in budgets]
    if flagged:
        handles.append(Line2D([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="red",
                              linestyle="none", label="time outlier"))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, ax, "wall-clock time (s)", "test accuracy (%)",
                   "Accuracy against wall time (every run)", out_dir, "accuracy_vs_time.png", legend=False)


def _selection(plt: Any, runs: List[Dict[str, Any]], out_dir: str) -> List[str]:
    """Per budget, the first seed's histogram of how often each sample was trained (bins: 0,
    1, 2, ... times; counts on a log scale): side-by-side bars per policy, or one step
    outline per policy where the bars would be too thin to see."""
    from matplotlib.ticker import MaxNLocator
    written = []
    for b in dict.fromkeys(r["budget"] for r in runs if r["policy"] != "full"):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        hists = {}
        for p in ["full"] + _policies(runs):
            pr = [r for r in runs if r["policy"] == p and (p == "full" or r["budget"] == b)][:1]
            if pr and pr[0]["selection_counts"]:
                hists[p] = pr[0]["selection_counts"]
        top = max((len(c) for c in hists.values()), default=1)
        bars = top * len(hists) <= 60   # side-by-side bars while they stay wide enough to see
        width = 0.8 / max(1, len(hists))
        for j, (p, counts) in enumerate(hists.items()):
            label = p + (" (backward passes)" if p in BATCH_LEVEL else "")
            if bars:
                ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(counts))], counts, width=width,
                       color=colour(p), label=label)
            else:
                ax.stairs(counts, [i - 0.5 for i in range(len(counts) + 1)], color=colour(p), linewidth=1.8,
                          label=label, baseline=0.5)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_xlim(-0.6, top - 0.4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
        written.append(_finish(fig, ax, "times a sample was trained", "samples (log scale)",
                               f"How often each sample was trained, budget {b} (first seed)", out_dir,
                               selection_plot(b)))
    return written


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, out_dir: str, name: str,
            legend: bool = True) -> str:
    """Label, lay out and save one figure; returns its path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path
