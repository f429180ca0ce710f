"""One budgeted training run with a fixed recipe: the unit every comparison is made of.

The recipe (SGD with momentum, ``BudgetLR``'s linear decay, the same model and batch size)
is the same for full training and for every policy, so a table compares policies only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .indexed import with_indices
from .sampler import Sampler
from .schedule import BudgetLR


def conv_bn(cin: int, cout: int) -> List[nn.Module]:
    """3×3 conv, BatchNorm, ReLU: BatchNorm keeps every seed out of the chance-level plateau
    plain SGD can sit on with un-normalised inputs."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Conv blocks halving the resolution down to 4×4, then a linear head: small enough for a
    CPU, big enough to separate digits or CIFAR-shaped classes."""

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 8, width: int = 16) -> None:
        super().__init__()
        layers: List[nn.Module] = conv_bn(channels, width) + conv_bn(width, 2 * width) + [nn.MaxPool2d(2)]
        s = size // 2
        while s > 4:
            layers += conv_bn(2 * width, 2 * width) + [nn.MaxPool2d(2)]
            s //= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(2 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 1024) -> float:
    model.eval()
    x, y = data.tensors
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train()
    return correct / len(y)


@dataclass
class RunSpec:
    """One run: ``policy="full"`` is full training (uniform at budget 1.0, or all data each
    epoch under a time budget)."""

    policy: str
    budget: Optional[float] = None
    time_budget: Optional[float] = None
    epochs: int = 30
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backend: str = "auto"
    policy_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.time_budget:g}s" if self.time_budget is not None else f"{self.budget:g}"


@dataclass
class RunResult:
    spec: Dict[str, Any]
    policy: str
    budget: str
    seed: int
    accuracy: float
    wall_s: float
    selection_s: float
    forward: int
    backward: int
    passes_full: int
    epochs_run: int
    selection_counts: List[int]
    entropy: float
    test_size: int = 0

    @property
    def passes_saved(self) -> float:
        return 1.0 - self.backward / self.passes_full if self.passes_full else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def make_sampler(spec: RunSpec, data: Any) -> Sampler:
    name = "uniform" if spec.policy == "full" else spec.policy
    kw = dict(spec.policy_kwargs)
    if spec.time_budget is not None:
        return Sampler(data, policy=name, time_budget=spec.time_budget, seed=spec.seed,
                       backend=spec.backend, **kw)
    budget = 1.0 if spec.policy == "full" else spec.budget
    return Sampler(data, policy=name, budget=budget, epochs=spec.epochs, seed=spec.seed,
                   backend=spec.backend, **kw)


def train_one(spec: RunSpec, train: TensorDataset, test: TensorDataset, channels: int, size: int,
              classes: int, progress: Optional[Any] = None) -> RunResult:
    """Train a fresh SmallCNN under ``spec`` and measure it."""
    torch.manual_seed(spec.seed)
    model = SmallCNN(channels, classes, size)
    data = with_indices(train)
    sampler = make_sampler(spec, data)
    loader = DataLoader(data, batch_size=spec.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay)
    sched = BudgetLR(opt, sampler)
    t0 = time.perf_counter()
    for epoch in sampler.epochs():
        if progress is not None:
            left = (f", {max(0.0, spec.time_budget - sampler.elapsed()):.0f}s left"
                    if spec.time_budget is not None else "")
            progress.set_postfix_str(f"{spec.policy} b={spec.label} seed={spec.seed} "
                                     f"epoch={epoch} kept={len(sampler) / sampler.n:.2f}{left}")
        for x, y, idx in loader:
            loss = sampler.loss(model(x), y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress.update(1)
    wall = time.perf_counter() - t0
    s = sampler.summary()
    counts = torch.bincount(sampler.state.selected.long().cpu()).tolist()
    return RunResult(spec=asdict(spec), policy=spec.policy, budget=spec.label, seed=spec.seed,
                     accuracy=accuracy(model, test), wall_s=wall, selection_s=s["selection_time_s"],
                     forward=s["passes"], backward=s["passes"], passes_full=s["passes_full_training"],
                     epochs_run=s["epochs_run"], selection_counts=counts,
                     entropy=s["selection_entropy"]["normalized"], test_size=len(test))
