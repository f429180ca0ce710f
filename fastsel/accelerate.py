"""Checkpointing a sampler with Hugging Face Accelerate (or any framework that saves one
file for all ranks): ``RankStates`` holds every rank's ``Sampler.state_dict()``.

    accelerator = Accelerator()
    sampler = fastsel.Sampler(train, policy="tftb", budget=0.3, epochs=30,
                              num_replicas=accelerator.num_processes,
                              rank=accelerator.process_index)
    loader = DataLoader(train, batch_size=256, sampler=sampler)     # not prepared
    model, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(fastsel.accelerate.RankStates(sampler))

Why every rank's state: under DDP a sampler's state holds its own rank's updates since
the last selection pass (they are merged at the next one), and ``accelerator.save_state``
writes a registered object's ``state_dict()`` from the main process only. ``RankStates``
gathers the ranks' states into that one dict (one ``all_gather_object``, a collective:
every rank saves, as ``save_state`` has them do), and each rank loads its own back, so a
resume is exact at any step. With one process it holds the one state.

Accelerate itself is not imported here: ``import fastsel`` never needs it.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch.distributed as dist

from .sampler import Sampler

_FORMAT = 1


class RankStates:
    """Every rank's ``sampler.state_dict()`` as one checkpointable object (``state_dict``
    and ``load_state_dict``), for ``accelerator.register_for_checkpointing`` or a
    checkpoint that one rank writes."""

    def __init__(self, sampler: Sampler) -> None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a fastsel.Sampler, got {type(sampler).__name__}")
        self.sampler = sampler

    def state_dict(self) -> Dict[str, Any]:
        """``{"format", "world_size", "ranks": [state of rank 0, rank 1, ...]}``; tensors,
        numbers and strings only (loads with ``torch.load(weights_only=True)``). Under a
        process group of more than one rank this is a collective: every rank must call it."""
        s = self.sampler
        mine = s.state_dict()
        ranks: List[Any] = [mine]
        if s.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"the sampler has world_size={s.world_size} but no process group "
                                   "is initialised: every rank's state cannot be gathered")
            if dist.get_world_size() != s.world_size:
                raise RuntimeError(f"the sampler has world_size={s.world_size}, the process group "
                                   f"{dist.get_world_size()}")
            ranks = [None] * s.world_size
            dist.all_gather_object(ranks, mine)
        return {"format": _FORMAT, "world_size": s.world_size, "ranks": ranks}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Load this rank's state (``sampler.rank``) from a ``state_dict()`` saved by as
        many ranks; a plain ``Sampler.state_dict()`` is loaded as it is."""
        s = self.sampler
        if isinstance(sd, dict) and "ranks" not in sd and "config" in sd:
            s.load_state_dict(sd)
            return
        if not isinstance(sd, dict) or sd.get("format") != _FORMAT or not isinstance(sd.get("ranks"), list):
            raise ValueError("not a fastsel RankStates state_dict: pass a dict from RankStates.state_dict()")
        if sd.get("world_size") != s.world_size or len(sd["ranks"]) != s.world_size:
            raise ValueError(f"state_dict is for world_size={sd.get('world_size')!r} "
                             f"({len(sd['ranks'])} rank states), this sampler has "
                             f"world_size={s.world_size}")
        s.load_state_dict(sd["ranks"][s.rank])
