"""Selective Backprop's pending rows: the kept rows waiting for a full backward batch, and
their checkpoint field ``pending`` (stored at the top of SelectiveStep's state_dict)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..distributed import agree_min
from ..validation.fields import FIX, check_dict, check_rows, check_values, refuse, require
from .step_api import StepView, Trained

#: (inputs, labels, sample indices or None)
Rows = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
_KEYS = ("x", "y", "idx")
_INT = (torch.int64, torch.int32)


def _cut(rows: Rows, lo: int, hi: Optional[int]) -> Rows:
    x, y, ids = rows
    return x[lo:hi], y[lo:hi], None if ids is None else ids[lo:hi]


class PendingRows:
    """Kept rows, first in first out, until a backward batch takes them."""

    def __init__(self) -> None:
        self.parts: List[Rows] = []
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        """Append rows at the end of the queue."""
        self.parts.append((x, y, idx))
        self.rows += int(x.shape[0])

    def pooled(self) -> Rows:
        """The pending rows as one (inputs, labels, indices), kept as the only entry."""
        xs = torch.cat([p[0] for p in self.parts])
        ys = torch.cat([p[1] for p in self.parts])
        has_idx = all(p[2] is not None for p in self.parts)
        ids = torch.cat([p[2] for p in self.parts]) if has_idx else None  # type: ignore[misc]
        self.parts = [(xs, ys, ids)]
        return xs, ys, ids

    def take(self, n: int) -> Rows:
        """The first ``n`` rows, taken off the queue."""
        rows = self.pooled()
        rest = int(rows[0].shape[0]) - n
        self.parts = [_cut(rows, n, None)] if rest > 0 else []
        self.rows = rest
        return _cut(rows, 0, n)

    def train_batches(self, step: StepView) -> Trained:
        """Train as many full backward batches (of ``step.batch_size`` rows) as every rank
        has: under DDP the ranks agree on the count (one all-reduce)."""
        out: Trained = []
        for _ in range(agree_min(self.rows // step.batch_size)):  # type: ignore[operator]
            xb, yb, ib = self.take(step.batch_size)  # type: ignore[arg-type]
            out.append((step.train_rows(xb, yb, ib)[0], ib))
        return out

    def train_rest(self, step: StepView) -> Optional[torch.Tensor]:
        """Train the rows that every rank has (all of them without DDP) as one batch; its
        loss, or None if there were none."""
        rows = agree_min(self.rows)
        if not rows:
            return None
        xb, yb, ib = self.take(rows)
        return step.train_rows(xb, yb, ib)[0]

    # ---- the checkpoint field ``pending`` ---------------------------------------------------
    def state(self) -> Optional[Dict[str, Any]]:
        """The rows as CPU copies {x, y, idx}, or None when none is pending."""
        if not self.rows:
            return None
        xs, ys, ids = self.pooled()
        return {"x": xs.detach().cpu().clone(), "y": ys.detach().cpu().clone(),
                "idx": None if ids is None else ids.detach().cpu().clone()}

    def load_state(self, pend: Any, num_samples: Optional[int],
                   device: Optional[torch.device]) -> None:
        """Check ``pend`` first (``check_pending``), then hold copies of its rows on
        ``device`` (the saved one if None): never the caller's tensors."""
        rows = check_pending(pend, num_samples)
        if rows is None:
            self.parts, self.rows = [], 0
            return
        dev = device or rows[0].device
        self.parts = [tuple(None if t is None else t.detach().to(dev, copy=True)  # type: ignore[misc]
                            for t in rows)]
        self.rows = int(rows[0].shape[0])


def check_pending(pend: Any, num_samples: Optional[int]) -> Optional[Rows]:
    """The saved rows of checkpoint field ``pending`` (None: nothing pending), or a
    ValueError naming the field that does not fit; changes nothing."""
    if pend is None:
        return None
    check_dict(pend, _KEYS, "pending")
    for key in _KEYS:
        require(pend, key, "pending")
    x, y, ids = pend["x"], pend["y"], pend["idx"]
    check_rows("pending.x", x)
    check_rows("pending.y", y, _INT, vector=True)
    if ids is not None:
        check_rows("pending.idx", ids, _INT, vector=True)
    rows = int(x.shape[0])
    if int(y.shape[0]) != rows or (ids is not None and int(ids.shape[0]) != rows):
        raise ValueError(f"pending rows disagree: {rows} inputs, {int(y.shape[0])} labels, "
                         f"{None if ids is None else int(ids.shape[0])} indices; {FIX}")
    if rows == 0:
        raise refuse("pending", "holds no rows: it must be None when nothing is pending")
    if ids is not None and num_samples is not None:
        check_values("pending.idx", ids, lo=0, hi=num_samples - 1)
    return x, y, ids
