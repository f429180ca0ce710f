"""Per-sample training state, kept on the device the model trains on.

Each buffer holds N entries plus one scratch slot at index N: a masked-out row in a
vectorised or fused update writes there instead of branching, so no backend needs a
host-side filter (and so no host synchronisation) to drop a row.

Numerics — finite in, finite state: no finite input puts inf or NaN into any field.

* An observation is a sample's (loss, p_true) in float32; duplicates of a sample in one
  batch are one observation, their float64 mean. A finite value beyond float32's range
  saturates at +-``STATE_MAX`` (float32's largest finite value, ``fastsel.layout``) instead
  of becoming inf: a float64 loss or p_true given to ``observe``, and the default p_true
  exp(-loss) of a loss below about -88.7.
* An observation whose loss or p_true is NaN or +-inf is not folded; it is counted in
  ``stats[STAT_NONFINITE]``. That is a NaN/inf loss or p_true, logits holding a NaN or +inf
  (or only -inf), a target class at a -inf logit, or a cross-entropy that overflows float32
  itself (logits some 3.4e38 apart), whose ``F.cross_entropy`` is inf as well.
* A finite observation (l, p) is folded in float64 from the float32 state, with
  a = float32(ema) and b = float32(1 - ema): the first sets ``loss`` = l, ``loss_var`` = 0;
  later ones d = l - loss, loss += a * d, loss_var = b * (loss_var + a * d * d); ``p_true``
  += (p - p_true) * k / seen (k: the occurrences, seen: counting them). Each result is
  stored in float32 clamped to [-STATE_MAX, STATE_MAX]: observations 0 and 1e30, whose
  squared difference float32 cannot hold, give ``loss_var`` = STATE_MAX, not inf. Every
  backend computes these same float64 operations in this order (no fused multiply-add),
  so the same observations leave the same bits on every backend.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from .layout import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,  # noqa: F401
                     ERR_SIZE, FIELDS, STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE, STAT_SIZE)
from .validation.fields import (check_errors, check_int, check_stats, check_tensor, check_values,
                                refuse, require)

_FIELDS = tuple(name for name, _ in FIELDS)
_DTYPES = {name: getattr(torch, dtype) for name, dtype in FIELDS}
_INITIAL = {"last_epoch": -1, "weight": 1}

#: Per-field value rules of the per-sample buffers: (finite, lo, hi).
_RULES = {
    "loss": (True, None, None),        # custom losses (observe) may be negative
    "loss_var": (True, 0.0, None),
    # Not [0, 1]: observe() takes any finite p_true, and its default exp(-loss) exceeds 1
    # for a negative loss, so a checkpoint of such a run holds them (the policies clamp).
    "p_true": (True, None, None),
    "seen": (False, 0, None),
    "last_epoch": (False, -1, None),
    "weight": (True, 0.0, None),
    "selected": (False, 0, None),
}


class SampleState:
    """Running per-sample statistics that every policy's key is computed from.

    ``loss``: EMA of the per-sample loss. ``loss_var``: exponentially weighted variance
    of the loss (TFTB's weighting). ``p_true``: mean predicted probability of the true
    class over every observation (p-SGD/c-SGD). ``seen``: observations so far.
    ``last_epoch``: epoch of the last observation (-1: never). ``weight``: the policy's
    loss weight for the current epoch (InfoBatch's rescale). ``selected``: how many
    epochs chose the sample (Arazo's data-variability entropy).
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got n={n}")
        self.n = int(n)
        d = torch.device(device)
        size = self.n + 1
        for f in _FIELDS:
            setattr(self, "_" + f, torch.full((size,), _INITIAL.get(f, 0), dtype=_DTYPES[f], device=d))
        self.stats = torch.zeros(STAT_SIZE, dtype=torch.float64, device=d)
        self.errors = torch.zeros(ERR_SIZE, dtype=torch.int64, device=d)

    # Public views exclude the scratch slot.
    @property
    def device(self) -> torch.device:
        return self._loss.device

    @property
    def loss(self) -> torch.Tensor:
        return self._loss[: self.n]

    @property
    def loss_var(self) -> torch.Tensor:
        return self._loss_var[: self.n]

    @property
    def p_true(self) -> torch.Tensor:
        return self._p_true[: self.n]

    @property
    def seen(self) -> torch.Tensor:
        return self._seen[: self.n]

    @property
    def last_epoch(self) -> torch.Tensor:
        return self._last_epoch[: self.n]

    @property
    def weight(self) -> torch.Tensor:
        return self._weight[: self.n]

    @property
    def selected(self) -> torch.Tensor:
        return self._selected[: self.n]

    def buffers(self) -> Dict[str, torch.Tensor]:
        """The full buffers (with the scratch slot), by field name, for backends."""
        return {f: getattr(self, "_" + f) for f in _FIELDS}

    def to(self, device: torch.device | str) -> "SampleState":
        """Move every buffer to ``device`` in place (a one-time move to the training device)."""
        d = torch.device(device)
        for f in _FIELDS:
            setattr(self, "_" + f, getattr(self, "_" + f).to(d))
        self.stats = self.stats.to(d)
        self.errors = self.errors.to(d)
        return self

    def take_errors(self) -> torch.Tensor:
        """Return the error counters (on the host) and clear them."""
        errs = self.errors.cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
        self.errors.zero_()
        return errs

    def state_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"n": self.n}
        for f in _FIELDS:
            out[f] = getattr(self, f).detach().cpu().clone()
        out["stats"] = self.stats.detach().cpu().clone()
        out["errors"] = self.errors.detach().cpu().clone()
        return out

    def check_state_dict(self, sd: Dict[str, object]) -> None:
        """Raise a ValueError naming the field if ``sd`` cannot be loaded into this state:
        a field missing, of the wrong dtype or shape, or with values no training produces
        (NaN/inf, negative counts or variances or weights, last_epoch < -1). Nothing changes."""
        if not isinstance(sd, Mapping):
            raise refuse("state", f"must be a dict, got {type(sd).__name__}")
        n = require(sd, "n")
        check_int("n", n)
        if int(n) != self.n:
            raise ValueError(f"state_dict is for n={int(n)} samples, this sampler has n={self.n}")
        for f in _FIELDS:
            t = check_tensor(f, require(sd, f), _DTYPES[f], (self.n,))
            finite, lo, hi = _RULES[f]
            check_values(f, t, finite=finite, lo=lo, hi=hi)
        check_stats("stats", require(sd, "stats"))
        check_errors("errors", require(sd, "errors"))

    def load_state_dict(self, sd: Dict[str, object]) -> None:
        """Check every field first (``check_state_dict``), then copy the values into this
        state's own buffers: the state never shares a tensor with ``sd``."""
        self.check_state_dict(sd)
        with torch.no_grad():
            for f in _FIELDS:
                getattr(self, f).copy_(sd[f])  # type: ignore[arg-type]
            self.stats.copy_(sd["stats"])  # type: ignore[arg-type]
            self.errors.copy_(sd["errors"])  # type: ignore[arg-type]
