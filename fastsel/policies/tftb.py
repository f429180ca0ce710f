"""TFTB: Khan et al., "Accelerating Deep Learning with Fixed Time Budget" (seed 000)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import rng
from ..state import SampleState
from ..validation.fields import check_fields, check_real
from ..validation.values import round_half_up
from .base import Policy, Selection, SelectionContext


class TFTB(Policy):
    """Train with Fixed Time Budget (Khan et al., arXiv 2410.03790, seed 000).

    Importance is the per-sample loss (its EMA), weighted by its variance across
    iterations; the top share is kept and everything is re-ranked every epoch, retained and
    eliminated samples merged. The choices the paper leaves open, made here:

    * variance weighting: ``score = loss · (1 + σ / σ̄)``, σ the EW standard deviation of
      the sample's loss and σ̄ its mean over trained samples — scale-free, and a sample
      seen once (σ = 0) keeps its plain loss;
    * a sample never trained has no loss: it ranks above every trained one, so the first
      ⌈1/share⌉ epochs cover the data once — the paper's initial full-data pass, spread
      over the budget instead of spent up front;
    * eliminated samples keep a stale loss, which a pure top-k never refreshes: a share
      ``explore`` of each epoch's slots is drawn uniformly from the non-top samples;
    * α adapts from convergence, measured once per epoch as the relative drop of the mean
      loss EMA over trained samples: under a time budget (where the paper's α sets the
      kept share 1 − α), progress ≥ ``tol`` raises α by ``step`` (focus while focus
      pays), a plateau lowers it (more data, more diversity), within ``alpha_range``.
      Under a fraction budget the kept share is pinned to the budget, so the same rule
      moves ``explore`` instead (a plateau explores more), within ``explore_range``.

    ``alpha``: initial eliminated share (paper: 0.3). ``adaptive``: adapt as above.
    """

    name = "tftb"

    def __init__(self, alpha: float = 0.3, adaptive: bool = True, explore: float = 0.1,
                 alpha_range: tuple = (0.1, 0.6), explore_range: tuple = (0.0, 0.5),
                 step: float = 0.05, tol: float = 0.01) -> None:
        super().__init__(keep=1.0)
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got alpha={alpha}")
        if not 0.0 <= float(explore) <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got explore={explore}")
        lo, hi = alpha_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= lo <= hi < 1, got {alpha_range}")
        elo, ehi = explore_range
        if not 0.0 <= elo <= ehi <= 1.0:
            raise ValueError(f"explore_range must satisfy 0 <= lo <= hi <= 1, got {explore_range}")
        self.alpha = float(alpha)
        self.explore = float(explore)
        self.adaptive = bool(adaptive)
        self.alpha_range = (float(lo), float(hi))
        self.explore_range = (float(elo), float(ehi))
        self.step = float(step)
        self.tol = float(tol)
        self._prev_loss: Optional[float] = None

    def time_share(self) -> float:
        return 1.0 - self.alpha

    def observe(self, state: SampleState, mean_loss: Optional[float], time_mode: bool) -> None:
        """Adapt α (time budget) or the exploration share (fraction budget) once per epoch."""
        if mean_loss is None:
            return
        prev, self._prev_loss = self._prev_loss, mean_loss
        if not self.adaptive or prev is None or prev <= 0.0:
            return
        improving = (prev - mean_loss) / prev >= self.tol
        if time_mode:
            lo, hi = self.alpha_range
            self.alpha = min(hi, max(lo, self.alpha + (self.step if improving else -self.step)))
        else:
            lo, hi = self.explore_range
            self.explore = min(hi, max(lo, self.explore + (-self.step if improving else self.step)))

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """Variance-weighted importance per sample; +inf for samples never trained."""
        st = ctx.state
        seen = ctx.seen_mask()
        std = torch.sqrt(st.loss_var.clamp(min=0.0))
        sbar = torch.where(seen, std, torch.zeros_like(std)).sum() / seen.sum().clamp(min=1)
        score = st.loss * (1.0 + std / (sbar + 1e-12))
        return torch.where(seen, score, torch.full_like(score, float("inf")))

    def select(self, ctx: SelectionContext) -> Selection:
        if not bool(ctx.seen_mask().any()):
            return self.uniform_selection(ctx)
        k = ctx.k
        n_top = k - round_half_up(self.explore * k)
        top = ctx.top(self.scores(ctx), n_top)
        if n_top == k:
            return Selection(top)
        u = ctx.uniform(rng.STREAM_EXPLORE)
        u[top] = float("-inf")
        rest = ctx.top(u, k - n_top)
        return Selection(torch.cat([top, rest]))

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "adaptive": self.adaptive, "alpha_range": list(self.alpha_range),
                "explore_range": list(self.explore_range), "step": self.step, "tol": self.tol}

    def state_dict(self) -> Dict[str, Any]:
        return {"alpha": self.alpha, "explore": self.explore, "prev_loss": self._prev_loss}

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, ("alpha", "explore", "prev_loss"), "policy_state")
        check_real("policy_state.alpha", sd["alpha"], lo=0.0, hi=1.0, hi_open=True)
        check_real("policy_state.explore", sd["explore"], lo=0.0, hi=1.0)
        if sd["prev_loss"] is not None:
            check_real("policy_state.prev_loss", sd["prev_loss"])

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self.alpha = float(sd["alpha"])
        self.explore = float(sd["explore"])
        self._prev_loss = None if sd["prev_loss"] is None else float(sd["prev_loss"])
