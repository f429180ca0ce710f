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

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from .layout import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,  # noqa: F401
                     ERR_SIZE, FIELDS, STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE, STAT_SIZE)

_FIELDS = tuple(name for name, _ in FIELDS)
_DTYPES = {name: getattr(torch, dtype) for name, dtype in FIELDS}
_INITIAL = {"last_epoch": -1, "weight": 1}

# ---- checkpoint validation, shared by every state_dict loader --------------------------
#: What to do about a state_dict that fails a check; every message ends with it.
FIX = ("nothing was loaded: pass the unmodified state_dict() of a matching object "
       "(this one is corrupt, edited or from another version)")


def refuse(name: str, what: str) -> ValueError:
    """The error for state_dict field ``name``: what is wrong with it, and the fix."""
    return ValueError(f"state_dict field {name!r} {what}; {FIX}")


def require(sd: Any, key: str, where: str = "") -> Any:
    """``sd[key]``, or a clear error if ``sd`` is not a dict or has no ``key``."""
    name = f"{where}.{key}" if where else key
    if not isinstance(sd, Mapping):
        raise refuse(where or "state_dict", f"must be a dict, got {type(sd).__name__}")
    if key not in sd:
        raise refuse(name, "is missing")
    return sd[key]


def check_policy_state(sd: Any, field: str, stateless: bool) -> None:
    """The part of a policy's ``check_state_dict`` every policy shares: a dict, and ``{}``
    for a policy that keeps no state (one whose class does not override ``state_dict``)."""
    if not isinstance(sd, dict):
        raise refuse(field, f"must be a dict, got {type(sd).__name__}")
    if stateless:
        check_keys(sd, (), field)


def check_keys(sd: Mapping, allowed: Sequence[str], where: str) -> None:
    """Refuse keys a state_dict of this kind never has (a corrupt or foreign dict)."""
    extra = sorted(str(k) for k in sd if k not in allowed)
    if extra:
        raise refuse(f"{where}.{extra[0]}" if where else extra[0],
                     f"is not a field of this state_dict (fields: {', '.join(allowed) or 'none'})")


def check_fields(sd: Any, keys: Sequence[str], where: str) -> None:
    """``sd`` is a dict with exactly the fields ``keys`` (each present, none other)."""
    if not isinstance(sd, Mapping):
        raise refuse(where, f"must be a dict, got {type(sd).__name__}")
    check_keys(sd, keys, where)
    for key in keys:
        require(sd, key, where)


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An int (not a bool) in [lo, hi]; returned as a Python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise refuse(name, f"must be an int, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng_ = f"in [{lo}, {hi}]" if lo is not None and hi is not None else \
            (f">= {lo}" if lo is not None else f"<= {hi}")
        raise refuse(name, f"must be {rng_}, got {int(v)}")
    return int(v)


def check_real(name: str, v: Any, lo: Optional[float] = None, hi: Optional[float] = None,
               hi_open: bool = False, lo_open: bool = False, allow_nan: bool = False) -> float:
    """A real number (not a bool), finite, in [lo, hi] (ends open as asked)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise refuse(name, f"must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if math.isnan(f) and allow_nan:
        return f
    if not math.isfinite(f):
        raise refuse(name, f"must be finite, got {f}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise refuse(name, f"must be {'>' if lo_open else '>='} {lo}, got {f}")
    if hi is not None and (f > hi or (hi_open and f == hi)):
        raise refuse(name, f"must be {'<' if hi_open else '<='} {hi}, got {f}")
    return f


def check_tensor(name: str, t: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A dense tensor of exactly ``dtype`` and ``shape``."""
    shape = tuple(int(d) for d in shape)
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided \
            or t.dtype != dtype or tuple(t.shape) != shape:
        got = (f"{t.dtype} {tuple(t.shape)}" + ("" if t.layout == torch.strided else f" {t.layout}")
               if isinstance(t, torch.Tensor) else f"{type(t).__name__}")
        raise refuse(name, f"must be a {dtype} tensor of shape {shape}, got {got}")
    return t


def _first_bad(name: str, t: torch.Tensor, bad: torch.Tensor, adjective: str = "",
               where: str = "") -> None:
    count = int(bad.sum())
    if count:
        i = int(torch.nonzero(bad.flatten())[0])
        v = t.flatten()[i].item()
        noun = "entry" if count == 1 else "entries"
        what = " ".join(w for w in (str(count), adjective, noun, where) if w)
        raise refuse(name, f"has {what} (first: index {i} = {v})")


def check_values(name: str, t: torch.Tensor, finite: bool = False, lo: Optional[float] = None,
                 hi: Optional[float] = None) -> None:
    """Every entry finite (floating tensors, if asked) and within [lo, hi] (if given)."""
    if finite and t.is_floating_point():
        _first_bad(name, t, ~torch.isfinite(t), adjective="non-finite")
    if lo is not None:
        _first_bad(name, t, t < lo, where=f"below {lo:g}")
    if hi is not None:
        _first_bad(name, t, t > hi, where=f"above {hi:g}")


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
#: Slots of ``stats`` and ``errors`` that count something (so are >= 0).
_STAT_COUNTS = (STAT_NONFINITE, STAT_EPOCH_COUNT)
_ERR_COUNTS = (ERR_INDEX_COUNT, ERR_LABEL_COUNT)


def check_stats(name: str, t: Any) -> torch.Tensor:
    """A float64 ``stats`` vector: finite, its count slots >= 0."""
    check_tensor(name, t, torch.float64, (STAT_SIZE,))
    check_values(name, t, finite=True)
    check_values(name, t[list(_STAT_COUNTS)], lo=0)
    return t


def check_errors(name: str, t: Any) -> torch.Tensor:
    """An int64 ``errors`` vector: its count slots >= 0 (value slots hold any example)."""
    check_tensor(name, t, torch.int64, (ERR_SIZE,))
    check_values(name, t[list(_ERR_COUNTS)], lo=0)
    return t


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
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise refuse("n", f"must be an int, got {type(n).__name__} {n!r}")
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
