"""An independent, slow, float64 model of what a fused step must do — the tests' oracle.

Written as plainly as possible (Python loops over rows and samples), so it shares no code
and no vectorisation trick with any backend.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

#: float32's largest finite value (fastsel.layout.STATE_MAX, restated: the oracle shares no code).
F32_MAX = float(torch.finfo(torch.float32).max)


def _saturate(x: float) -> float:
    """A finite value beyond float32's range clamped to +-F32_MAX (finite in, finite state);
    NaN and +-inf as they are."""
    return max(-F32_MAX, min(F32_MAX, x)) if math.isfinite(x) else x


def _computed_f32(x: float) -> float:
    """A cross-entropy the backends compute in float32: beyond its range it is inf there (as
    ``F.cross_entropy``'s), a non-finite observation."""
    return math.copysign(math.inf, x) if math.isfinite(x) and abs(x) > F32_MAX else x


def _exp_neg(lo: float) -> float:
    """observe's default p_true exp(-loss), saturated at F32_MAX instead of overflowing."""
    return F32_MAX if -lo > math.log(F32_MAX) else math.exp(-lo)


def _admit(groups: Dict[int, List[tuple]], i: int, lo: float, po: float) -> int:
    """Add sample i's observation if it is finite; returns 1 if it was not."""
    if not (math.isfinite(lo) and math.isfinite(po)):
        return 1
    groups.setdefault(i, []).append((lo, po))
    return 0


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
            loss = _computed_f32((1 - label_smoothing) * nll - label_smoothing * float(logp.mean()))
            if not math.isfinite(loss):
                continue
            groups.setdefault(i, []).append((loss, math.exp(-nll)))
        self._fold(groups, epoch, ema)

    def step_any(self, logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor, *,
                 epoch: int, ema: float, ignore_index: int = -100, label_smoothing: float = 0.0) -> int:
        """Any ``F.cross_entropy`` target: class indices [B, d1..dk] for logits [B, C, d1..dk],
        or class probabilities of the logits' shape. A sample's observation is the mean over
        its non-ignored elements. Returns how many samples had a non-finite observation."""
        x = logits.double()
        c = x.shape[1]
        soft = target.is_floating_point()
        groups: Dict[int, List[tuple]] = {}
        nonfinite = 0
        for r in range(x.shape[0]):
            i = int(indices[r])
            if not 0 <= i < self.n:
                continue
            xs = x[r].reshape(c, -1)
            ts = target[r].double().reshape(c, -1) if soft else target[r].reshape(-1)
            losses, probs = [], []
            for e in range(xs.shape[1]):
                logp = torch.log_softmax(xs[:, e], 0)
                if soft:
                    t = ts[:, e]
                    tp = (1 - label_smoothing) * t + label_smoothing / c
                    losses.append(_computed_f32(-float((tp * logp).sum())))
                    probs.append(float((t * logp.exp()).sum()))
                else:
                    y = int(ts[e])
                    if y == ignore_index or not 0 <= y < c:
                        continue
                    nll = -float(logp[y])
                    losses.append(_computed_f32((1 - label_smoothing) * nll
                                                - label_smoothing * float(logp.mean())))
                    probs.append(math.exp(-nll))
            if not losses:
                continue
            nonfinite += _admit(groups, i, sum(losses) / len(losses), sum(probs) / len(probs))
        self._fold(groups, epoch, ema)
        return nonfinite

    def observe(self, losses: torch.Tensor, indices: torch.Tensor, *, epoch: int, ema: float,
                p_true: Optional[torch.Tensor] = None) -> int:
        """Per-sample losses of any loss; p_true defaults to exp(-loss). A finite value beyond
        float32's range saturates. Returns how many rows were not finite."""
        groups: Dict[int, List[tuple]] = {}
        nonfinite = 0
        for r in range(losses.shape[0]):
            i = int(indices[r])
            if not 0 <= i < self.n:
                continue
            lo = _saturate(float(losses[r]))
            po = _exp_neg(lo) if p_true is None and math.isfinite(lo) else (
                _saturate(float(p_true[r])) if p_true is not None else float("nan"))
            nonfinite += _admit(groups, i, lo, po)
        self._fold(groups, epoch, ema)
        return nonfinite

    def _fold(self, groups: Dict[int, List[tuple]], epoch: int, ema: float) -> None:
        """The documented update in float64, each result saturated at +-F32_MAX: a finite
        observation never makes the state inf (fastsel/state.py)."""
        for i, obs in groups.items():
            lo = sum(o[0] for o in obs) / len(obs)
            po = sum(o[1] for o in obs) / len(obs)
            self.history[i].append(lo)
            if self.seen[i] == 0:
                self.loss[i], self.var[i] = lo, 0.0
            else:
                d = lo - self.loss[i]
                self.loss[i] = _saturate(self.loss[i] + ema * d)
                self.var[i] = _saturate((1 - ema) * (self.var[i] + ema * d * d))
            self.p[i] = _saturate(self.p[i] + (po - self.p[i]) * len(obs) / (self.seen[i] + len(obs)))
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
