"""An independent, slow, float64 model of what a fused step must do — the tests' oracle.

Written as plainly as possible (Python loops over rows and samples), so it shares no code
and no vectorisation trick with any backend.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


class OracleState:
    """Per-sample state in float64, updated by the documented rules."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loss = [0.0] * n
        self.var = [0.0] * n
        self.p = [0.0] * n
        self.seen = [0] * n
        self.last = [-1] * n
        self.history: Dict[int, List[float]] = {i: [] for i in range(n)}

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, *,
             epoch: int, ema: float, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        x = logits.double()
        groups: Dict[int, List[tuple]] = {}
        for r in range(x.shape[0]):
            y, i = int(labels[r]), int(indices[r])
            if y == ignore_index or not 0 <= y < x.shape[1] or not 0 <= i < self.n:
                continue
            logp = torch.log_softmax(x[r], 0)
            nll = -float(logp[y])
            loss = (1 - label_smoothing) * nll - label_smoothing * float(logp.mean())
            if not math.isfinite(loss):
                continue
            groups.setdefault(i, []).append((loss, math.exp(-nll)))
        for i, obs in groups.items():
            lo = sum(o[0] for o in obs) / len(obs)
            po = sum(o[1] for o in obs) / len(obs)
            self.history[i].append(lo)
            if self.seen[i] == 0:
                self.loss[i], self.var[i] = lo, 0.0
            else:
                d = lo - self.loss[i]
                self.loss[i] += ema * d
                self.var[i] = (1 - ema) * (self.var[i] + ema * d * d)
            self.p[i] += (po - self.p[i]) * len(obs) / (self.seen[i] + len(obs))
            self.seen[i] += len(obs)
            self.last[i] = epoch


def ew_moments(history: List[float], ema: float) -> tuple:
    """Closed form of the exponentially weighted mean and variance of a loss history."""
    n = len(history)
    w = [(1 - ema) ** (n - 1)] + [ema * (1 - ema) ** (n - 1 - j) for j in range(1, n)]
    mean = sum(wi * x for wi, x in zip(w, history))
    var = sum(wi * (x - mean) ** 2 for wi, x in zip(w, history))
    return mean, var


def expected_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str, *,
                  ignore_index: int = -100, label_smoothing: float = 0.0,
                  class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the fused step must return with policy weights of 1: ``F.cross_entropy``."""
    return F.cross_entropy(logits.float(), labels.long(), weight=class_weight, reduction=reduction,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
