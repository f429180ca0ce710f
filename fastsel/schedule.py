"""Budget-aware linear LR decay (Li, Yumer, Ramanan, "Budgeted Training", seed 001)."""
from __future__ import annotations

import copy
from typing import Any, Dict, List

import torch
from torch.optim.lr_scheduler import LRScheduler

from .validation.fields import check_int, check_real, refuse, require


class BudgetLR(LRScheduler):
    """Linear decay from each group's initial LR to ``final_ratio`` of it, reached exactly
    when the sampler's budget is spent: by trained samples for a fraction budget (the same
    as by steps, whatever the batch size), by elapsed wall-clock share for a time budget.

    Call ``step()`` after each ``optimizer.step()``, as with any per-step scheduler.

    ``state_dict()`` holds neither the optimizer nor the sampler (save and load those
    yourself, as with any scheduler): it loads with ``torch.load(weights_only=True)``.
    """

    #: Attributes that are live objects, not state: never saved, never overwritten by a load.
    _NOT_STATE = ("optimizer", "sampler")

    def __init__(self, optimizer: torch.optim.Optimizer, sampler: "object",
                 final_ratio: float = 0.0, last_epoch: int = -1) -> None:
        if not hasattr(sampler, "progress"):
            raise TypeError(f"sampler must be a fastsel.Sampler, got {type(sampler).__name__}")
        if not 0.0 <= float(final_ratio) <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got final_ratio={final_ratio}")
        self.sampler = sampler
        self.final_ratio = float(final_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        """The multiplier of the initial LR for the next optimiser step."""
        p = float(self.sampler.progress())  # type: ignore[attr-defined]
        return self.final_ratio + (1.0 - self.final_ratio) * max(0.0, 1.0 - p)

    def get_lr(self) -> List[float]:
        f = self.factor()
        return [base * f for base in self.base_lrs]

    def state_dict(self) -> Dict[str, Any]:
        """The scheduler's state without the optimizer and the sampler (plain numbers and
        lists, loadable with ``torch.load(weights_only=True)``)."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in self._NOT_STATE}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Check, then load a ``state_dict()`` (an older one that still holds the sampler or
        the optimizer loads too: those entries are ignored, the live objects are kept)."""
        if not isinstance(state_dict, dict):
            raise refuse("scheduler", f"must be a dict, got {type(state_dict).__name__}")
        sd = {k: v for k, v in state_dict.items() if k not in self._NOT_STATE}
        check_real("final_ratio", require(sd, "final_ratio"), lo=0.0, hi=1.0)
        check_int("last_epoch", require(sd, "last_epoch"), lo=-1)
        groups = len(self.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            if key == "_last_lr" and key not in sd:
                continue
            lrs = require(sd, key)
            if not isinstance(lrs, (list, tuple)) or len(lrs) != groups:
                raise refuse(key, f"must be a list of {groups} learning rates (one per parameter "
                                  f"group of the optimizer), got {lrs!r}")
            for i, lr in enumerate(lrs):
                if isinstance(lr, torch.Tensor):   # a tensor LR (torch allows them)
                    if lr.numel() != 1 or not bool(torch.isfinite(lr).all()):
                        raise refuse(f"{key}[{i}]", f"must be a finite learning rate, got {lr!r}")
                else:
                    check_real(f"{key}[{i}]", lr)
        self.__dict__.update(copy.deepcopy(sd))
        self.final_ratio = float(self.final_ratio)
