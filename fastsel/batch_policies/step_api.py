"""What a batch policy may use of the training step it is attached to: the ``StepView``
protocol. :class:`fastsel.SelectiveStep` satisfies it; a policy is typed against it, so it
depends on this interface and never on the step's module (or its private members)."""
from __future__ import annotations

from typing import Any, List, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

#: (loss, sample indices) of each backward batch a policy had trained (``train_chosen``)
Trained = List[Tuple[torch.Tensor, Optional[torch.Tensor]]]


@runtime_checkable
class StepView(Protocol):
    """The members of a training step that a :class:`~fastsel.batch_policies.BatchPolicy`
    calls: the model and its settings, timing and counting, and the forward passes the step
    runs for it (each observed by the sampler, counted and timed)."""

    #: the classifier being trained (``model(x)`` → logits [B, C])
    model: nn.Module
    #: seeds the policy's random decisions
    seed: int
    #: N, the number of samples (for per-sample state), or None when unknown
    num_samples: Optional[int]
    #: the backward batch size (set from the first input batch when not given)
    batch_size: Optional[int]
    #: the label the losses ignore
    ignore_index: int

    @property
    def epoch(self) -> int:
        """The current epoch."""
        ...

    def clock(self) -> float:
        """A timestamp (after a device sync when profiling)."""
        ...

    def sync_for_timing(self) -> None:
        """Synchronise the device when profiling, so that times are device times."""
        ...

    def add_selection_time(self, t0: float) -> None:
        """Count the time since ``t0`` (a ``clock()``) as selection time."""
        ...

    def topk(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the k largest values (ties to the lower position)."""
        ...

    def autocast_ctx(self, x: torch.Tensor) -> Any:
        """The autocast context every forward pass on ``x`` runs under."""
        ...

    def count_selection_forward(self, n: int) -> None:
        """Count ``n`` rows of a full forward pass run to select."""
        ...

    def count_exit_forward(self, n: int) -> None:
        """Count ``n`` rows of a forward pass that ended at an early exit."""
        ...

    def observe(self, logits: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        """Feed every row once to the epoch-level sampler (if any)."""
        ...

    def skip_observation(self, idx: Optional[torch.Tensor]) -> None:
        """A batch chosen without a forward pass: the sampler counts it as consumed."""
        ...

    def selection_forward(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor],
                          scale_factor: float = 1.0) -> torch.Tensor:
        """Per-sample losses (float32) of a forward pass without gradients on every row."""
        ...

    def probe_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """True per-sample losses without gradients, counted as probe forward passes."""
        ...

    def train_rows(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward on one backward batch (optimizer step when due): its loss
        and per-sample losses, both detached."""
        ...
