"""p-SGD and c-SGD: Chang et al. 2017 ("Active Bias") as adapted by Arazo et al. (seed 002)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .. import rng
from .base import Policy, Selection, SelectionContext


class _ActiveBias(Policy):
    """Importance from the history of p_true, the predicted probability of the true class,
    smoothed by ε = the mean importance (Arazo's eq. 2), then N·B samples drawn without
    replacement in proportion to it (Gumbel-top-k on log-weights).

    ``warmup``: epochs of uniform sampling before importance is used (Chang et al. use a
    warm-up; Arazo's budgeted runs use none). A sample never trained has no history: it
    gets the mean importance of the trained ones.
    """

    uses_mean_loss = False

    def __init__(self, warmup: int = 0, keep: float = 1.0) -> None:
        super().__init__(keep)
        if int(warmup) < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got warmup={warmup}")
        self.warmup = int(warmup)

    def importance(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, ctx: SelectionContext) -> torch.Tensor:
        """Sampling weights (unnormalised) per sample, all positive."""
        seen = ctx.seen_mask()
        imp = self.importance(ctx.state.p_true.clamp(0.0, 1.0))
        n_seen = seen.sum().clamp(min=1)
        eps = torch.where(seen, imp, torch.zeros_like(imp)).sum() / n_seen
        imp = torch.where(seen, imp, eps)
        return imp + eps

    def select(self, ctx: SelectionContext) -> Selection:
        if ctx.epoch < self.warmup or not bool(ctx.seen_mask().any()):
            return self.uniform_selection(ctx)
        w = self.weights(ctx)
        if not bool((w > 0).any()):
            return self.uniform_selection(ctx)
        keys = torch.log(w.clamp(min=torch.finfo(torch.float32).tiny)) + rng.gumbel(ctx.uniform())
        return Selection(ctx.top(keys, ctx.k))

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "warmup": self.warmup}


class PSGD(_ActiveBias):
    """p-SGD (Chang et al. 2017; Arazo et al., seed 002): importance = mean over history of
    (1 − p_true) + ε — favours the samples the model finds hard."""

    name = "p-sgd"

    def importance(self, p: torch.Tensor) -> torch.Tensor:
        return 1.0 - p


class CSGD(_ActiveBias):
    """c-SGD (Chang et al. 2017; Arazo et al., seed 002): importance = p̄(1 − p̄) + ε with p̄
    the mean p_true over history — favours uncertain samples near the decision boundary."""

    name = "c-sgd"

    def importance(self, p: torch.Tensor) -> torch.Tensor:
        return p * (1.0 - p)
