"""SelectiveStep's on/off schedule (Composer's, for Selective Backprop): the policy selects
while start <= progress < end, and every ``interrupt``-th step trains on all rows."""
from __future__ import annotations

from typing import Any, Callable, Optional

from .distributed import agree_min
from .validation.values import check_int, check_real, is_int, message


class OnOffSchedule:
    """When a step lets its policy select. ``progress`` is the sampler's when there is one
    (``has_sampler``), else the steps so far / ``total_steps``; arguments are checked here,
    each error naming the bad one."""

    def __init__(self, start: Any, end: Any, interrupt: Any, total_steps: Any,
                 has_sampler: bool) -> None:
        share = "a share of training"
        self.start = float(check_real("start", start, 0, 1, what=share))  # type: ignore[arg-type]
        self.end = float(check_real("end", end, 0, 1, what=share))  # type: ignore[arg-type]
        if not self.start < self.end:
            raise ValueError(message("start", "below end (the policy selects while start <= "
                                     "progress < end)", f"start={start!r}, end={end!r}"))
        if not (is_int(interrupt) and interrupt == 0):
            check_int("interrupt", interrupt, lo=2, what="0 (never) or an int n",
                      fix="every n-th step trains on all rows")
        self.interrupt = int(interrupt)
        self.total_steps: Optional[int] = check_int("total_steps", total_steps, lo=1,
                                                    allow_none=True)
        if total_steps is not None and has_sampler:
            raise ValueError(f"total_steps={total_steps} given with a sampler: the schedule's "
                             f"progress is the sampler's progress(); drop total_steps")
        if (self.start > 0.0 or self.end < 1.0) and not has_sampler and total_steps is None:
            raise ValueError(f"start={start!r}, end={end!r} need the training's progress: pass "
                             f"total_steps= (the run's number of step calls) or a sampler")

    def progress(self, steps: int) -> float:
        """Steps done / ``total_steps`` (0.0 when it is not known), at most 1."""
        if self.total_steps is None:
            return 0.0
        return min(1.0, steps / self.total_steps)

    def on(self, steps: int, progress: Callable[[], float]) -> bool:
        """Whether step ``steps + 1`` selects: off before ``start``, from ``end`` on (end =
        1.0 never turns it off) and on every ``interrupt``-th step. Under DDP the ranks
        agree on it (one all-reduce of a flag, only when ``start``/``end`` are set)."""
        if self.interrupt and (steps + 1) % self.interrupt == 0:
            return False
        if self.start == 0.0 and self.end == 1.0:
            return True
        p = progress()
        on = self.start <= p and (p < self.end or self.end == 1.0)
        return bool(agree_min(int(on)))
