"""Plain-number arguments: one check per kind, one message format
("<name> must be <requirement>, got <name>=<value>[; <fix>]"), one rounding rule."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Type


def is_int(v: object) -> bool:
    """A Python int (or numpy integer) and not a bool (which ``isinstance(v, int)`` admits)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A real number and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() goes to even): the one
    rounding rule of every count (epoch-level and batch-level policies, the budget)."""
    return int(math.floor(x + 0.5))


def message(name: str, requirement: str, got: str, fix: str = "") -> str:
    """The one wording of a refused value."""
    return f"{name} must be {requirement}, got {got}" + (f"; {fix}" if fix else "")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(lo: Optional[float], hi: Optional[float], lo_open: bool = False,
               hi_open: bool = False) -> str:
    """``[lo, hi]``-style words for a range, ends open as asked ('' when unbounded)."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return ""


def _got(name: str, v: Any, show_name: bool) -> str:
    return f"{name}={v!r}" if show_name else f"{type(v).__name__} {v!r}"


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None, *,
              allow_none: bool = False, what: str = "an int", fix: str = "",
              exc: Type[Exception] = ValueError) -> Optional[int]:
    """``v`` as an int in [lo, hi] (None passes with ``allow_none``), or ``exc`` naming it."""
    if v is None and allow_none:
        return None
    in_range = is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not in_range:
        rng = range_text(lo, hi)
        raise exc(message(name, f"{what} {rng}".strip(), f"{name}={v!r}", fix))
    return int(v)


def check_real(name: str, v: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
               lo_open: bool = False, hi_open: bool = False, allow_none: bool = False,
               what: str = "a finite number", fix: str = "",
               exc: Type[Exception] = ValueError) -> Optional[float]:
    """``v`` as a finite float in the range (ends open as asked), or ``exc`` naming it."""
    if v is None and allow_none:
        return None
    ok = is_real(v) and math.isfinite(float(v))
    if ok:
        f = float(v)
        ok = (lo is None or f > lo or (f == lo and not lo_open)) and \
             (hi is None or f < hi or (f == hi and not hi_open))
    if not ok:
        rng = range_text(lo, hi, lo_open, hi_open)
        raise exc(message(name, f"{what} {rng}".strip(), f"{name}={v!r}", fix))
    return float(v)
