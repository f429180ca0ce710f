"""The baselines of Arazo et al. (seed 002): unif-SGD and scan-SGD."""
from __future__ import annotations

from .base import Policy, Selection, SelectionContext


class Uniform(Policy):
    """unif-SGD (Arazo et al., seed 002): a fresh uniform random N·B subset every epoch,
    drawn without replacement, for all T epochs. With a linear LR decay, the baseline every
    other policy must beat."""

    name = "uniform"
    uses_mean_loss = False

    def select(self, ctx: SelectionContext) -> Selection:
        return self.uniform_selection(ctx)


class Scan(Policy):
    """scan-SGD (Arazo et al., seed 002): truncated training — full shuffled epochs, but
    only round(T·B) of them."""

    name = "scan"
    uses_mean_loss = False

    def count(self, n: int, budget: float) -> int:
        return n

    def num_epochs(self, epochs: int, budget: float) -> int:
        return max(1, int(epochs * budget + 0.5))

    def select(self, ctx: SelectionContext) -> Selection:
        return self.uniform_selection(ctx)
