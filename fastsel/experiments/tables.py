"""The tables of a comparison: per (policy, budget) aggregates over seeds, their text or
markdown table with the notes that say what its columns mean, and the verdict against the
baseline. Shared by ``compare`` (which saves a run) and ``report`` (which renders a saved
one); every number comes from ``stats``."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ..batch_policies import BATCH_POLICIES
from . import stats
from .stats import FORWARD_SHARE, OUTLIER_FACTOR, mean_std, paired_gap  # noqa: F401 (re-exported)

#: Seeds a paired gap needs before the verdict judges it: its 95% t-interval needs two.
MIN_SEEDS = 2
#: Batch-level policies (``fastsel.SelectiveStep``): a budget is the share of each batch
#: that gets the backward pass.
BATCH_LEVEL = tuple(BATCH_POLICIES)


def baseline_of(runs: Sequence[Dict[str, Any]], wanted: str) -> str:
    """``wanted`` if the runs have it, else uniform (always run)."""
    return wanted if any(r["policy"] == wanted for r in runs) else "uniform"


def aggregate(results: Sequence[Dict[str, Any]], baseline: str = "uniform") -> List[Dict[str, Any]]:
    """One row per (policy, budget): accuracy mean ± std over seeds, wall time, selection
    share, forward/backward passes, passes saved (``stats.passes_saved``: every pass), the
    speed-up against full training (the median of the per-seed ratios, each seed's run
    against full training of the same seed, with their lowest and highest), the paired gap
    to ``baseline`` with its 95% t-interval and the verdict's word for it (``stats.standing``),
    and whether a seed's wall time is an outlier (``stats.time_outliers``)."""
    baseline = baseline_of(results, baseline)
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    image = stats.one_image(results)
    flagged = stats.time_outliers(results)
    rows = []
    for (policy, budget), rs in groups.items():
        acc, acc_sd = mean_std([100.0 * r["accuracy"] for r in rs])
        speed = stats.speedups(results, policy, budget)
        gap = None
        if policy not in ("full", baseline):
            gap = paired_gap(results, policy, budget, baseline)
        rows.append({
            "policy": policy, "budget": budget, "seeds": len(rs), "accuracy": acc, "accuracy_std": acc_sd,
            "accuracy_range": (min(100.0 * r["accuracy"] for r in rs), max(100.0 * r["accuracy"] for r in rs)),
            "wall_s": mean_std([r["wall_s"] for r in rs])[0],
            "selection_share": sum(r["selection_s"] for r in rs) / max(1e-12, sum(r["wall_s"] for r in rs)),
            "forward": sum(r["forward"] for r in rs) // len(rs),
            "backward": sum(r["backward"] for r in rs) // len(rs),
            # Under a time budget every run trains until the clock stops: nothing is "saved".
            "passes_saved": None if budget.endswith("s") else
            sum(stats.passes_saved(r) for r in rs) / len(rs),
            "speedup": stats.median(speed),
            "speedup_range": (min(speed), max(speed)) if speed else None,
            "entropy": sum(r["entropy"] for r in rs) / len(rs),
            "baseline": baseline, "gap": gap,
            "standing": "-" if gap is None else stats.standing(gap, image),
            "time_outlier": any((policy, budget, r["seed"]) in flagged for r in rs),
        })
    return rows


def format_table(rows: Sequence[Dict[str, Any]], markdown: bool = False) -> str:
    """The table, then what its budgets and columns mean (``notes``)."""
    base = rows[0]["baseline"] if rows else "uniform"
    head = ["policy", "budget", "test acc %", f"gap to {base}, 95% CI", "vs " + base, "wall s",
            "speed-up (median, range)", "select %", "fwd", "bwd", "saved"]
    lines = []
    for r in rows:
        acc = f"{r['accuracy']:.2f}" + (f" ± {r['accuracy_std']:.2f}" if r["seeds"] > 1 else "")
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        if r["speedup"] and r.get("speedup_range") and r["seeds"] > 1:
            lo, hi = r["speedup_range"]
            speed += f" ({lo:.2f}–{hi:.2f})"
        gap = "baseline" if r["policy"] == base else ("-" if r["gap"] is None else stats.gap_text(r["gap"]))
        wall = f"{r['wall_s']:.2f}" + (" !" if r.get("time_outlier") else "")
        lines.append([r["policy"], r["budget"], acc, gap, r["standing"], wall, speed,
                      f"{100 * r['selection_share']:.1f}", str(r["forward"]), str(r["backward"]),
                      "-" if r["passes_saved"] is None else f"{100 * r['passes_saved']:.0f}%"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out + [""] + ["* " + n for n in notes(rows)])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(l) for l in lines]
                     + notes(rows))


def notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """What the budgets and the columns mean, for the policies in ``rows``."""
    policies = {r["policy"] for r in rows}
    base = rows[0]["baseline"] if rows else "uniform"
    timed = any(r["budget"].endswith("s") for r in rows)
    out = []
    if timed:
        out.append("budget Ns: every run trains until N seconds of wall time are spent (nothing is saved).")
    else:
        out.append("budget B (epoch-level policies): each epoch trains a share B of the N samples, "
                   "B·N·T forward+backward passes over T epochs.")
    batch = sorted(policies & set(BATCH_LEVEL))
    if batch:
        out.append(f"budget B ({', '.join(batch)}: batch-level, fastsel.SelectiveStep): every sample goes "
                   "through a selection forward without gradients each epoch, and a share B of each batch "
                   "gets the backward pass: the same B·N·T backward passes as the epoch-level policies, "
                   "plus N·T forward-only passes (in fwd, in saved and in the wall time). sb keeps the share "
                   "exactly; osgd and sift keep round(B·batch) rows of each batch, up to half a row more or "
                   "less per batch (bwd shows it).")
    if "rho" in policies:
        out.append("rho: fwd and bwd include its irreducible-loss model's training on the holdout, and fwd "
                   "its scoring of rho's samples (forward only); wall s includes both.")
    out.append(f"saved = 1 − (bwd + (fwd − bwd)·{FORWARD_SHARE:.2f}) / full training's passes: every pass "
               "counted, a forward without backward at a third of a training pass.")
    out.append(f"gap to {base}: mean per-seed accuracy gap in points (paired by seed) with its 95% "
               f"t-interval; vs {base}: better/worse when the interval excludes 0 and the gap exceeds one "
               "test image, level otherwise, ? with one seed.")
    if any(r.get("time_outlier") for r in rows):
        out.append(f"!: a seed's wall time is more than {OUTLIER_FACTOR:g}x its fastest other seed's "
                   "(listed below the verdict).")
    return out


def verdict(rows: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]]) -> str:
    """A plain sentence per budget: which policies are better or worse than the baseline by
    ``stats.standing`` (their 95% interval excludes 0 and the gap exceeds one test image),
    then the flagged seed times (``stats.outlier_notes``)."""
    out = []
    base = rows[0]["baseline"] if rows else "uniform"
    full = next((r for r in rows if r["policy"] == "full"), None)
    image = stats.one_image(runs)
    for b in dict.fromkeys(r["budget"] for r in rows if r["policy"] != "full"):
        at = [r for r in rows if r["budget"] == b and r["policy"] not in ("full", base)]
        ref = next((r for r in rows if r["budget"] == b and r["policy"] == base), None)
        if ref is None or not at:
            continue
        seeds = min(r["gap"].n for r in at)
        s = f"At budget {b}, against {base} ({ref['accuracy']:.2f}%)"
        if seeds < MIN_SEEDS:
            best = max(at, key=lambda r: r["accuracy"])
            s += (f": {best['policy']} has the best mean accuracy ({best['accuracy']:.2f}%), but with "
                  f"{seeds} seed(s) this cannot be judged: a 95% interval of the per-seed gap needs at "
                  f"least {MIN_SEEDS} seeds (--seeds {MIN_SEEDS}).")
        else:
            s += f", paired over {seeds} seeds (one test image = {image:.2f} points):"
            words = {"better": [], "worse": [], "level": []}
            for r in at:
                words[r["standing"]].append(r)
            parts = [w + " " + ", ".join(f"{r['policy']} ({stats.gap_text(r['gap'])})" for r in words[w])
                     for w in ("better", "worse") if words[w]]
            if words["level"]:
                parts.append(f"level (the interval includes 0 or the gap is within one test image): "
                             f"{', '.join(r['policy'] for r in words['level'])}")
            s += " " + "; ".join(parts) + "."
            if not words["better"]:
                s += f" No policy clearly beats {base}."
        if full is not None:
            s += f" Full training: {full['accuracy']:.2f}%."
        out.append(s)
    return "\n".join(out + stats.outlier_notes(runs))
