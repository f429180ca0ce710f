"""Ordered SGD (Kawaguchi & Lu, "Ordered SGD: A New Stochastic Optimization Framework for
Empirical Risk Minimization", AISTATS 2020; as used in Arazo et al., seed 002)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from ..validation.fields import check_fields, check_real
from ..validation.values import round_half_up
from .base import BatchPolicy, check_keep
from .step_api import StepView

#: The authors' default schedule, from their public code (github.com/k9k2/qSGD, main.py;
#: not stated in Arazo et al., who only say q ends at 1/16 of the batch): with s = 64 the
#: backward size q is 64, and becomes 32, 16, 8, 4 once the training accuracy of the
#: previous epoch reaches 80%, 90%, 95%, 99.5% — q never grows back. Here as
#: (accuracy threshold, share of the mini-batch) pairs.
KAWAGUCHI_SCHEDULE: Tuple[Tuple[float, float], ...] = (
    (0.80, 1 / 2), (0.90, 1 / 4), (0.95, 1 / 8), (0.995, 1 / 16))


def _check_schedule(schedule: Any) -> Tuple[Tuple[float, float], ...]:
    if schedule is None:
        return ()
    if isinstance(schedule, str):
        if schedule.lower() != "kawaguchi":
            raise ValueError(f"schedule must be 'kawaguchi', None or a list of "
                             f"(accuracy, share) pairs, got schedule={schedule!r}")
        return KAWAGUCHI_SCHEDULE
    try:
        pairs = tuple((float(a), float(s)) for a, s in schedule)
    except (TypeError, ValueError):
        raise ValueError(f"schedule must be 'kawaguchi', None or a list of (accuracy, share) "
                         f"pairs, got schedule={schedule!r}") from None
    for a, s in pairs:
        if not (0.0 <= a <= 1.0 and 0.0 < s <= 1.0) or not math.isfinite(a + s):
            raise ValueError(f"schedule entries must be (accuracy in [0, 1], share in (0, 1]), "
                             f"got {(a, s)}")
    return tuple(sorted(pairs))


class OrderedSGD(BatchPolicy):
    """Ordered SGD: backward only on the q largest losses of each mini-batch, q shrinking
    as the training accuracy grows (Kawaguchi & Lu 2020).

    Args:
        keep: share of the mini-batch backpropagated before the schedule shrinks it
            (default 1.0: the authors start with q = s). Every schedule share is
            multiplied by it.
        schedule: "kawaguchi" (default), None (a fixed share ``keep``) or a list of
            (training accuracy, share) pairs. The default is the authors' code's rule:
            q = s/2, s/4, s/8, s/16 once the previous epoch's training accuracy reaches
            80%, 90%, 95%, 99.5%, never growing back. Their code also halves the LR once
            at 99.5%; here the LR belongs to your scheduler, so that is left out.

    q = max(1, round(share · B)) for a mini-batch of B rows, so a smaller last batch keeps
    the same share. The training accuracy is the accuracy of the selection forward passes
    (every sample, before its update) over the previous epoch, which costs nothing extra;
    the authors' code evaluates the whole training set at the end of each epoch instead.
    """

    name = "osgd"

    def __init__(self, keep: Optional[float] = None,
                 schedule: Any = "kawaguchi") -> None:
        self.keep = check_keep(1.0 if keep is None else keep)
        self.schedule = _check_schedule(schedule)
        self.factor = 1.0          # the schedule's share reached so far
        self.last_accuracy: Optional[float] = None

    @property
    def share(self) -> float:
        return self.keep * self.factor

    def q(self, batch: int) -> int:
        """Rows backpropagated from a mini-batch of ``batch`` rows under the current share."""
        return max(1, min(batch, round_half_up(self.share * batch)))

    def factor_for(self, accuracy: float) -> float:
        f = 1.0
        for a, s in self.schedule:
            if accuracy >= a:
                f = s
        return f

    def end_epoch(self, step: StepView, accuracy: Optional[float]) -> None:
        if accuracy is None:
            return
        self.last_accuracy = accuracy
        self.factor = min(self.factor, self.factor_for(accuracy))

    def choose(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
               idx: Optional[torch.Tensor]) -> torch.Tensor:
        losses = step.selection_forward(x, y, idx)
        t0 = step.clock()
        pos = step.topk(losses, self.q(int(losses.shape[0])))
        step.add_selection_time(t0)
        return pos

    def summary(self) -> Dict[str, Any]:
        return {"share": self.share, "train_accuracy": self.last_accuracy}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "keep": self.keep, "schedule": list(self.schedule)}

    def state_dict(self) -> Dict[str, Any]:
        return {"factor": self.factor, "last_accuracy": self.last_accuracy}

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, ("factor", "last_accuracy"), "policy")
        check_real("policy.factor", sd["factor"], lo=0.0, hi=1.0, lo_open=True)
        if sd["last_accuracy"] is not None:
            check_real("policy.last_accuracy", sd["last_accuracy"], lo=0.0, hi=1.0)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self.factor = float(sd["factor"])
        self.last_accuracy = None if sd["last_accuracy"] is None else float(sd["last_accuracy"])
