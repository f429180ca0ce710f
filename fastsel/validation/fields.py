"""The fields of a loaded ``state_dict``: each check names the field and ends with ``FIX``,
and none writes anything (every loader checks every field before it copies one)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

from ..layout import (ERR_INDEX_COUNT, ERR_LABEL_COUNT, ERR_SIZE, STAT_EPOCH_COUNT,
                      STAT_NONFINITE, STAT_SIZE)
from .values import is_int, is_real, range_text

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


def check_dict(sd: Any, allowed: Sequence[str], where: str) -> Mapping:
    """``sd`` is a dict whose fields are all among ``allowed``; any may be absent (an
    older version wrote fewer)."""
    if not isinstance(sd, Mapping):
        raise refuse(where, f"must be a dict, got {type(sd).__name__}")
    check_keys(sd, allowed, where)
    return sd


def check_fields(sd: Any, keys: Sequence[str], where: str) -> None:
    """``sd`` is a dict with exactly the fields ``keys`` (each present, none other)."""
    check_dict(sd, keys, where)
    for key in keys:
        require(sd, key, where)


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An int (not a bool) in [lo, hi]; returned as a Python int."""
    if not is_int(v):
        raise refuse(name, f"must be an int, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise refuse(name, f"must be {range_text(lo, hi)}, got {int(v)}")
    return int(v)


def check_real(name: str, v: Any, lo: Optional[float] = None, hi: Optional[float] = None,
               hi_open: bool = False, lo_open: bool = False, allow_nan: bool = False) -> float:
    """A real number (not a bool), finite, in [lo, hi] (ends open as asked)."""
    if not is_real(v):
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


def check_rows(name: str, t: Any, dtypes: Sequence[torch.dtype] = (),
               vector: bool = False) -> torch.Tensor:
    """A dense tensor of rows (at least one dimension; exactly one if ``vector``), of one
    of ``dtypes`` if any are given."""
    ok = isinstance(t, torch.Tensor) and t.layout == torch.strided \
        and (t.dim() == 1 if vector else t.dim() >= 1) and (not dtypes or t.dtype in dtypes)
    if not ok:
        kind = "/".join(str(d).replace("torch.", "") for d in dtypes) + " " if dtypes else ""
        what = f"a 1-D {kind}tensor" if vector else f"a {kind}tensor of rows"
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise refuse(name, f"must be {what}, got {got}")
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
