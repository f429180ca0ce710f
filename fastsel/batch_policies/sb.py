"""Selective Backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the
Biggest Losers"; as used in Arazo et al., seed 002, eq. 4) and its stale variant."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from .. import rng
from ..state import check_fields, check_int, check_tensor, refuse
from .base import BatchPolicy, check_keep

if TYPE_CHECKING:  # pragma: no cover
    from ..selective import SelectiveStep

_STREAM_SB = 11


class LossHistory:
    """The last ``R`` losses, in a ring buffer tensor on the device (no host sync)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.buf: Optional[torch.Tensor] = None
        self.pos = 0        # next slot to write
        self.filled = 0     # valid entries (host-side count: batch sizes are known)

    def push(self, losses: torch.Tensor) -> None:
        v = losses.detach().float().flatten()
        if self.buf is None or self.buf.device != v.device:
            self.buf = torch.zeros(self.size, dtype=torch.float32, device=v.device)
        if v.numel() > self.size:
            # Only the last R of a batch larger than the history survive; write them in
            # ring order so that the oldest is overwritten first next time.
            v = v[-self.size:]
        n = v.numel()
        slots = (self.pos + torch.arange(n, device=v.device)) % self.size
        self.buf.index_copy_(0, slots, v)
        self.pos = (self.pos + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def cdf(self, losses: torch.Tensor) -> torch.Tensor:
        """Empirical CDF of the history at each loss: share of history values <= loss."""
        if self.filled == 0 or self.buf is None:
            return torch.ones_like(losses, dtype=torch.float32)
        hist = torch.sort(self.buf[: self.filled]).values
        below = torch.searchsorted(hist, losses.detach().float().contiguous(), right=True)
        return below.to(torch.float32) / float(self.filled)

    def state_dict(self) -> Dict[str, Any]:
        return {"size": self.size, "pos": self.pos, "filled": self.filled,
                "buf": None if self.buf is None else self.buf.detach().cpu().clone()}

    _KEYS = ("size", "pos", "filled", "buf")

    def check_state_dict(self, sd: Any, where: str = "policy.history") -> None:
        """Raise a ValueError naming the field unless ``sd`` is a ``state_dict()`` of a
        history of this size; changes nothing. The buffer may hold non-finite losses (an
        fp16 overflow is pushed as it came), so only its dtype and shape are checked."""
        check_fields(sd, self._KEYS, where)
        size = check_int(f"{where}.size", sd["size"], lo=1)
        if size != self.size:
            raise ValueError(f"history state is for R={size}, this policy has R={self.size}")
        check_int(f"{where}.pos", sd["pos"], lo=0, hi=self.size - 1)
        filled = check_int(f"{where}.filled", sd["filled"], lo=0, hi=self.size)
        if sd["buf"] is None:
            if filled:
                raise refuse(f"{where}.buf", f"is None but {where}.filled={filled} losses are recorded")
        else:
            check_tensor(f"{where}.buf", sd["buf"], torch.float32, (self.size,))

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Check ``sd`` first, then restore a copy of it (never the caller's tensor)."""
        self.check_state_dict(sd)
        self.pos, self.filled = int(sd["pos"]), int(sd["filled"])
        self.buf = None if sd["buf"] is None else sd["buf"].detach().clone()


class SelectiveBackprop(BatchPolicy):
    """Selective Backprop: forward every sample without gradients, keep each for the
    backward pass with probability ``CDF_R(loss) ** b`` (Jiang et al. 2019; Arazo et al.
    eq. 4), pooling kept samples into backward batches of a constant size.

    Args:
        b: selectivity β > 0 (0 keeps everything). A loss at the history's q-quantile is
            kept with probability q**b, so on a stationary loss distribution the expected
            kept share is 1 / (b + 1).
        keep: instead of ``b``, the expected kept share: b = 1/keep − 1 (default 0.5, b = 1).
        history: R, how many recent losses the CDF is taken over (a ring buffer on the
            device). The current batch's losses enter the history before its CDF is taken,
            so the very first batch is judged against itself.
        stale: None (plain SB) or n ≥ 1: StaleSB. The selection forward runs only in
            epochs e with e % n == 0; in the other epochs each sample's last recorded loss
            (from its last selection or training forward) decides, and the selection
            forward is skipped. n = 1 is plain SB; n = 2 reuses the previous epoch's losses.
            A sample with no recorded loss yet is always kept. Needs ``num_samples`` (or a
            sampler) on the ``SelectiveStep``. With a sampler, a stale epoch's batches are
            counted as consumed (``Sampler.skip``) but not observed.
        leftover: what happens at an epoch boundary to kept samples that do not fill a
            backward batch: "carry" (default) keeps them pending into the next epoch, so
            every backward batch has the same size; "flush" trains them at once as one
            smaller batch. ``SelectiveStep.flush()`` trains what is pending at any time
            (call it at the end of training).

    Randomness: one counter-based uniform per forwarded sample (``fastsel.rng``), keyed by
    the seed, so runs with the same seed draw the same decisions on every device.
    """

    name = "sb"
    fixed_batch = True

    def __init__(self, keep: Optional[float] = None, b: Optional[float] = None,
                 history: int = 1024, stale: Optional[int] = None, leftover: str = "carry") -> None:
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
                raise ValueError(f"b must be a finite number >= 0 (the selectivity), got b={b!r}")
            if keep is not None:
                raise ValueError(f"give keep= or b= for Selective Backprop, not both "
                                 f"(keep={keep!r}, b={b!r}; keep = 1 / (b + 1))")
            self.b = float(b)
        else:
            k = check_keep(0.5 if keep is None else keep)
            self.b = 1.0 / k - 1.0
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int (R, the losses the CDF is taken "
                             f"over), got history={history!r}")
        if stale is not None and (isinstance(stale, bool) or not isinstance(stale, int) or stale < 1):
            raise ValueError(f"stale must be None or an int n >= 1 (a selection forward every n "
                             f"epochs), got stale={stale!r}")
        if leftover not in ("carry", "flush"):
            raise ValueError(f"leftover must be 'carry' or 'flush', got leftover={leftover!r}")
        self.history = LossHistory(history)
        self.stale = stale
        self.leftover = leftover
        self.draws = 0          # uniforms drawn so far (the counter of the RNG)
        self.key = 0
        self.stale_batches = 0

    @property
    def keep(self) -> float:
        """Expected kept share on a stationary loss distribution."""
        return 1.0 / (self.b + 1.0)

    def attach(self, step: "SelectiveStep") -> None:
        self.key = rng.mix32_int((int(step.seed) * 0x9E3779B1 + 0x5B) & rng.MASK32)
        if self.stale is not None:
            if step.num_samples is None:
                raise ValueError("stale Selective Backprop needs num_samples= (N, to keep each "
                                 "sample's last loss) on SelectiveStep")

    # ---- the formula ------------------------------------------------------------------
    def probability(self, losses: torch.Tensor) -> torch.Tensor:
        """Keep probability CDF_R(loss)**b against the current history (not pushed)."""
        if self.b == 0.0:
            return torch.ones_like(losses, dtype=torch.float32)
        return self.history.cdf(losses) ** self.b

    def uniforms(self, n: int, device: torch.device) -> torch.Tensor:
        counter = self.draws + torch.arange(n, device=device, dtype=torch.int64)
        key = rng.mix32_int(self.key ^ (self.draws >> 32))
        u = rng.uniform(counter, key, _STREAM_SB)
        self.draws += n
        return u

    def decide(self, losses: torch.Tensor, known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Push ``losses`` (those ``known``, if given) into the history, then draw each
        row's keep decision (a bool mask); a row not ``known`` is always kept."""
        self.history.push(losses if known is None else losses[known])
        p = self.probability(losses)
        if known is not None:
            p = torch.where(known, p, torch.ones_like(p))
        return self.uniforms(losses.numel(), losses.device) < p

    # ---- the step ---------------------------------------------------------------------
    def is_stale_epoch(self, epoch: int) -> bool:
        return self.stale is not None and epoch % self.stale != 0

    def choose(self, step: "SelectiveStep", x: torch.Tensor, y: torch.Tensor,
               idx: Optional[torch.Tensor]) -> torch.Tensor:
        if self.is_stale_epoch(step.epoch):
            losses, known = step.last_losses(idx)
            step.skip_observation(idx)
            self.stale_batches += 1
            t0 = step.clock()
            keep = self.decide(losses, known)
        else:
            losses = step.selection_forward(x, y, idx)
            t0 = step.clock()
            keep = self.decide(losses)
        pos = torch.nonzero(keep).flatten()
        step.add_selection_time(t0)
        return pos

    @property
    def needs_last_loss(self) -> bool:
        return self.stale is not None

    def summary(self) -> Dict[str, Any]:
        return {"b": self.b, "history": self.history.size, "stale": self.stale,
                "stale_batches": self.stale_batches}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "b": self.b, "history": self.history.size,
                "stale": self.stale, "leftover": self.leftover}

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history.state_dict(), "draws": self.draws,
                "stale_batches": self.stale_batches}

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, ("history", "draws", "stale_batches"), "policy")
        self.history.check_state_dict(sd["history"])
        check_int("policy.draws", sd["draws"], lo=0)
        check_int("policy.stale_batches", sd["stale_batches"], lo=0)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self.history.load_state_dict(sd["history"])
        self.draws = int(sd["draws"])
        self.stale_batches = int(sd["stale_batches"])
