"""What every batch-level policy is: score the rows of a mini-batch, keep some of them.

A policy's ``choose`` runs whatever forward pass it needs through the
:class:`fastsel.SelectiveStep` it is attached to and returns the positions (in the
batch) of the rows that get the full forward and backward pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from ..validation.fields import check_policy_state, refuse
from ..validation.values import check_real
from .step_api import StepView, Trained

#: ``(values, k) -> positions of the k largest values``; a GPU kernel may be plugged in.
TopK = Callable[[torch.Tensor, int], torch.Tensor]
#: Fields of SelectiveStep's state_dict that the policy owns, stored beside ``policy`` at
#: the top level (where format 1 has always kept them): SB's pending rows, StaleSB's
#: last losses.
STEP_FIELDS = ("last_loss", "known", "pending")


def batch_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest values, in rank order; ties go to the lower position and
    NaN ranks last (a stable descending sort, so the result is deterministic)."""
    v = torch.nan_to_num(values.detach().float(), nan=float("-inf"))
    return torch.sort(v, descending=True, stable=True).indices[:k]


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (float64) with ties given their average rank."""
    x = x.detach().double().flatten()
    n = x.numel()
    s, order = torch.sort(x, stable=True)
    pos = torch.arange(n, dtype=torch.float64, device=x.device)
    # Average ranks over groups of equal values.
    start = torch.ones(n, dtype=torch.bool, device=x.device)
    if n > 1:
        start[1:] = s[1:] != s[:-1]
    group = torch.cumsum(start.to(torch.int64), 0) - 1
    ngroups = int(group[-1]) + 1 if n else 0
    sums = torch.zeros(ngroups, dtype=torch.float64, device=x.device).index_add_(0, group, pos)
    cnts = torch.zeros(ngroups, dtype=torch.float64, device=x.device).index_add_(
        0, group, torch.ones_like(pos))
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    out[order] = (sums / cnts)[group]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (NaN if either is constant)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(torch.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def check_keep(keep: Any) -> float:
    """A share in (0, 1] or a clear error."""
    return check_real("keep", keep, 0, 1, lo_open=True, what="a share")  # type: ignore[return-value]


def check_scale_factor(scale_factor: Any) -> float:
    """The selection forward's downsampling factor: a number in (0, 1], or a clear error."""
    return check_real("scale_factor", scale_factor, 0, 1, lo_open=True,  # type: ignore[return-value]
                      what="a number", fix="the selection forward's downsampling of the "
                                           "images; 1.0 is full resolution")


def downsample(x: Any, scale_factor: float) -> Any:
    """Images [B, C, H, W] interpolated (bilinear) by ``scale_factor`` for a cheaper
    selection forward; ``x`` as is at 1.0. Anything but a floating 4-D image batch, or a
    factor that leaves no pixel, is refused with a clear error."""
    if scale_factor == 1.0:
        return x
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"scale_factor={scale_factor} downsamples images [B, C, H, W] for the "
                         f"selection forward, but the input is not one (got {shape}); use "
                         f"scale_factor=1.0 for other inputs")
    if not x.is_floating_point():
        raise ValueError(f"scale_factor={scale_factor} needs floating-point images to "
                         f"interpolate, got {x.dtype}; convert the batch to float first or use "
                         f"scale_factor=1.0")
    h, w = int(x.shape[2]), int(x.shape[3])
    if math.floor(h * scale_factor) < 1 or math.floor(w * scale_factor) < 1:
        raise ValueError(f"scale_factor={scale_factor} leaves no pixel of a {h}x{w} image; "
                         f"use a larger factor")
    return torch.nn.functional.interpolate(x, scale_factor=scale_factor, mode="bilinear",
                                           align_corners=False, recompute_scale_factor=False)


class BatchPolicy:
    """Base class: subclasses set ``name`` and implement ``choose``. The step a policy is
    attached to is a :class:`~fastsel.batch_policies.StepView`: what it may use of it.

    ``fixed_batch``: chosen rows are pooled into backward batches of a constant size
    (Selective Backprop, whose ``train_chosen`` pools them) instead of one backward batch
    per input batch.
    """

    name = "batch-policy"
    fixed_batch = False
    #: the policy keeps each sample's last loss (StaleSB: ``record_losses`` fills it)
    needs_last_loss = False

    def attach(self, step: StepView) -> None:
        """Called once by ``SelectiveStep``: check the model, register hooks."""

    def detach(self) -> None:
        """Remove whatever ``attach`` registered."""

    def choose(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
               idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Positions (int64, on the batch's device) of the rows to backprop."""
        raise NotImplementedError

    def after_train(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
                    idx: Optional[torch.Tensor], chosen: torch.Tensor,
                    train_losses: torch.Tensor) -> None:
        """Called after the backward batch of an input batch was trained (not for pooled
        batches): ``train_losses`` are the true per-sample losses of ``chosen``."""

    def train_chosen(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
                     idx: Optional[torch.Tensor], chosen: torch.Tensor) -> Trained:
        """Train the rows ``chosen`` (sorted positions) of an input batch: here one backward
        batch of them (none if none was chosen), then ``after_train``."""
        if not chosen.numel():
            return []
        ib = None if idx is None else idx[chosen]
        loss, per = step.train_rows(x[chosen], y[chosen], ib)
        self.after_train(step, x, y, idx, chosen, per)
        return [(loss, ib)]

    def record_losses(self, idx: Optional[torch.Tensor], losses: torch.Tensor) -> None:
        """Called with the per-sample losses of every selection and training forward."""

    def flush(self, step: StepView) -> Optional[torch.Tensor]:
        """Train the rows still pending as one backward batch; its loss (None: none)."""
        return None

    @property
    def pending(self) -> int:
        """Chosen rows not trained yet (waiting for a full backward batch)."""
        return 0

    def end_epoch(self, step: StepView, accuracy: Optional[float]) -> None:
        """Called once per epoch boundary with the epoch's selection-forward accuracy."""

    def summary(self) -> Dict[str, Any]:
        return {}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name}

    def state_dict(self) -> Dict[str, Any]:
        """The policy's state (tensors, numbers, lists: loadable with weights_only=True)."""
        return {}

    def check_state_dict(self, sd: Any) -> None:
        """Raise a ValueError naming the field unless ``sd`` is a ``state_dict()`` of this
        policy; changes nothing. Subclasses with state extend it."""
        check_policy_state(sd, "policy", type(self).state_dict is BatchPolicy.state_dict)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Check ``sd`` first (``check_state_dict``), then restore it."""
        self.check_state_dict(sd)

    def step_fields(self) -> Dict[str, Any]:
        """The policy's ``STEP_FIELDS`` of the step's state_dict (None: it keeps none)."""
        return dict.fromkeys(STEP_FIELDS)

    def check_step_fields(self, sd: Mapping[str, Any]) -> None:
        """Raise a ValueError naming the field unless the ``STEP_FIELDS`` of the step's
        state_dict ``sd`` fit this policy (absent or None here); changes nothing."""
        for key in STEP_FIELDS:
            if sd.get(key) is not None:
                raise refuse(key, f"must be None: policy {self.name!r} keeps no such state")

    def load_step_fields(self, sd: Mapping[str, Any], device: Optional[torch.device]) -> None:
        """Check them first (``check_step_fields``), then hold copies on ``device``."""
        self.check_step_fields(sd)
