"""The markdown tables of docs/comparisons.md from the four synthetic settings' results
(``bash bench/compare_synthetic.sh OUT``), judged by ``fastsel.experiments.stats``' rules:

    python bench/comparison_tables.py OUT [--against uniform]

One table per setting: test accuracy (mean ± std over seeds) per policy and budget, the
per-seed gap to the baseline with its 95% t-interval, and the verdict (bold: better, italic:
worse). ``--against uniform`` also prints each policy's gap to uniform (rs2 against uniform
included)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from fastsel.experiments import stats

SETTINGS = {"clean": "Clean", "noisy": "Noisy (20% of the training labels flipped)",
            "redundant": "Redundant (50% near-copies)", "noisy_redundant": "Noisy + redundant"}


def cell(runs: List[Dict[str, Any]], policy: str, budget: str, baseline: str) -> str:
    accs = [100.0 * r["accuracy"] for r in runs if r["policy"] == policy and r["budget"] == budget]
    if not accs:
        return ""
    m, sd = stats.mean_std(accs)
    text = f"{m:.2f} ± {sd:.2f}"
    if policy in ("full", baseline):
        return text
    gap = stats.paired_gap(runs, policy, budget, baseline)
    verdict = stats.standing(gap, stats.one_image(runs))
    text += f" ({stats.gap_text(gap)})"
    return {"better": f"**{text}**", "worse": f"*{text}*"}.get(verdict, text)


def table(runs: List[Dict[str, Any]], baseline: str) -> str:
    budgets = sorted({r["budget"] for r in runs if r["policy"] != "full"}, key=float)
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    seeds = len({r["seed"] for r in runs})
    head = ["policy"] + [f"B = {b}" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        label = "full training (B = 1)" if p == "full" else p
        if p == "full":
            row = [cell(runs, p, "1", baseline)] + [""] * (len(budgets) - 1)
        else:
            row = [cell(runs, p, b, baseline) for b in budgets]
        lines.append("| " + " | ".join([label + (" (baseline)" if p == baseline else "")] + row) + " |")
    return "\n".join(lines) + f"\n\n{seeds} seeds; in brackets the gap to {baseline} in points, 95% t-interval.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the folder compare_synthetic.sh wrote")
    ap.add_argument("--against", default=None, help="another baseline to print the gaps to")
    a = ap.parse_args()
    for key, title in SETTINGS.items():
        path = os.path.join(a.out, key, "results.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        runs, baseline = res["runs"], res["meta"]["baseline"]
        print(f"**{title}**\n\n{table(runs, baseline)}")
        if a.against:
            print(f"Against {a.against}:\n\n{table(runs, a.against)}")


if __name__ == "__main__":
    main()
