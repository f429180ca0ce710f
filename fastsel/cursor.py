"""Where a sampler stands: the epoch, its drawn selection and this rank's shard of it, and
how many of the shard's rows were trained. The host counts eager calls itself; once a loss
op was traced (a compiled call may have run) it settles its count from the device's
(fastsel.rows) where it already waits. Owns the checkpoint fields ``epoch``, ``position``,
``exhausted``, ``selection`` and ``selection_epoch``."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from .budget import Budget
from .rows import EpochRows
from .sharding import Shard
from .validation.fields import check_int, refuse
from .validation.values import is_int

_CHUNK = 4096   # indices converted to Python ints at a time while iterating


class EpochCursor:
    """The epoch in progress and this rank's trained position in it."""

    def __init__(self, n: int, shard: Shard, budget: Budget, device: torch.device) -> None:
        self.n, self.shard, self.budget = n, shard, budget
        self.rows = EpochRows(n, device)
        self.epoch = 0
        self.position = 0            # rows of this epoch's shard the host counted
        self.calls = 0               # update calls of this epoch the host counted
        self.exhausted = False       # the epoch's iterator ran out (or its time did)
        self.selection: Optional[torch.Tensor] = None   # global, shuffled, this epoch
        self.selection_epoch: Optional[int] = None
        self.shard_len = -1          # this rank's rows of it (-1: none drawn)
        self._shard_cpu: Optional[torch.Tensor] = None
        self._warned: set = set()    # the counting warnings already given (each warns once)

    # ---- the epoch ----------------------------------------------------------------------
    def drawn(self) -> bool:
        return self.selection_epoch == self.epoch

    def trained(self) -> bool:
        self.settle()
        return self.drawn() and self.position >= self.shard_len

    def done(self) -> bool:
        return self.drawn() and (self.exhausted or self.trained())

    def move_to(self, epoch: int, time_mode: bool) -> None:
        """``set_epoch``: leave the current epoch (warning if it went untrained) for ``epoch``."""
        if epoch != self.epoch:
            self.close(time_mode, stacklevel=5)   # the warning names set_epoch's caller
            self.epoch, self.position, self.calls = epoch, 0, 0
        self.exhausted = False

    def set_selection(self, order: Optional[torch.Tensor], epoch: Optional[int]) -> None:
        """The epoch's selection (None: none), and its rows opened on the device for the ops."""
        self.selection, self.selection_epoch = order, epoch
        self._shard_cpu = None
        self.shard_len = len(self.shard_tensor()) if order is not None else -1  # one device→host copy
        self.rows.open(order, self.epoch if epoch is None else epoch, self.shard_len, self.position)
        self.calls = 0

    def shard_tensor(self) -> torch.Tensor:
        """This rank's shard of the drawn selection, on the host."""
        if self._shard_cpu is None:
            self._shard_cpu = self.shard.take(self.selection)  # type: ignore[arg-type]
        return self._shard_cpu

    def resume_at(self, position: int) -> None:
        """Continue the drawn epoch from ``position`` (a restored iterator): host and device."""
        self.position = position
        if self.drawn():
            self.rows.open(self.selection, self.epoch, self.shard_len, position)
            self.calls = 0

    # ---- what counts: rows trained ------------------------------------------------------
    def check_room(self, b: int) -> None:
        """Refuse ``b`` rows outside an epoch in progress or past its shard (fastsel.rows),
        before the call moves or writes anything."""
        self.rows.check_room(b, epoch=self.epoch, drawn=self.drawn(), position=self.position,
                             shard_len=self.shard_len)

    def consumed(self, b: int) -> None:
        """A batch of b rows went through (the host saw it): the position and the budget
        advance, as the ops advanced the device's count."""
        self.position += b
        self.calls += 1
        self.budget.consumed(b)

    def settle(self, cheap_only: bool = False) -> None:
        """Bring the host's count of the epoch's trained rows up to the device's, which also
        counts the calls the host did not run (compiled ones): a no-op until one was traced."""
        if not self.drawn():
            return
        got = self.rows.settle(cheap_only)
        if got is None:
            return
        trained, calls = got
        if trained > self.position:
            self.budget.consumed(trained - self.position, max(0, calls - self.calls))
            self.position = trained
        self.calls = max(self.calls, calls)

    # ---- warnings -------------------------------------------------------------------------
    def close(self, time_mode: bool, stacklevel: int = 4) -> None:
        """Before moving past a drawn epoch: warn (once each) when it was handed out but not
        trained (a reused sampler), or only partly trained (drop_last, a break). ``stacklevel``
        as ``warn_once``'s: 4 names the caller of the Sampler method that called this."""
        if not self.drawn() or time_mode:
            return
        self.settle()
        shard, pos = self.shard_len, self.position
        if pos >= shard or not self.budget.loss_calls:
            return
        if pos == 0 and self.exhausted:
            self.warn_once("untrained", stacklevel, f"fastsel: epoch {self.epoch} was handed out but none of its "
                           f"{shard} rows were trained, so the budget skips it: was the sampler "
                           "iterated twice in one epoch (an evaluation DataLoader given the training "
                           "sampler, or list(sampler) called again inside the loop)? Give evaluation "
                           "its own sampler (e.g. torch.utils.data.SequentialSampler)")
        elif pos > 0:
            self.warn_once("partial", stacklevel, f"fastsel: epoch {self.epoch} trained {pos} of its "
                           f"{shard} rows: DataLoader(drop_last=True) drops the last partial batch, "
                           "or the loop left the epoch early (a break); the budget will end unspent. "
                           "Pass drop_last=False to the DataLoader (the sampler already fixes each "
                           "epoch's length)")

    def warn_once(self, key: str, stacklevel: int, text: str) -> None:
        """Warn ``text`` once per ``key``; ``stacklevel`` counts from this method."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(text, stacklevel=stacklevel)

    # ---- checkpoint -----------------------------------------------------------------------
    def state_dict(self, time_mode: bool) -> Dict[str, Any]:
        """The cursor's fields; the caller settles first (the budget's counters move too)."""
        return {"epoch": self.epoch, "position": self.position,
                # An iterator that ran out with batches still in flight is not a finished epoch.
                "exhausted": self.exhausted and (time_mode or self.trained()),
                "selection": None if self.selection is None else self.selection.cpu().clone(),
                "selection_epoch": self.selection_epoch}

    def check_state_dict(self, sd: Dict[str, Any]) -> None:
        """Refuse the cursor's fields of a Sampler state_dict, naming the field; changes nothing."""
        epoch, position = check_int("epoch", sd["epoch"], lo=0), check_int("position", sd["position"], lo=0)
        if not isinstance(sd["exhausted"], bool):
            raise refuse("exhausted", f"must be a bool, got {sd['exhausted']!r}")
        sel, sel_epoch, n = sd["selection"], sd["selection_epoch"], self.n
        if sel is not None and (not isinstance(sel, torch.Tensor) or sel.dtype != torch.int64
                                or sel.dim() != 1 or sel.numel() > n
                                or (sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n))):
            raise refuse("selection", f"must be None or a 1-D int64 tensor of at most {n} indices "
                         f"in [0, {n}), got {sel!r:.80}")
        if (sel is None) != (sel_epoch is None) or (sel_epoch is not None
                                                    and (not is_int(sel_epoch) or sel_epoch < 0)):
            raise refuse("selection_epoch", "must be a non-negative int with a selection and None "
                         f"without one, got {sel_epoch!r}")
        limit = self.shard.length(sel.numel()) if sel_epoch == epoch else 0
        if position > limit:
            raise refuse("position", f"is {position}, beyond the {limit} rows of epoch {epoch}'s shard")

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Write checked fields (``check_state_dict`` first), keeping no tensor of ``sd``."""
        self.epoch, self.position, self.exhausted = sd["epoch"], sd["position"], sd["exhausted"]
        sel = sd["selection"]
        self.set_selection(None if sel is None else sel.to(self.rows.device, copy=True),
                           sd["selection_epoch"])


class EpochIterator(Iterator[int]):
    """Iterates one epoch's shard from the trained position, a chunk of Python ints at a
    time; stateful for torchdata's StatefulDataLoader, which saves and restores it instead
    of fast-forwarding. ``may_hand_out(i)``: whether the i-th row may go (a time budget)."""

    def __init__(self, cursor: EpochCursor, may_hand_out: Callable[[int], bool]) -> None:
        self.cursor, self.may_hand_out = cursor, may_hand_out
        self._reset()

    def _reset(self) -> None:
        self.shard = self.cursor.shard_tensor()
        self.i = self.cursor.position
        self._chunk: List[int] = []
        self._chunk_start = self.i

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self) -> int:
        c = self.cursor
        if self.i >= len(self.shard) or not self.may_hand_out(self.i):
            c.exhausted = True
            raise StopIteration
        j = self.i - self._chunk_start
        if j >= len(self._chunk):
            self._chunk_start, j = self.i, 0
            self._chunk = self.shard[self.i:self.i + _CHUNK].tolist()
        self.i += 1
        c.budget.yielded += 1
        return self._chunk[j]

    # torchdata's StatefulDataLoader snapshots this when it fetches the batch it hands to
    # the user, restores the sampler first and then this: the position it carries is then
    # exactly what the user received.
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.cursor.epoch, "yielded": self.i}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("epoch") != self.cursor.epoch:
            raise ValueError(f"iterator state is for epoch {sd.get('epoch')}, "
                             f"the sampler is at epoch {self.cursor.epoch}")
        y = sd.get("yielded")
        if not is_int(y) or not 0 <= y <= len(self.shard):
            raise ValueError(f"iterator state 'yielded' must be an int in [0, {len(self.shard)}], got {y!r}")
        self.cursor.resume_at(y)
        self._reset()
