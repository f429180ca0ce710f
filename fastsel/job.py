"""The main job: budgeted training of a small CNN on scikit-learn's real digits images.

Full training and each policy at the same budget, one recipe (SGD, momentum, BudgetLR's
linear decay), so the table compares the sampling policies and nothing else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .indexed import with_indices
from .sampler import Sampler
from .schedule import BudgetLR

DEFAULT_POLICIES = ("uniform", "p-sgd", "tftb", "infobatch")


def load_digits_split(seed: int = 0, test_share: float = 0.25):
    """scikit-learn's 1,797 real 8×8 digit images as (train, test) TensorDatasets, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - set-up installs it
        raise RuntimeError("the main job needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_share)
    te, tr = perm[:n_test], perm[n_test:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


class SmallCNN(nn.Module):
    """Two conv layers and a linear head: enough to separate digits, small enough for a CPU."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


@dataclass
class RunResult:
    policy: str
    budget: float
    seed: int
    accuracy: float
    wall_s: float
    passes: int
    passes_full: int
    selection_s: float

    @property
    def passes_saved(self) -> float:
        return 1.0 - self.passes / self.passes_full


def train_one(policy: str, budget: float, train: TensorDataset, test: TensorDataset, *,
              epochs: int, seed: int, batch_size: int = 32, lr: float = 0.05,
              progress: Optional[object] = None) -> RunResult:
    """One budgeted run; ``policy="full"`` is full training (uniform at budget 1.0)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    data = with_indices(train)
    name, b = ("uniform", 1.0) if policy == "full" else (policy, budget)
    sampler = Sampler(data, policy=name, budget=b, epochs=epochs, seed=seed)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = BudgetLR(opt, sampler)
    t0 = time.perf_counter()
    for _ in sampler.epochs():
        for x, y, idx in loader:
            loss = sampler.loss(model(x), y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    wall = time.perf_counter() - t0
    s = sampler.summary()
    return RunResult(policy, b, seed, accuracy(model, test), wall, s["passes"],
                     s["passes_full_training"], s["selection_time_s"])


def run_job(policies: Sequence[str] = DEFAULT_POLICIES, budget: float = 0.3, epochs: int = 30,
            seeds: Sequence[int] = (0,), batch_size: int = 32, show_progress: bool = True
            ) -> List[RunResult]:
    """Full training, then every policy at ``budget``, for each seed."""
    train, test = load_digits_split()
    runs = [("full", 1.0)] + [(p, budget) for p in policies]
    total = sum(epochs if p == "full" or p != "scan" else max(1, int(epochs * budget + 0.5))
                for p, _ in runs) * len(seeds)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="epoch", desc="fastsel run")
    results = []
    for seed in seeds:
        for p, b in runs:
            if bar is not None:
                bar.set_postfix_str(f"{p} seed={seed}")
            results.append(train_one(p, b, train, test, epochs=epochs, seed=seed,
                                     batch_size=batch_size, progress=bar))
    if bar is not None:
        bar.close()
    return results


def format_table(results: List[RunResult]) -> str:
    """Mean over seeds per (policy, budget): accuracy, wall time, passes saved, selection time."""
    groups: Dict[tuple, List[RunResult]] = {}
    for r in results:
        groups.setdefault((r.policy, r.budget), []).append(r)
    full_wall = None
    if ("full", 1.0) in groups:
        full_wall = sum(r.wall_s for r in groups[("full", 1.0)]) / len(groups[("full", 1.0)])
    head = (f"{'policy':<10} {'budget':>6} {'test acc %':>14} {'wall s':>7} {'speed-up':>8} "
            f"{'passes':>7} {'saved':>6} {'select ms':>9}")
    lines = [head, "-" * len(head)]
    for (p, b), rs in groups.items():
        accs = torch.tensor([r.accuracy for r in rs], dtype=torch.float64) * 100
        acc = f"{float(accs.mean()):.2f}" + (f" ± {float(accs.std()):.2f}" if len(rs) > 1 else "")
        wall = sum(r.wall_s for r in rs) / len(rs)
        speed = f"{full_wall / wall:.2f}x" if full_wall else "-"
        passes = sum(r.passes for r in rs) // len(rs)
        saved = sum(r.passes_saved for r in rs) / len(rs)
        sel = sum(r.selection_s for r in rs) / len(rs) * 1e3
        lines.append(f"{p:<10} {b:>6.2f} {acc:>14} {wall:>7.2f} {speed:>8} {passes:>7} "
                     f"{saved:>6.0%} {sel:>9.1f}")
    return "\n".join(lines)
