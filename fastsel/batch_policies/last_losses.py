"""StaleSB's per-sample last losses: each sample's last recorded loss and whether it has
one, and their checkpoint fields ``last_loss`` and ``known`` (stored at the top of
SelectiveStep's state_dict)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..validation.fields import check_tensor, check_values, refuse


class LastLosses:
    """The last loss of each of ``n`` samples, on the device of the losses recorded."""

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.loss: Optional[torch.Tensor] = None
        self.known: Optional[torch.Tensor] = None

    def record(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Store the losses of samples ``idx``; a NaN/inf loss makes its sample unknown."""
        if self.loss is None or self.known is None:
            self.loss = torch.zeros(self.n, dtype=torch.float32, device=losses.device)
            self.known = torch.zeros(self.n, dtype=torch.bool, device=losses.device)
        elif self.loss.device != losses.device:   # e.g. loaded on another device
            self.loss, self.known = self.loss.to(losses.device), self.known.to(losses.device)
        i = idx.to(device=losses.device, dtype=torch.int64)
        loss = losses.detach().float()
        # A NaN/inf loss is no usable last loss: the sample counts as unknown, so always kept
        # (as the CDF of 1 of a NaN or +inf loss kept it) and the saved last losses are finite.
        finite = torch.isfinite(loss)
        self.loss.index_copy_(0, i, torch.where(finite, loss, torch.zeros_like(loss)))
        self.known.index_copy_(0, i, finite)

    def lookup(self, idx: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(each sample's last recorded loss, whether it has one)."""
        if idx is None:
            raise ValueError("stale Selective Backprop needs the sample indices: call step(x, y, idx)")
        i = idx.to(torch.int64)
        if self.loss is None or self.known is None:
            return (torch.zeros(i.shape[0], dtype=torch.float32, device=i.device),
                    torch.zeros(i.shape[0], dtype=torch.bool, device=i.device))
        i = i.to(self.loss.device)
        return self.loss[i], self.known[i]

    # ---- the checkpoint fields ``last_loss`` and ``known`` ------------------------------------
    def state(self) -> Dict[str, Optional[torch.Tensor]]:
        """CPU copies of the last losses and the known flags (None before any is recorded)."""
        return {"last_loss": None if self.loss is None else self.loss.cpu().clone(),
                "known": None if self.known is None else self.known.cpu().clone()}

    def load_state(self, sd: Mapping[str, Any], device: Optional[torch.device]) -> None:
        """Check first (``check_last_losses``), then hold copies on ``device`` (the saved
        one if None): never the caller's tensors."""
        check_last_losses(sd, self.n)
        last, known = sd.get("last_loss"), sd.get("known")
        if last is None:
            self.loss = self.known = None
            return
        dev = device or last.device
        self.loss = last.detach().to(dev, copy=True)
        self.known = known.detach().to(dev, copy=True)


def check_last_losses(sd: Mapping[str, Any], n: Optional[int]) -> None:
    """Raise a ValueError naming the field unless ``sd``'s ``last_loss`` and ``known`` are
    both None, or the finite float32 losses and bool flags of ``n`` samples (``n`` None:
    a step that keeps no last losses, where only None fits); changes nothing."""
    last, known = sd.get("last_loss"), sd.get("known")
    if (last is None) != (known is None):
        raise refuse("last_loss" if last is None else "known",
                     "is None but " + ("known" if last is None else "last_loss") + " is not: "
                     "both are saved together")
    if last is None:
        return
    if n is None:
        raise refuse("last_loss", "is saved, but this step keeps no last losses (StaleSB "
                                  "with num_samples= does)")
    check_tensor("last_loss", last, torch.float32, (n,))
    check_values("last_loss", last, finite=True)
    check_tensor("known", known, torch.bool, (n,))
