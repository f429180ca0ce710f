"""RS2 without replacement: Okanovic et al., "Repeated Random Sampling for Minimizing the
Time-to-Accuracy of Learning" (arXiv 2305.18424), with an exact number of samples per epoch."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import rng
from ..validation.fields import check_fields, check_int, check_rows, check_values, refuse
from .base import Policy, Selection, SelectionContext

#: The fields of ``RS2.state_dict()``.
FIELDS = ("round", "key", "offset", "deferred", "n")


class RS2(Policy):
    """RS2 without replacement (Okanovic et al., arXiv 2305.18424): each epoch trains the
    next k samples of a random permutation of all N samples, and a new permutation is drawn
    when one runs out. Every pass through a permutation (a *round*) trains every sample
    exactly once, so no sample is trained j + 1 times before every sample was trained j
    times — the coverage ``uniform`` lacks (it draws each epoch afresh, and at B = 0.3 about
    a third of the samples are still unseen after three epochs).

    The rule. A round has an order Q (a permutation of 0..N-1) and an ``offset``, the
    samples of Q already taken. An epoch of k ≤ N samples takes:

    * if k ≤ N − offset: Q[offset : offset + k], and offset += k;
    * otherwise (the wrap): the rest R = Q[offset:] (r = N − offset < k samples, possibly
      none), then a new round starts whose order Q' is the new permutation with the samples
      of R moved behind all the others (both parts keep the permutation's order); the epoch
      is R + Q'[:k − r], and offset = k − r.

    So the new permutation's head is taken skipping the samples of the old rest, which keeps
    the epoch's k samples distinct; a skipped sample is not dropped but trained at the end
    of the new round (as is every sample of R), so every round is still a full pass and a
    sample of R, just trained, is not trained again in the next ⌊N/k⌋ − 1 epochs (k fixed).

    A permutation sorts the samples by ``fastsel.rng.hash_indices`` of (the key of the epoch
    that starts the round, ``STREAM_SELECT``, index): a bijection on indices, so no ties and
    one order on every device and backend; the epoch key comes from the sampler's seed, so
    every DDP rank draws the same stream. The selection is plain indices on the state's
    device (no host sync); the selection pass then shuffles the epoch's order as for every
    policy. The stream advances once per selection pass: an epoch drawn again (``set_epoch``
    back) continues the stream rather than repeating an earlier epoch.

    State (``state_dict``): ``round`` (rounds started, 0 before the first epoch), ``key``
    (the current round's key), ``offset``, ``deferred`` (the R of the round's start, which
    sits at the end of Q: with ``key`` it rebuilds Q after a resume) and ``n``.
    ``keep``: share of samples per epoch under a time budget (a fraction budget fixes it).
    """

    name = "rs2"
    uses_mean_loss = False

    def __init__(self, keep: float = 1.0) -> None:
        super().__init__(keep)
        self._round = 0
        self._key: Optional[int] = None
        self._offset = 0
        self._deferred = torch.empty(0, dtype=torch.int64)
        self._n: Optional[int] = None
        self._order: Optional[torch.Tensor] = None   # Q of the current round (a cache)

    @staticmethod
    def round_order(n: int, key: int, deferred: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Q: the seeded permutation of 0..n-1 for ``key``, the samples of ``deferred`` last."""
        h = rng.hash_indices(torch.arange(n, device=device), key, rng.STREAM_SELECT)
        if deferred.numel():   # 32-bit hashes: + 2**32 sorts the deferred samples last
            d = deferred.to(device)
            h.index_put_((d,), h[d] + (1 << 32))
        return torch.argsort(h)   # distinct keys: the same order on every device

    def _current(self, n: int, device: torch.device) -> Optional[torch.Tensor]:
        """The current round's order on ``device`` (None before the first epoch)."""
        if self._key is None:
            return None
        if self._order is None or self._order.device != device:
            self._order = self.round_order(n, self._key, self._deferred, device)
        return self._order

    def select(self, ctx: SelectionContext) -> Selection:
        n, k, device = ctx.n, ctx.k, ctx.state.device
        if self._n is not None and self._n != n:
            raise ValueError(f"policy 'rs2' drew its rounds over N={self._n} samples, this sampler "
                             f"has N={n}: give each sampler its own policy instance")
        order = self._current(n, device)
        rest = 0 if order is None else n - self._offset
        if order is not None and k <= rest:
            chosen = order[self._offset:self._offset + k].clone()
            self._offset += k
            return Selection(chosen)
        tail = (order[self._offset:] if order is not None
                else torch.empty(0, dtype=torch.int64, device=device)).clone()
        new = self.round_order(n, ctx.key, tail, device)
        self._round, self._key, self._offset, self._n = self._round + 1, int(ctx.key), k - rest, n
        self._deferred, self._order = tail, new
        return Selection(torch.cat([tail, new[:k - rest]]))

    def state_dict(self) -> Dict[str, Any]:
        return {"round": self._round, "key": self._key, "offset": self._offset,
                "deferred": self._deferred.to("cpu", copy=True), "n": self._n}

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, FIELDS, "policy_state")
        rnd = check_int("policy_state.round", sd["round"], lo=0)
        started = rnd > 0
        for name in ("key", "n"):
            if (sd[name] is None) == started:
                raise refuse(f"policy_state.{name}", f"must be {'an int' if started else 'None'} "
                             f"with round={rnd}, got {sd[name]!r}")
        if not started:
            check_int("policy_state.offset", sd["offset"], lo=0, hi=0)
            n = 0
        else:
            check_int("policy_state.key", sd["key"], lo=0, hi=rng.MASK32)
            n = check_int("policy_state.n", sd["n"], lo=1)
            check_int("policy_state.offset", sd["offset"], lo=1, hi=n)
        d = check_rows("policy_state.deferred", sd["deferred"], (torch.int64,), vector=True)
        if d.numel() > max(0, n - 1):
            limit = f"fewer than n={n} samples" if started else "no samples with round=0"
            raise refuse("policy_state.deferred", f"must hold {limit}, got {d.numel()}")
        if d.numel():
            check_values("policy_state.deferred", d, lo=0, hi=n - 1)
            s = torch.sort(d).values
            dup = s[1:] == s[:-1]
            if bool(dup.any()):
                raise refuse("policy_state.deferred", f"holds sample {int(s[1:][dup][0])} twice")

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        self._round, self._offset = int(sd["round"]), int(sd["offset"])
        self._key = None if sd["key"] is None else int(sd["key"])
        self._n = None if sd["n"] is None else int(sd["n"])
        self._deferred = sd["deferred"].to("cpu", torch.int64, copy=True)
        self._order = None
