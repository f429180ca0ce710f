"""Which rows of a loss call count towards the epoch: rows of the epoch being iterated, no
more than this rank's shard holds, whose sample the epoch selected (in any order, so a
grouped batch sampler works). ``update=False`` calls are not checked: they change nothing.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

#: The index a stray row is given when it is masked on the device: out of every range, so
#: the ops leave it out of the state and count it; the selection pass takes the count back.
STRAY_INDEX = -(2 ** 31)

_FIX = "pass update=False for a forward whose rows must not count (a sanity check, an evaluation)"


class EpochRows:
    """The epoch's selection as a membership mask on the device, and the count of stray
    rows found without a host sync (non-strict mode), raised at the next selection pass."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._member: Optional[torch.Tensor] = None
        # [stray rows, the first one's sample, those of them the ops masked and counted]
        self._stray: Optional[torch.Tensor] = None

    def reset(self, selection: Optional[torch.Tensor]) -> None:
        """A new epoch's selection (None: none drawn), or the same on another device; the
        buffers the loss calls read are made here, never inside a (compiled) loss call."""
        if selection is None:
            self._member = None
            return
        m = torch.zeros(self.n + 1, dtype=torch.bool, device=selection.device)
        m[selection] = True
        m[self.n] = True   # out-of-range rows are the op's to report
        self._member = m
        if self._stray is None:
            self._stray = torch.zeros(3, dtype=torch.int64, device=selection.device)
        elif self._stray.device != selection.device:
            self._stray = self._stray.to(selection.device)

    @staticmethod
    def check_room(b: int, *, epoch: int, drawn: bool, position: int, shard_len: int) -> None:
        """Refuse ``b`` rows when no epoch is in progress or its shard has no room for them:
        host figures only, so it runs before anything (the state's device included) changes."""
        if not drawn:
            raise ValueError(f"indices: no epoch is in progress (epoch {epoch} has not been "
                             f"iterated), so these {b} rows cannot count towards it: iterate the "
                             f"sampler or its DataLoader first, or {_FIX}")
        if position + b > shard_len:
            raise ValueError(f"indices: {b} more rows would take epoch {epoch} to {position + b} "
                             f"of this rank's {shard_len}: its rows have all been trained; {_FIX}, "
                             "or iterate the sampler again to start the next epoch")

    def admit(self, indices: torch.Tensor, *, epoch: int, strict: bool, to_op: bool = True) -> torch.Tensor:
        """After ``check_room``: refuse rows whose sample the epoch did not select (nothing
        changes), or, when not strict, return the indices with those rows masked to
        ``STRAY_INDEX`` (``to_op``: the masked indices go to an op, which counts them as out
        of range)."""
        if indices.shape[0] == 0:
            return indices
        in_range = (indices >= 0) & (indices < self.n)
        stray = ~self._member[torch.where(in_range, indices, self.n).long()]  # type: ignore[index]
        # Compiled code cannot branch on a value: there the check is the deferred one.
        if strict and not torch.compiler.is_compiling():
            if bool(stray.any()):
                first = int(indices[stray][0])
                raise ValueError(f"indices: {int(stray.sum())} row(s) are samples epoch {epoch} did "
                                 f"not select, e.g. {first} (an evaluation pass? labels passed as "
                                 f"indices?); {_FIX}")
            return indices
        self._record(indices, stray, to_op)
        return torch.where(stray, torch.full_like(indices, STRAY_INDEX), indices)

    def _record(self, indices: torch.Tensor, stray: torch.Tensor, to_op: bool) -> None:
        s = self._stray
        assert s is not None
        pos = torch.argmax(stray.to(torch.int8)).reshape(1)
        first = indices.to(torch.int64).index_select(0, pos).reshape(())
        count = stray.sum()
        s[1] = torch.where(s[0] == 0, first, s[1])
        s[0] += count
        if to_op:
            s[2] += count

    def take_stray(self) -> Tuple[int, int, int]:
        """(stray rows since the last call, the first one's sample, those the ops counted as
        out of range), cleared: a host sync."""
        if self._stray is None:
            return 0, 0, 0
        count, first, by_op = self._stray.tolist()
        self._stray.zero_()
        return int(count), int(first), int(by_op)


def raise_for_stray(count: int, first: int, epoch: int) -> None:
    """The deferred form of ``admit``'s refusal, at the selection pass."""
    if count:
        raise ValueError(f"indices: {count} row(s) given to the loss call in epoch {epoch} were "
                         f"samples it did not select, e.g. {first} (an evaluation pass? labels passed "
                         f"as indices?); they were left out of the per-sample state; {_FIX}")
