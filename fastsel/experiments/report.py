"""``fastsel report``: a markdown report and PNG plots from a saved results.json."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from .plots import PLOTS, plot, plots, selection_plot  # noqa: F401 (re-exported)
from .tables import aggregate, format_table, verdict


def load_results(out_dir: str) -> Dict[str, Any]:
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.json in {out_dir!r}: run `fastsel compare --out {out_dir}` first")
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "runs" not in doc or not doc["runs"]:
        raise ValueError(f"{path!r} is not a fastsel results file (no runs)")
    return doc


def markdown(doc: Dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    rows = aggregate(doc["runs"], meta.get("baseline", "uniform"))
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
