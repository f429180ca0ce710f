"""Budget-aware linear LR decay (Li, Yumer, Ramanan, "Budgeted Training", seed 001)."""
from __future__ import annotations

from typing import List

import torch
from torch.optim.lr_scheduler import LRScheduler


class BudgetLR(LRScheduler):
    """Linear decay from each group's initial LR to ``final_ratio`` of it, reached exactly
    when the sampler's budget is spent: by trained samples for a fraction budget (the same
    as by steps, whatever the batch size), by elapsed wall-clock share for a time budget.

    Call ``step()`` after each ``optimizer.step()``, as with any per-step scheduler.
    """

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
