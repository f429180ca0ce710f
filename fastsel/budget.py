"""The budget's accounting: samples per epoch, epochs allowed, share spent, and the clock.

A fraction budget B trains exactly round(N·B) samples per epoch for the recipe's epochs
(or what the policy makes of them: scan trains N per epoch for round(epochs·B) epochs). A
time budget trains until its seconds are spent; under it the sampler hands out rows only
while the rows already handed out can still be trained in time (``may_hand_out``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from .policies import Policy
from .validation import fields
from .validation.fields import refuse, require
from .validation.values import check_int, check_real, is_int, round_half_up

#: The clock every budget reads (a module attribute so that tests can drive it).
now = time.monotonic


def check_budget(budget: Any, time_budget: Any, epochs: Any) -> None:
    """Refuse a budget that is not exactly one of a fraction and a number of seconds."""
    if (budget is None) == (time_budget is None):
        raise ValueError("give exactly one of budget= (a fraction in (0, 1]) and time_budget= "
                         f"(seconds); got budget={budget!r}, time_budget={time_budget!r}")
    if budget is not None:
        check_real("budget", budget, lo=0.0, hi=1.0, lo_open=True, what="a fraction")
        if epochs is None:
            raise ValueError("a fraction budget needs epochs= (the epochs of full training), got epochs=None")
    check_real("time_budget", time_budget, lo=0.0, lo_open=True, allow_none=True,
               what="a number of seconds")
    check_int("epochs", epochs, lo=1, allow_none=True)


class Budget:
    """How much training the budget allows and how much of it is spent.

    Counters are this rank's: ``yielded`` indices handed out, ``trained`` rows through the
    loss call (or ``skip``), ``loss_calls`` calls made, ``epoch_counts`` the samples each
    drawn epoch selected.
    """

    def __init__(self, policy: Policy, budget: Optional[float], time_budget: Optional[float],
                 epochs: Optional[int]) -> None:
        check_budget(budget, time_budget, epochs)
        if budget is not None and policy.keep != 1.0:
            raise ValueError(f"keep={policy.keep} sets the share per epoch under a time budget; "
                             f"with budget={budget} the share is the budget")
        self.policy = policy
        self.fraction = None if budget is None else float(budget)
        self.seconds = None if time_budget is None else float(time_budget)
        self.epochs_total = epochs
        self.yielded = 0
        self.trained = 0
        self.loss_calls = 0
        self.epoch_counts: List[int] = []
        self._elapsed0 = 0.0           # seconds spent before this process (resume)
        self._clock: Optional[float] = None
        self._pace_t0: Optional[float] = None   # when this process first saw rows trained
        self._pace_rows0 = 0

    # ---- what the budget allows -------------------------------------------------------
    @property
    def time_mode(self) -> bool:
        return self.seconds is not None

    @property
    def num_epochs(self) -> Optional[int]:
        """Epochs the budget allows (None: a time budget without an epoch cap)."""
        if self.time_mode:
            return self.epochs_total
        return self.policy.num_epochs(self.epochs_total, self.fraction)  # type: ignore[arg-type]

    def past_end(self, epoch: int) -> bool:
        """Whether ``epoch`` lies beyond the epochs the budget allows."""
        cap = self.num_epochs
        return cap is not None and epoch >= cap

    def epoch_count(self, n: int) -> int:
        """Samples an epoch selects before sharding: exact under a fraction budget; under a
        time budget the policy's share, before the selection pass fits it to the time left."""
        if self.time_mode:
            return max(1, min(n, round_half_up(n * self.policy.time_share())))
        return self.policy.count(n, self.fraction)  # type: ignore[arg-type]

    # ---- the clock ----------------------------------------------------------------------
    def start_clock(self) -> None:
        if self._clock is None:
            self._clock = now()

    def elapsed(self) -> float:
        """Wall-clock seconds of the budget spent so far (across resumes)."""
        return self._elapsed0 + (0.0 if self._clock is None else now() - self._clock)

    def time_up(self, elapsed: Optional[float] = None) -> bool:
        """Whether a time budget's seconds are spent (``elapsed``: the ranks' agreed figure)."""
        if not self.time_mode:
            return False
        return (self.elapsed() if elapsed is None else elapsed) >= self.seconds  # type: ignore[operator]

    def seconds_per_row(self) -> Optional[float]:
        """Wall time per trained row in this process, measured from when rows were first
        seen trained (None until more have been). Read on the host, never in a loss call,
        which may be compiled."""
        if self._pace_t0 is None:
            if self.trained > 0:
                self._pace_t0, self._pace_rows0 = now(), self.trained
            return None
        rows = self.trained - self._pace_rows0
        return (now() - self._pace_t0) / rows if rows > 0 else None

    def may_hand_out(self, outstanding: int) -> bool:
        """Under a time budget: whether one more row can be handed out, given ``outstanding``
        rows handed out and not yet trained (DataLoader workers prefetch them), so that the
        loop ends within about one step of the deadline."""
        if not self.time_mode:
            return True
        rate = self.seconds_per_row()
        ahead = 0.0 if rate is None else outstanding * rate
        return self.elapsed() + ahead < self.seconds  # type: ignore[operator]

    # ---- spending ------------------------------------------------------------------------
    def consumed(self, rows: int, calls: int = 1) -> None:
        """``calls`` loss calls of ``rows`` rows in all went through."""
        self.trained += rows
        self.loss_calls += calls

    def progress(self, shard_len: int) -> float:
        """Share spent, in [0, 1]: by elapsed time, or by trained rows (handed-out ones in a
        loop that never calls the loss) against ``shard_len`` times the epochs allowed."""
        if self.time_mode:
            return min(1.0, self.elapsed() / self.seconds)  # type: ignore[operator]
        total = self.num_epochs * shard_len  # type: ignore[operator]
        done = self.trained if self.loss_calls else self.yielded
        return min(1.0, done / max(1, total))

    # ---- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"yielded": self.yielded, "trained": self.trained, "loss_calls": self.loss_calls, "elapsed": self.elapsed(),
                "epoch_counts": list(self.epoch_counts)}

    @staticmethod
    def check_state_dict(sd: Any) -> None:
        """Refuse counters that are missing, negative or not numbers (naming the field)."""
        for key in ("yielded", "trained", "loss_calls"):
            fields.check_int(f"counters.{key}", require(sd, key, "counters"), lo=0)
        fields.check_real("counters.elapsed", require(sd, "elapsed", "counters"), lo=0.0)
        counts = require(sd, "epoch_counts", "counters")
        if not isinstance(counts, list) or not all(is_int(c) and c >= 0 for c in counts):
            raise refuse("counters.epoch_counts", f"must be a list of non-negative ints, got {counts!r}")

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.yielded, self.trained = int(sd["yielded"]), int(sd["trained"])
        self.loss_calls = int(sd["loss_calls"])
        self._elapsed0, self._clock = float(sd["elapsed"]), None
        self._pace_t0, self._pace_rows0 = None, 0
        self.epoch_counts = [int(c) for c in sd["epoch_counts"]]
