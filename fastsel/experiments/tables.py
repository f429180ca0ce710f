"""The tables of a comparison: per (policy, budget) aggregates over seeds, their text or
markdown table, and the plain verdict against uniform. Shared by ``compare`` (which saves a
run) and ``report`` (which renders a saved one); neither imports the other for these."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence


def _mean_std(xs: Sequence[float]) -> tuple:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    h = len(ys) // 2
    return ys[h] if len(ys) % 2 else (ys[h - 1] + ys[h]) / 2


def aggregate(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (policy, budget): accuracy mean ± std over seeds, wall time, selection
    share, forward/backward passes, and the speed-up against full training: the median of
    the per-seed ratios (each seed's run against full training of the same seed), with
    their lowest and highest."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["policy"], r["budget"]), []).append(r)
    full_wall = {r["seed"]: r["wall_s"] for r in results if r["policy"] == "full"}
    rows = []
    for (policy, budget), rs in groups.items():
        acc, acc_sd = _mean_std([100.0 * r["accuracy"] for r in rs])
        wall, _ = _mean_std([r["wall_s"] for r in rs])
        speed = [full_wall[r["seed"]] / r["wall_s"] for r in rs if r["seed"] in full_wall and r["wall_s"] > 0]
        rows.append({
            "policy": policy, "budget": budget, "seeds": len(rs), "accuracy": acc, "accuracy_std": acc_sd,
            "wall_s": wall, "selection_share": sum(r["selection_s"] for r in rs) / max(1e-12, sum(r["wall_s"] for r in rs)),
            "forward": sum(r["forward"] for r in rs) // len(rs),
            "backward": sum(r["backward"] for r in rs) // len(rs),
            # Under a time budget every run trains until the clock stops: nothing is "saved".
            "passes_saved": None if budget.endswith("s") else
            sum(1.0 - r["backward"] / r["passes_full"] for r in rs) / len(rs),
            "speedup": _median(speed) if speed else None,
            "speedup_range": (min(speed), max(speed)) if speed else None,
            "entropy": sum(r["entropy"] for r in rs) / len(rs),
        })
    return rows


def format_table(rows: Sequence[Dict[str, Any]], markdown: bool = False) -> str:
    head = ["policy", "budget", "test acc %", "wall s", "speed-up (median, range)", "select %", "fwd", "bwd",
            "saved"]
    lines = []
    for r in rows:
        acc = f"{r['accuracy']:.2f}" + (f" ± {r['accuracy_std']:.2f}" if r["seeds"] > 1 else "")
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        if r["speedup"] and r.get("speedup_range") and r["seeds"] > 1:
            lo, hi = r["speedup_range"]
            speed += f" ({lo:.2f}–{hi:.2f})"
        lines.append([r["policy"], r["budget"], acc, f"{r['wall_s']:.2f}", speed,
                      f"{100 * r['selection_share']:.1f}", str(r["forward"]), str(r["backward"]),
                      "-" if r["passes_saved"] is None else f"{100 * r['passes_saved']:.0f}%"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(l) for l in lines])


def paired_gap(runs: Sequence[Dict[str, Any]], policy: str, budget: str) -> tuple:
    """(mean, standard error, seeds) of the per-seed accuracy gap, in points, of ``policy``
    over uniform at ``budget``: paired by seed, so the seed's own luck cancels."""
    acc = {(r["policy"], r["seed"]): 100.0 * r["accuracy"] for r in runs if r["budget"] == budget}
    gaps = [acc[(policy, s)] - acc[("uniform", s)] for (p, s) in acc if p == policy and ("uniform", s) in acc]
    if not gaps:
        return 0.0, float("inf"), 0
    m, sd = _mean_std(gaps)
    return m, (sd / math.sqrt(len(gaps)) if len(gaps) > 1 else float("inf")), len(gaps)


#: Seeds a paired gap needs before the verdict judges it: with fewer its spread is unknown.
MIN_SEEDS = 3


def verdict(rows: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]]) -> str:
    """A plain sentence per budget: does any policy beat uniform by more than the noise?
    "Beats" means a paired per-seed gap, over 3+ seeds, of more than two standard errors and
    more than one test image's worth of accuracy; with fewer seeds it says it cannot judge."""
    out = []
    full = next((r for r in rows if r["policy"] == "full"), None)
    for b in dict.fromkeys(r["budget"] for r in rows if r["policy"] != "full"):
        at = [r for r in rows if r["budget"] == b and r["policy"] != "full"]
        uni = next((r for r in at if r["policy"] == "uniform"), None)
        if uni is None or len(at) < 2:
            continue
        best = max(at, key=lambda r: r["accuracy"])
        gap, se, n = paired_gap(runs, best["policy"], b)
        test_size = max((r.get("test_size", 0) for r in runs), default=0)
        one_image = 100.0 / test_size if test_size else 0.0
        seeds = min(r["seeds"] for r in at)
        if seeds < MIN_SEEDS:
            vs = "" if best["policy"] == "uniform" else f" vs uniform {uni['accuracy']:.2f}%"
            s = (f"At budget {b}, {best['policy']} has the best mean accuracy ({best['accuracy']:.2f}%{vs}), "
                 f"but with {seeds} seed(s) this cannot be judged: the spread of the per-seed gap needs "
                 f"at least {MIN_SEEDS} seeds (--seeds {MIN_SEEDS}).")
        elif best["policy"] == "uniform":
            s = f"At budget {b}, no policy beats uniform: uniform has the best mean accuracy ({uni['accuracy']:.2f}%)."
        elif n >= 3 and gap > max(2 * se, one_image) + 1e-9:  # a one-image gap ties, not beats
            s = (f"At budget {b}, {best['policy']} beats uniform: {best['accuracy']:.2f}% vs "
                 f"{uni['accuracy']:.2f}%, a per-seed gap of {gap:.2f} ± {se:.2f} points over {n} seeds.")
        else:
            s = (f"At budget {b}, {best['policy']} has the best mean ({best['accuracy']:.2f}% vs uniform "
                 f"{uni['accuracy']:.2f}%), but its per-seed gap ({gap:.2f} ± {se:.2f} points, {n} seeds) "
                 f"is within the noise (one test image is {one_image:.2f} points): none clearly beats uniform.")
        if full is not None:
            s += f" Full training: {full['accuracy']:.2f}%."
        out.append(s)
    return "\n".join(out)
