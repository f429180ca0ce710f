"""InfoBatch-style pruning (Qin et al., ICLR 2024) with an exact number of samples per epoch."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..state import SampleState
from ..validation.values import round_half_up
from .base import Policy, Selection, SelectionContext


class InfoBatch(Policy):
    """InfoBatch (Qin et al., ICLR 2024): prune a random share ``prune`` (r) of the samples
    whose loss EMA is below the mean, rescale the kept ones' loss by 1/(1 − r) so the
    expected gradient is unchanged, and anneal: the last ``anneal`` (δ) share of the budget
    trains without pruning.

    InfoBatch's epoch length varies; here it is exact. With k samples to select, H the
    samples at or above the mean (never-trained ones count as H) and L those below:
    if k ≥ |H| + (1 − r)|L|, all of H and k − |H| random samples of L are kept; otherwise
    both groups are sampled at rates in InfoBatch's ratio (L kept at 1 − r times H's rate).
    A kept L sample's weight is the ratio of the two keep rates — exactly 1/(1 − r) in
    InfoBatch's own regime. Under a time budget k is InfoBatch's own count, |H| + (1 − r)|L|.
    In the anneal share, k samples are drawn uniformly with weight 1: without bias and
    without rescale, as full-data annealing is, within the budget.
    """

    name = "infobatch"
    uses_mean_loss = False  # it splits at the mean itself (low_loss)

    def __init__(self, prune: float = 0.5, anneal: float = 0.125) -> None:
        super().__init__(keep=1.0)
        if not 0.0 <= float(prune) < 1.0:
            raise ValueError(f"prune must be in [0, 1), got prune={prune}")
        if not 0.0 <= float(anneal) <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got anneal={anneal}")
        self.prune = float(prune)
        self.anneal = float(anneal)
        self._time_share = 1.0

    def time_share(self) -> float:
        return self._time_share

    def observe(self, state: SampleState, mean_loss: Optional[float], time_mode: bool) -> None:
        """Under a time budget, set this epoch's share to InfoBatch's own count."""
        if time_mode:
            self._time_share = 1.0 - self.prune * float(self.low_loss(state).sum()) / state.n

    @staticmethod
    def low_loss(state: SampleState) -> torch.Tensor:
        """Trained samples whose loss EMA is below the mean over trained samples."""
        seen = state.seen > 0
        if not bool(seen.any()):
            return torch.zeros_like(seen)
        loss = state.loss
        mean = torch.where(seen, loss, torch.zeros_like(loss)).sum() / seen.sum()
        return seen & (loss < mean)

    def select(self, ctx: SelectionContext) -> Selection:
        if ctx.progress >= 1.0 - self.anneal:
            return self.uniform_selection(ctx)
        low = self.low_loss(ctx.state)
        m = int(low.sum())
        h = ctx.n - m
        k = ctx.k
        if m == 0:
            return self.uniform_selection(ctx)
        if k >= h + (1.0 - self.prune) * m:
            k_h, k_l = h, k - h
        else:
            k_h = min(h, round_half_up(k * h / (h + (1.0 - self.prune) * m)))
            k_l = k - k_h
        u = ctx.uniform()
        neg = torch.full_like(u, float("-inf"))
        parts = []
        if k_h > 0:
            parts.append(ctx.top(torch.where(low, neg, u), k_h))
        weights = torch.ones(ctx.n, dtype=torch.float32, device=u.device)
        if k_l > 0:
            kept_low = ctx.top(torch.where(low, u, neg), k_l)
            parts.append(kept_low)
            # Ratio of keep rates; with no H slot the rates are InfoBatch's own ratio.
            ratio = (k_h / h) / (k_l / m) if k_h > 0 else 1.0 / (1.0 - self.prune)
            weights[kept_low] = ratio
        return Selection(torch.cat(parts), weights)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "prune": self.prune, "anneal": self.anneal}
