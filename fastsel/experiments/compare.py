"""Policies × budgets × seeds under one recipe, aggregated as in Arazo et al.'s Table 2
(seed 002) and TFTB's tables (seed 000): always with full training and the uniform +
linear-LR baseline, and a plain verdict on which policy wins where."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from ..machine import machine
from .datasets import Data
from .report import write_report
from .tables import (MIN_SEEDS, aggregate, format_table, paired_gap,  # noqa: F401 (re-exported)
                     verdict)
from .train import RunResult, RunSpec, train_one

DEFAULT_POLICIES = ("uniform", "p-sgd", "tftb", "infobatch")
DEFAULT_BUDGETS = (0.2, 0.3, 0.5)
#: Samples of the warm-up run of each policy (``warm_up``).
WARM_UP_SAMPLES = 256


def default_baseline() -> str:
    """``rs2`` where this fastsel has it, else ``uniform``."""
    from ..policies import POLICIES
    return "rs2" if "rs2" in POLICIES else "uniform"


def default_policies() -> List[str]:
    """The policies ``run`` and ``compare`` train by default: ``DEFAULT_POLICIES`` with rs2
    after uniform where this fastsel has it."""
    rs2 = ["rs2"] if default_baseline() == "rs2" else []
    return ["uniform"] + rs2 + [p for p in DEFAULT_POLICIES if p != "uniform"]


def baselines() -> List[str]:
    """The ``--baseline`` choices: uniform, and rs2 where this fastsel has it."""
    return ["uniform"] + (["rs2"] if default_baseline() == "rs2" else [])


def plan(policies: Sequence[str], budgets: Sequence[float], seeds: Sequence[int], epochs: int,
         time_budget: Optional[float] = None, baseline: str = "uniform", **common: Any) -> List[RunSpec]:
    """The runs of a comparison: full training, then uniform, ``baseline`` and every other
    policy at each budget (or at the one time budget), for every seed. ``common``: the other ``RunSpec``
    fields shared by every run (batch_size, lr, backend, ``device`` — where models, batches
    and samplers run, "cpu" by default).

    ``rho`` runs split a holdout off the training set and pay for their irreducible-loss
    model out of their own budget and wall time (``fastsel.experiments.train.rho_plan``), so every
    policy at a budget spends the same passes."""
    names = list(dict.fromkeys(["uniform", baseline] + [p for p in policies if p != "full"]))
    specs = []
    for seed in seeds:
        if time_budget is not None:
            for p in ["full"] + names:
                specs.append(RunSpec(p, time_budget=time_budget, epochs=epochs, seed=seed, **common))
            continue
        specs.append(RunSpec("full", budget=1.0, epochs=epochs, seed=seed, **common))
        for b in budgets:
            for p in names:
                specs.append(RunSpec(p, budget=b, epochs=epochs, seed=seed, **common))
    return specs


def warm_up(data: Data, specs: Sequence[RunSpec]) -> None:
    """Before the timed runs: one short untimed run of each policy (one epoch over the first
    ``WARM_UP_SAMPLES`` training samples, at its first budget or 0.5), so that the first timed
    run does not pay for the process's cold start (kernels, allocator, thread pool, lazy
    imports). rho warms up as full training: its holdout model is the same network."""
    from torch.utils.data import TensorDataset
    n = min(len(data.train), WARM_UP_SAMPLES)
    train = TensorDataset(*(t[:n] for t in data.train.tensors))
    for s in {s.policy: s for s in reversed(list(specs))}.values():
        policy = "full" if s.policy == "rho" else s.policy
        budget = 1.0 if policy == "full" else (s.budget or 0.5)
        w = dataclasses.replace(s, policy=policy, budget=budget, time_budget=None, epochs=1)
        train_one(w, train, data.test, data.channels, data.size, data.classes)


def run(data: Data, specs: List[RunSpec], show_progress: bool = True, warm: bool = True) -> List[RunResult]:
    """Every run of ``specs``, after a ``warm_up`` (unless ``warm`` is False)."""
    if warm:
        warm_up(data, specs)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        timed = any(s.time_budget is not None for s in specs)
        total = None if timed else sum(
            max(1, int(s.epochs * s.budget + 0.5)) if s.policy == "scan" else s.epochs for s in specs)
        bar = tqdm(total=total, unit="epoch", desc=f"fastsel {data.name}")
    try:
        return [train_one(s, data.train, data.test, data.channels, data.size, data.classes, bar)
                for s in specs]
    finally:
        if bar is not None:
            bar.close()


def save(results: Sequence[RunResult], out_dir: str, meta: Dict[str, Any]) -> str:
    """Write results.json (every run), results.md (table + verdict) and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {"meta": {**meta, "machine": machine(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
           "runs": [r.to_dict() for r in results]}
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    write_report(out_dir)
    return path
