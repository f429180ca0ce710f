"""Selective Backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the
Biggest Losers"; as used in Arazo et al., seed 002, eq. 4) and its stale variant."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .. import rng
from ..validation import values
from ..validation.fields import check_fields, check_int, check_real, check_tensor, refuse
from ..validation.values import round_half_up
from .base import BatchPolicy, batch_topk, check_keep, check_scale_factor
from .last_losses import LastLosses, check_last_losses
from .pending_rows import PendingRows, check_pending
from .step_api import StepView, Trained

_STREAM_SB = 11
#: ``share``: a deterministic count per batch (exact over an epoch), or SB's per-row coin.
SHARES = ("exact", "expected")
#: selection probability given to a row with no recorded loss (StaleSB): ahead of any known
#: row, whose probabilities are at most 1
_UNKNOWN_FIRST = 1e30
#: smallest selection probability used by the exact share (CDF**b can underflow to 0)
_TINY = 1e-30


def quota(carry: float, keep: float, rows: int) -> Tuple[int, float]:
    """The exact share's count for a batch of ``rows``: (k, the carry after it).

    k = round(carry + keep·rows) (halves up), clamped to [0, rows]; the new carry is what
    rounding left over, in [-0.5, 0.5). Summed over batches, the kept rows are
    keep·(rows seen) minus the last carry: within half a row of the nominal share."""
    target = carry + keep * rows
    k = min(rows, max(0, round_half_up(target)))
    return k, target - k


def inclusion_probabilities(p: torch.Tensor, k: int) -> torch.Tensor:
    """π_i = min(1, c·p_i), with the c > 0 that makes Σπ_i = k (0 <= k <= n).

    ``p``: non-negative selection probabilities (any scale); entries below a tiny floor
    are raised to it so that every row can be chosen. The rows capped at 1 are those with
    the largest p (the smallest set that leaves c·p <= 1 for the rest). On the device,
    without a host sync (k is a host int)."""
    n = p.numel()
    dt = torch.float32 if p.device.type == "mps" else torch.float64
    if k <= 0:
        return torch.zeros(n, dtype=dt, device=p.device)
    if k >= n:
        return torch.ones(n, dtype=dt, device=p.device)
    v = torch.nan_to_num(p.detach().to(dt).flatten(), nan=1.0).clamp_min(_TINY)
    s, order = torch.sort(v, descending=True, stable=True)
    # suffix[m] = s[m] + ... + s[n-1], summed from the smallest up.
    suffix = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))
    m = torch.arange(k, device=p.device, dtype=dt)
    c = (k - m) / suffix[:k]                         # c if the m largest rows are capped
    ok = (k - m) * s[:k] <= suffix[:k]               # ... and the largest other row fits
    first = torch.argmax(ok.to(torch.int8))          # the fewest caps (m = k-1 always fits)
    cap = torch.arange(n, device=p.device) < first
    pi_sorted = torch.where(cap, torch.ones_like(s), (c[first] * s).clamp_max(1.0))
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def systematic_sample(pi: torch.Tensor, k: int, u: torch.Tensor,
                      order: Optional[torch.Tensor] = None, topk=batch_topk) -> torch.Tensor:
    """Positions of exactly k rows, row i with probability ``pi[i]`` (Σpi = k): systematic
    sampling (Madow 1949) with one uniform ``u`` in [0, 1). Row i is taken when an integer
    lies in [C_{i-1} − u, C_i − u), C the cumulative sum of ``pi`` taken in ``order`` (a
    permutation of the rows; default: batch order). A random order (randomised systematic
    sampling, Hartley & Rao 1962) keeps neighbouring rows from being chosen in lockstep."""
    n = pi.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=pi.device)
    if k >= n:
        return torch.arange(n, device=pi.device)
    q = pi if order is None else pi[order]
    cum = torch.cumsum(q, 0)
    cum = cum * (k / cum[-1])                        # Σ exactly k, so exactly k crossings
    cum[-1] = float(k)
    prev = torch.cat([cum.new_zeros(1), cum[:-1]])
    uu = u.to(cum.dtype).reshape(())
    taken = torch.floor(cum - uu) > torch.floor(prev - uu)
    if order is not None:
        taken = torch.empty_like(taken).scatter_(0, order, taken)
    # Exactly k rows: rounding can only make the crossings miss by one, which the
    # probability then settles (taken rows first, then the most probable).
    return topk(taken.to(torch.float32) * 2.0 + pi.to(torch.float32), k)


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
    """Selective Backprop: forward every sample without gradients, prefer each for the
    backward pass by its selection probability ``CDF_R(loss) ** b`` (Jiang et al. 2019;
    Arazo et al. eq. 4), pooling kept samples into backward batches of a constant size.

    The kept share (``share``):

    * ``"exact"`` (default): each batch of B rows keeps exactly k = round(carry + keep·B)
      rows (halves up), and carry ← carry + keep·B − k goes to the next batch (it stays in
      [-0.5, 0.5), across epochs too). Over any run of batches the kept rows are thus
      keep × (rows seen) within one row — over an epoch, and over the whole run within half
      a row. Which k rows: sampling without replacement with inclusion probabilities
      π_i = min(1, c·p_i), p_i = CDF_R(loss_i)**b and c chosen so that Σπ_i = k
      (systematic sampling in a random order of the batch). So SB's preference holds
      inside each batch: a row is kept with a probability proportional to its selection
      probability, the highest ones for sure when they cap at 1 (on a stationary loss
      distribution c ≈ 1: π ≈ p, SB's own probabilities). What the quota gives up is the
      preference *across* batches (plain SB keeps more rows of a batch of hard samples);
      with shuffled batches that difference is mostly noise.
    * ``"expected"``: SB as published: each row kept with probability p_i by its own coin,
      so the share is keep only in expectation on a stationary loss distribution; as the
      losses fall during training their CDF against the history falls too, and 0.468–0.489
      was measured for keep 0.5.

    Args:
        b: selectivity β > 0 (0 keeps everything). A loss at the history's q-quantile is
            kept with probability q**b, so on a stationary loss distribution the expected
            kept share is 1 / (b + 1).
        keep: instead of ``b``, the kept share: b = 1/keep − 1 (default 0.5, b = 1); exact
            over an epoch with ``share="exact"``, in expectation with "expected".
        history: R, how many recent losses the CDF is taken over (a ring buffer on the
            device). The current batch's losses enter the history before its CDF is taken,
            so the very first batch is judged against itself.
        stale: None (plain SB) or n ≥ 1: StaleSB. The selection forward runs only in
            epochs e with e % n == 0; in the other epochs each sample's last recorded loss
            (from its last selection or training forward) decides, and the selection
            forward is skipped. n = 1 is plain SB; n = 2 reuses the previous epoch's losses.
            A sample with no recorded loss yet is always kept ("expected"), or kept first
            within the quota ("exact"). Needs ``num_samples`` (or a
            sampler) on the ``SelectiveStep``. With a sampler, a stale epoch's batches are
            counted as consumed (``Sampler.skip``) but not observed.
        leftover: what happens at an epoch boundary to kept samples that do not fill a
            backward batch: "carry" (default) keeps them pending into the next epoch, so
            every backward batch has the same size; "flush" trains them at once as one
            smaller batch. ``SelectiveStep.flush()`` trains what is pending at any time
            (call it at the end of training).
        share: "exact" (default) or "expected": see above. With "exact", a row with no
            recorded loss (StaleSB) comes first: such rows fill the quota before any
            known row (at random among themselves if there are more than k).
        scale_factor: in (0, 1] (default 1.0). Below 1 the selection forward sees the
            images downsampled by this factor (``F.interpolate``, bilinear, as Composer's
            ``scale_factor``): about scale_factor² of a full forward's cost for a
            convolutional network. The backward batch always uses the full-resolution rows.
            Needs image inputs [B, C, H, W] of a floating dtype and a model that accepts the
            smaller size (global pooling); anything else is refused with a clear error. The
            selection losses (and, with a sampler, the losses it observes) are those of the
            downsampled images.

    Randomness: counter-based uniforms (``fastsel.rng``), keyed by the seed — one per
    forwarded sample (plus one per batch with ``share="exact"``) — so runs with the same
    seed draw the same decisions on every device.
    """

    name = "sb"
    fixed_batch = True

    def __init__(self, keep: Optional[float] = None, b: Optional[float] = None,
                 history: int = 1024, stale: Optional[int] = None, leftover: str = "carry",
                 share: str = "exact", scale_factor: float = 1.0) -> None:
        if b is not None:
            values.check_real("b", b, lo=0, fix="b is the selectivity")
            if keep is not None:
                raise ValueError(f"give keep= or b= for Selective Backprop, not both "
                                 f"(keep={keep!r}, b={b!r}; keep = 1 / (b + 1))")
            self.b = float(b)
        else:
            k = check_keep(0.5 if keep is None else keep)
            self.b = 1.0 / k - 1.0
        values.check_int("history", history, lo=1, fix="R, how many recent losses the CDF is "
                                                       "taken over")
        stale = values.check_int("stale", stale, lo=1, allow_none=True, what="None or an int n",
                                 fix="a selection forward every n epochs")
        if leftover not in ("carry", "flush"):
            raise ValueError(f"leftover must be 'carry' or 'flush', got leftover={leftover!r}")
        if share not in SHARES:
            raise ValueError(f"share must be 'exact' (round(carry + keep*B) rows per batch) or "
                             f"'expected' (a coin per row), got share={share!r}")
        self.history = LossHistory(history)
        self.stale = stale
        self.leftover = leftover
        self.share = share
        self.scale_factor = check_scale_factor(scale_factor)
        self.draws = 0          # uniforms drawn so far (the counter of the RNG)
        self.key = 0
        self.stale_batches = 0
        self.carry = 0.0        # the exact share's fractional remainder, in [-0.5, 0.5)
        self.pool = PendingRows()                      # kept rows awaiting a backward batch
        self.last_loss: Optional[LastLosses] = None    # StaleSB's store, made by attach
        self.num_samples: Optional[int] = None

    @property
    def keep(self) -> float:
        """The kept share, 1 / (b + 1): the exact share's quota per row, and the expected
        share of ``share="expected"`` on a stationary loss distribution."""
        return 1.0 / (self.b + 1.0)

    def attach(self, step: StepView) -> None:
        self.key = rng.mix32_int((int(step.seed) * 0x9E3779B1 + 0x5B) & rng.MASK32)
        self.num_samples = step.num_samples
        if self.stale is not None:
            if step.num_samples is None:
                raise ValueError("stale Selective Backprop needs num_samples= (N, to keep each "
                                 "sample's last loss) on SelectiveStep")
            self.last_loss = LastLosses(step.num_samples)

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

    def select(self, losses: torch.Tensor, known: Optional[torch.Tensor] = None,
               topk=batch_topk) -> torch.Tensor:
        """The positions kept from one batch: with ``share="exact"`` exactly the quota's k
        rows (``quota``, ``inclusion_probabilities``, ``systematic_sample``), with
        "expected" each row by its coin (``decide``). Pushes the losses into the history."""
        if self.share == "expected":
            return torch.nonzero(self.decide(losses, known)).flatten()
        self.history.push(losses if known is None else losses[known])
        n = int(losses.numel())
        k, self.carry = quota(self.carry, self.keep, n)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=losses.device)
        if k == n:
            return torch.arange(n, device=losses.device)
        p = self.probability(losses)
        if known is not None:
            p = torch.where(known, p, torch.full_like(p, _UNKNOWN_FIRST))
        pi = inclusion_probabilities(p, k)
        u = self.uniforms(n + 1, losses.device)      # n for a random order, 1 for the offset
        order = torch.argsort(u[:n], stable=True)
        return systematic_sample(pi, k, u[n], order, topk)

    # ---- the step ---------------------------------------------------------------------
    def is_stale_epoch(self, epoch: int) -> bool:
        return self.stale is not None and epoch % self.stale != 0

    def choose(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
               idx: Optional[torch.Tensor]) -> torch.Tensor:
        if self.is_stale_epoch(step.epoch):
            losses, known = self.last_loss.lookup(idx)  # type: ignore[union-attr]
            step.skip_observation(idx)
            self.stale_batches += 1
            t0 = step.clock()
            pos = self.select(losses, known, step.topk)
        else:
            losses = step.selection_forward(x, y, idx, scale_factor=self.scale_factor)
            t0 = step.clock()
            pos = self.select(losses, None, step.topk)
        step.add_selection_time(t0)
        return pos

    def record_losses(self, idx: Optional[torch.Tensor], losses: torch.Tensor) -> None:
        if self.last_loss is not None and idx is not None:
            self.last_loss.record(idx, losses)

    @property
    def needs_last_loss(self) -> bool:
        return self.stale is not None

    # ---- the pending rows: constant-size backward batches ------------------------------------
    def train_chosen(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
                     idx: Optional[torch.Tensor], chosen: torch.Tensor) -> Trained:
        """Pool the chosen rows; train as many full backward batches as every rank has."""
        if chosen.numel():
            self.pool.add(x[chosen], y[chosen], None if idx is None else idx[chosen])
        return self.pool.train_batches(step)

    def flush(self, step: StepView) -> Optional[torch.Tensor]:
        return self.pool.train_rest(step)

    @property
    def pending(self) -> int:
        return self.pool.rows

    def end_epoch(self, step: StepView, accuracy: Optional[float]) -> None:
        if self.leftover == "flush":
            self.flush(step)

    def summary(self) -> Dict[str, Any]:
        return {"b": self.b, "history": self.history.size, "stale": self.stale,
                "stale_batches": self.stale_batches, "share": self.share,
                "scale_factor": self.scale_factor}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "b": self.b, "history": self.history.size,
                "stale": self.stale, "leftover": self.leftover, "share": self.share,
                "scale_factor": self.scale_factor}

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history.state_dict(), "draws": self.draws,
                "stale_batches": self.stale_batches, "carry": self.carry}

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, ("history", "draws", "stale_batches", "carry"), "policy")
        self.history.check_state_dict(sd["history"])
        check_int("policy.draws", sd["draws"], lo=0)
        check_int("policy.stale_batches", sd["stale_batches"], lo=0)
        # [-0.5, 0.5) by construction; a rounding ulp either side is let through.
        check_real("policy.carry", sd["carry"], lo=-1.0, hi=1.0)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self.history.load_state_dict(sd["history"])
        self.draws = int(sd["draws"])
        self.stale_batches = int(sd["stale_batches"])
        self.carry = float(sd["carry"])

    def step_fields(self) -> Dict[str, Any]:
        last = self.last_loss.state() if self.last_loss is not None else \
            dict.fromkeys(("last_loss", "known"))
        return {**last, "pending": self.pool.state()}

    def check_step_fields(self, sd: Mapping[str, Any]) -> None:
        check_last_losses(sd, None if self.last_loss is None else self.last_loss.n)
        check_pending(sd.get("pending"), self.num_samples)

    def load_step_fields(self, sd: Mapping[str, Any], device: Optional[torch.device]) -> None:
        self.check_step_fields(sd)
        self.pool.load_state(sd.get("pending"), self.num_samples, device)
        if self.last_loss is not None:
            self.last_loss.load_state(sd, device)
