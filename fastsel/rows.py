"""Which rows of a loss call count towards the epoch: rows of the epoch being iterated, no
more than this rank's shard holds, whose sample the epoch selected (in any order, so a
grouped batch sampler works). ``update=False`` calls are not checked: they change nothing.

The facts live on the state's device, where the loss ops read and write them (fastsel.ops
says how): the epoch's selection as a membership mask, the epoch as a 0-d tensor, and the
``layout.ROW_*`` counters. So a loss call reads no host int and a compiled one compiles
once. The host keeps its own count of the rows it saw (eager calls) and reads the device's
only where it already waits (``settle``), once a compiled call may have run.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import layout, ops

FIX = "pass update=False for a forward whose rows must not count (a sanity check, an evaluation)"


def room_message(b: int, epoch: int, position: int, shard_len: int) -> str:
    """Why ``b`` rows cannot count: no epoch in progress (``shard_len < 0``), or no room."""
    if shard_len < 0:
        return (f"indices: no epoch is in progress (epoch {epoch} has not been iterated), so these "
                f"{b} rows cannot count towards it: iterate the sampler or its DataLoader first (is "
                "this Sampler the DataLoader's sampler? a torch DistributedSampler in its place draws "
                f"no fastsel epoch: fastsel shards itself), or {FIX}")
    return (f"indices: {b} more rows would take epoch {epoch} to {position + b} of this rank's "
            f"{shard_len}: its rows have all been trained; {FIX}, or iterate the sampler again to "
            "start the next epoch")


def stray_message(count: int, epoch: int, first: int) -> str:
    """Why rows whose sample the epoch did not select cannot count (strict, at once)."""
    return (f"indices: {count} row(s) are samples epoch {epoch} did not select, e.g. {first} (an "
            f"evaluation pass? labels passed as indices?); {FIX}")


def first_flagged(values: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The value at the first flagged entry, as a 0-d int64 tensor (no host sync: indexing
    with a 0-d tensor would call ``.item()``)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=values.device)
    pos = torch.argmax(bad.to(torch.int8)).reshape(1)
    return values.to(torch.int64).index_select(0, pos).reshape(())


def admit_rows(indices: torch.Tensor, bad_index: torch.Tensor, n: int, member: Optional[torch.Tensor],
               rows: Optional[torch.Tensor], epoch: torch.Tensor, strict: bool, update: bool
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ops' room and membership checks (``fastsel.ops``) in PyTorch, for the reference
    op, Triton's strict path and ``EpochRows.skip``: strict raises (nothing written); returns (rows left out, bad indices still to report, whether the call is
    refused for room), each a tensor. ``commit_rows`` writes the counts once the range
    checks pass."""
    b = indices.shape[0]
    none = torch.zeros_like(bad_index)
    if not update or rows is None:
        return none, bad_index, torch.zeros((), dtype=torch.bool, device=indices.device)
    trained, shard = rows[layout.ROW_TRAINED], rows[layout.ROW_SHARD]
    over = (shard < 0) | (trained + b > shard)
    if strict and bool(over):
        raise ValueError(room_message(b, int(epoch), int(trained), int(shard)))
    in_range = ~bad_index
    stray = in_range & (member[torch.where(in_range, indices, n).long()] == 0) & ~over  # type: ignore[index]
    if strict and bool(stray.any()):
        raise ValueError(stray_message(int(stray.sum()), int(epoch), int(indices[stray][0])))
    return stray | over, bad_index & ~over, over


def commit_rows(rows: Optional[torch.Tensor], indices: torch.Tensor, left_out: torch.Tensor,
                over: torch.Tensor, epoch: torch.Tensor, update: bool) -> None:
    """Count an admitted call's rows and its stray rows, or a refused call (``ROW_*``)."""
    if not update or rows is None:
        return
    b = indices.shape[0]
    trained, shard = rows[layout.ROW_TRAINED], rows[layout.ROW_SHARD]
    stray = left_out & ~over
    first_over = over & (rows[layout.ROW_OVER_COUNT] == 0) & (b > 0)
    at = torch.where(shard < 0, torch.full_like(trained, -1), trained + b)
    rows[layout.ROW_OVER_VALUE] = torch.where(first_over, at, rows[layout.ROW_OVER_VALUE])
    rows[layout.ROW_OVER_EPOCH] = torch.where(first_over, epoch.to(torch.int64), rows[layout.ROW_OVER_EPOCH])
    rows[layout.ROW_OVER_COUNT] += torch.where(over, b, 0)
    had_none = rows[layout.ROW_STRAY_COUNT] == 0
    rows[layout.ROW_STRAY_VALUE] = torch.where(had_none & stray.any(), first_flagged(indices, stray),
                                               rows[layout.ROW_STRAY_VALUE])
    rows[layout.ROW_STRAY_COUNT] += stray.sum()
    rows[layout.ROW_TRAINED] += torch.where(over, 0, b)
    rows[layout.ROW_CALLS] += torch.where(over, 0, 1)


class EpochRows:
    """The epoch's rows on the device: ``member`` (uint8 [N + 1]), ``counts`` (int64
    [ROW_SIZE]) and ``epoch`` (0-d int64), changed in place only (a compiled graph keeps
    pointing at them), outside any loss call."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.member = torch.zeros(n + 1, dtype=torch.uint8, device=device)
        self.counts = torch.zeros(layout.ROW_SIZE, dtype=torch.int64, device=device)
        self.counts[layout.ROW_SHARD] = -1
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device: torch.device | str) -> None:
        self.member, self.counts, self.epoch = (t.to(device) for t in (self.member, self.counts, self.epoch))

    def args(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``member, rows, epoch`` as the loss ops take them."""
        return self.member, self.counts, self.epoch

    def open(self, selection: Optional[torch.Tensor], epoch: int, shard_len: int, position: int) -> None:
        """The epoch in progress (``selection`` None: none), ``position`` of its rows trained."""
        with torch.no_grad():
            self.member.zero_()
            if selection is not None:
                self.member[selection.to(self.device)] = 1
            c = self.counts
            c[layout.ROW_TRAINED] = position
            c[layout.ROW_SHARD] = shard_len if selection is not None else -1
            c[layout.ROW_CALLS] = 0
            self.epoch.fill_(epoch)

    @staticmethod
    def check_room(b: int, *, epoch: int, drawn: bool, position: int, shard_len: int) -> None:
        """The host's room check of an eager call: host figures only, so it refuses before
        anything (the state's device included) changes. The ops check again on the device."""
        if not drawn or position + b > shard_len:
            raise ValueError(room_message(b, epoch, position, shard_len if drawn else -1))

    def settle(self, cheap_only: bool = False) -> Optional[Tuple[int, int]]:
        """The device's (rows trained, calls) of the epoch, once a compiled call may have
        counted rows the host did not see; None when the host's count is exact. A host sync
        off the CPU (``cheap_only``: then None instead)."""
        if not ops.traced_updates or (cheap_only and self.device.type != "cpu"):
            return None
        trained, _, calls = self.counts[:layout.ROW_CALLS + 1].tolist()
        return int(trained), int(calls)

    def take_faults(self) -> Tuple[int, int, int, int, int]:
        """(stray rows, the first one's sample, rows refused for room, the position the first
        such call would reach (-1: no epoch), its epoch) since the last call, cleared: a host
        sync."""
        c = self.counts
        out = c[layout.ROW_STRAY_COUNT:layout.ROW_SIZE].tolist()
        c[layout.ROW_STRAY_COUNT:layout.ROW_SIZE] = 0
        return tuple(int(v) for v in out)  # type: ignore[return-value]

    def skip(self, indices: torch.Tensor, strict: bool) -> None:
        """A consumed batch no op observes (``Sampler.skip``): the ops' membership check and
        row count (``admit_rows``, ``commit_rows``), in PyTorch."""
        with torch.no_grad():
            bad_index = (indices < 0) | (indices >= self.n)
            left_out, _, over = admit_rows(indices, bad_index, self.n, self.member, self.counts,
                                           self.epoch, strict, True)
            commit_rows(self.counts, indices, left_out, over, self.epoch, True)


def raise_for_faults(faults: Tuple[int, int, int, int, int], epoch: int) -> None:
    """The deferred form of the ops' refusals (non-strict mode), at the selection pass."""
    n_stray, first, n_over, over_at, over_epoch = faults
    if n_over:
        where = ("no epoch was in progress" if over_at < 0 else
                 f"they would have taken epoch {over_epoch} to {over_at} rows, past this rank's shard")
        raise ValueError(f"indices: {n_over} row(s) were given to the loss call when {where}; they "
                         f"were left out of the per-sample state; iterate the sampler or its "
                         f"DataLoader once per epoch, or {FIX}")
    if n_stray:
        raise ValueError(f"indices: {n_stray} row(s) given to the loss call in epoch {epoch} were "
                         f"samples it did not select, e.g. {first} (an evaluation pass? labels passed "
                         f"as indices?); they were left out of the per-sample state; {FIX}")
