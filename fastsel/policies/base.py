"""What every epoch-level policy is: a key per sample, then keep the k largest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .. import rng
from ..state import SampleState
from ..validation.fields import check_policy_state
from ..validation.values import round_half_up  # noqa: F401  (the policies' import)


@dataclass
class SelectionContext:
    """Everything a policy may look at when it draws one epoch's selection.

    ``k``: samples to select. ``key``: the epoch's counter-based RNG key. ``progress``:
    share of the budget spent when the epoch starts.
    """

    state: SampleState
    backend: Any
    epoch: int
    k: int
    key: int
    progress: float
    time_mode: bool

    @property
    def n(self) -> int:
        return self.state.n

    def uniform(self, stream: int = rng.STREAM_SELECT) -> torch.Tensor:
        """One uniform (0, 1) draw per sample for this epoch and stream."""
        idx = torch.arange(self.n, device=self.state.device)
        return self.backend.uniform(idx, self.key, stream)

    def top(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys (ties by index) through the backend."""
        return self.backend.select(keys, k)

    def seen_mask(self) -> torch.Tensor:
        return self.state.seen > 0


@dataclass
class Selection:
    """One epoch's choice: indices in rank order and, optionally, per-sample loss weights."""

    indices: torch.Tensor
    weights: Optional[torch.Tensor] = None


class Policy:
    """Base class. Subclasses set ``name`` and implement ``select``.

    ``keep``: under a time budget, the share of samples each epoch selects (fraction
    budgets fix it at the budget instead). ``uses_mean_loss``: whether ``observe`` reads
    the mean loss (a pass over N that the sampler skips for policies that do not).
    """

    name = "policy"
    uses_mean_loss = True

    def __init__(self, keep: float = 1.0) -> None:
        if not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got keep={keep}")
        self.keep = float(keep)

    def count(self, n: int, budget: float) -> int:
        """Samples per epoch under a fraction budget: exactly round(N·B)."""
        return max(1, min(n, round_half_up(n * budget)))

    def num_epochs(self, epochs: int, budget: float) -> int:
        """Epochs trained under a fraction budget (all of them, by default)."""
        return epochs

    def time_share(self) -> float:
        """Share of samples per epoch under a time budget."""
        return self.keep

    def observe(self, state: SampleState, mean_loss: Optional[float], time_mode: bool) -> None:
        """Called once per selection pass, before the epoch's count is fixed: adaptive
        policies update themselves from the synchronised state and the mean loss EMA over
        trained samples (None before any, or if ``uses_mean_loss`` is False)."""

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def uniform_selection(self, ctx: SelectionContext) -> Selection:
        """A uniform random k-subset without replacement (unif-SGD's draw)."""
        return Selection(ctx.top(ctx.uniform(), ctx.k))

    def config(self) -> Dict[str, Any]:
        """The parameters that must match for a checkpoint to resume under this policy."""
        return {"name": self.name, "keep": self.keep}

    def state_dict(self) -> Dict[str, Any]:
        """The policy's adaptive state (plain numbers: loadable with weights_only=True)."""
        return {}

    def check_state_dict(self, sd: Any) -> None:
        """Raise a ValueError naming the field unless ``sd`` is a ``state_dict()`` of this
        policy; changes nothing. Subclasses with state extend it."""
        check_policy_state(sd, "policy_state", type(self).state_dict is Policy.state_dict)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Check ``sd`` first (``check_state_dict``), then restore it."""
        self.check_state_dict(sd)
