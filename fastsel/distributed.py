"""Keeping every rank's per-sample state identical with one collective per selection pass.

Between two selection passes each rank updates only the samples of its own shard. At the
pass, one all-reduce of a packed float64 vector merges those updates: a sample's running
values come from the rank(s) that trained it (averaged when padding gave it to several),
counters add up, and every rank ends with the same state, so it draws the same selection.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .state import ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE, SampleState
from .validation.fields import (check_errors, check_fields, check_int, check_stats, check_tensor,
                                check_values)


def world(num_replicas: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    """(world size, rank), from the arguments or the initialised process group."""
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got num_replicas={num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got rank={rank}")
    return int(num_replicas), int(rank)


def agree_min(value: int) -> int:
    """The smallest of every rank's ``value`` (one all-reduce), or ``value`` itself without
    a process group of more than one rank. A host sync: for counts that decide collectives."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class StateSync:
    """Merges the ranks' updates since the last pass; keeps the baseline they started from."""

    def __init__(self, state: SampleState, world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        self.rebase(state, mark=0)

    def rebase(self, state: SampleState, mark: int) -> None:
        """Take the current state as the common baseline; updates from epoch ``mark`` on are new."""
        self.seen0 = state.seen.clone()
        self.stats0 = state.stats.clone()
        self.errors0 = state.errors.clone()
        self.mark = int(mark)

    def state_dict(self) -> Dict[str, object]:
        # Copies: ``.cpu()`` of a CPU tensor is the tensor itself, and ``stats0`` is written
        # in place at each selection pass.
        return {"seen0": self.seen0.detach().cpu().clone(), "stats0": self.stats0.detach().cpu().clone(),
                "errors0": self.errors0.detach().cpu().clone(), "mark": self.mark}

    _KEYS = ("seen0", "stats0", "errors0", "mark")

    @staticmethod
    def check_state_dict(sd: Any, n: int) -> None:
        """Raise a ValueError naming the field (``sync.seen0``, ...) unless ``sd`` is a
        ``state_dict()`` for N = ``n`` samples: every field present, of the right dtype and
        shape, finite, counts >= 0 and ``mark`` an int >= 0. Changes nothing."""
        check_fields(sd, StateSync._KEYS, "sync")
        seen0 = check_tensor("sync.seen0", sd["seen0"], torch.int32, (n,))
        check_values("sync.seen0", seen0, lo=0)
        check_stats("sync.stats0", sd["stats0"])
        check_errors("sync.errors0", sd["errors0"])
        check_int("sync.mark", sd["mark"], lo=0)

    def load_state_dict(self, sd: Dict[str, object], device: torch.device) -> None:
        """Check ``sd`` (as ``check_state_dict``), then take copies of its tensors on
        ``device``: the baseline never shares a tensor with ``sd``."""
        self.check_state_dict(sd, int(self.seen0.numel()))
        self.seen0, self.stats0, self.errors0 = (
            sd[k].detach().to(device=device, copy=True)  # type: ignore[union-attr]
            for k in ("seen0", "stats0", "errors0"))
        self.mark = int(sd["mark"])  # type: ignore[arg-type]

    def to(self, device: torch.device) -> None:
        self.seen0, self.stats0, self.errors0 = (t.to(device) for t in (self.seen0, self.stats0, self.errors0))

    def __call__(self, state: SampleState, extra: List[float]) -> List[float]:
        """All-reduce the state; returns ``extra`` summed over ranks. Collective: every rank
        calls it; the caller then ``rebase``s once it has consumed the error counters."""
        n, w, dev = state.n, self.world_size, state.device
        touched = (state.last_epoch >= self.mark).double()
        # The offending example values of the error counters: one slot per rank.
        err_d = (state.errors - self.errors0).double()
        ex = torch.zeros(2, 2, w, dtype=torch.float64, device=dev)
        for row, (cnt, val) in enumerate(((ERR_INDEX_COUNT, ERR_INDEX_VALUE), (ERR_LABEL_COUNT, ERR_LABEL_VALUE))):
            has = (err_d[cnt] > 0).double()
            ex[row, 0, self.rank] = has
            ex[row, 1, self.rank] = has * state.errors[val].double()
        pack = torch.cat([
            touched, state.loss.double() * touched, state.loss_var.double() * touched,
            state.p_true.double() * touched, state.last_epoch.double() * touched,
            (state.seen - self.seen0).double(), (state.stats - self.stats0), err_d,
            ex.flatten(), torch.tensor(extra, dtype=torch.float64, device=dev)])
        dist.all_reduce(pack)
        cnt, l, v, p, le, ds = pack[: 6 * n].view(6, n)
        off = 6 * n
        dstats = pack[off: off + self.stats0.numel()]
        off += self.stats0.numel()
        derr = pack[off: off + self.errors0.numel()]
        off += self.errors0.numel()
        ex = pack[off: off + 4 * w].view(2, 2, w)
        out_extra = pack[off + 4 * w:].tolist()
        hit = cnt > 0
        safe = cnt.clamp(min=1.0)
        with torch.no_grad():
            state.loss.copy_(torch.where(hit, l / safe, state.loss.double()).float())
            state.loss_var.copy_(torch.where(hit, v / safe, state.loss_var.double()).float())
            state.p_true.copy_(torch.where(hit, p / safe, state.p_true.double()).float())
            state.last_epoch.copy_(torch.where(hit, torch.round(le / safe), state.last_epoch.double()).int())
            state.seen.copy_(self.seen0 + ds.round().int())
            state.stats.copy_(self.stats0 + dstats)
            errors = self.errors0 + derr.round().long()
            for row, val in enumerate((ERR_INDEX_VALUE, ERR_LABEL_VALUE)):
                ranks = torch.nonzero(ex[row, 0] > 0).flatten()
                if ranks.numel():
                    errors[val] = int(ex[row, 1, ranks[0]].item())
            state.errors.copy_(errors)
        return out_extra
