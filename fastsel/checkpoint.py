"""A Sampler's checkpoint: what ``state_dict`` holds (tensors, numbers and strings only,
so ``torch.load(weights_only=True)`` reads it), and a load that checks every field before
it writes anything and keeps no tensor of the dict it was given.

Each part owns its fields (``Parts``: the epoch cursor, the per-sample state, the policy,
the selection pass, the DDP baseline, the budget's counters); this module holds the format:
which key each part's fields live under, and what a checkpoint must match to load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

from .validation.fields import refuse

if TYPE_CHECKING:   # the parts' types, for the annotations only
    from .budget import Budget
    from .cursor import EpochCursor
    from .distributed import StateSync
    from .policies import Policy
    from .selection import SelectionPass
    from .state import SampleState

FORMAT = 1
KEYS = ("format", "config", "seed", "epoch", "position", "exhausted", "selection",
        "selection_epoch", "state", "policy_state", "generator", "sync", "counters")
_CURSOR = ("epoch", "position", "exhausted", "selection", "selection_epoch")


@dataclass
class Parts:
    """What a Sampler checkpoint is made of. ``config``: what a checkpoint must match to
    load (N, the policy, the budget, the sharding); ``time_mode``: a time budget."""

    config: Dict[str, Any]
    seed: int
    time_mode: bool
    cursor: "EpochCursor"
    state: "SampleState"
    policy: "Policy"
    passes: "SelectionPass"
    sync: Optional["StateSync"]
    budget: "Budget"


def state_dict(p: Parts) -> Dict[str, Any]:
    """``Sampler.state_dict``."""
    counters = p.budget.state_dict()
    counters.update(p.passes.counters())
    return {"format": FORMAT, "config": p.config, "seed": p.seed,
            **p.cursor.state_dict(p.time_mode),
            "state": p.state.state_dict(), "policy_state": p.policy.state_dict(),
            "generator": p.passes.generator_state(),
            "sync": None if p.sync is None else p.sync.state_dict(),
            "counters": counters}


def check(p: Parts, sd: Any) -> None:
    """Refuse a state_dict that cannot be loaded, naming the field; changes nothing."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a fastsel Sampler state_dict of format {FORMAT}")
    missing = [k for k in KEYS if k not in sd]
    if missing:
        raise ValueError(f"state_dict is missing {missing}: pass a dict from Sampler.state_dict()")
    theirs = sd["config"]
    if not isinstance(theirs, dict):
        raise refuse("config", f"must be a dict, got {type(theirs).__name__}")
    for key, mine in {**p.config, "seed": p.seed}.items():
        got = sd["seed"] if key == "seed" else theirs.get(key)
        if mine != got:
            raise ValueError(f"state_dict is for {key}={got!r}, this sampler has {key}={mine!r}")
    p.cursor.check_state_dict({k: sd[k] for k in _CURSOR})
    p.passes.check_generator_state(sd["generator"])
    p.state.check_state_dict(sd["state"])
    p.policy.check_state_dict(sd["policy_state"])
    if p.sync is not None and sd["sync"] is not None:
        p.sync.check_state_dict(sd["sync"], p.state.n)
    p.budget.check_state_dict(sd["counters"])
    p.passes.check_counters(sd["counters"])


def load(p: Parts, sd: Dict[str, Any]) -> None:
    """``Sampler.load_state_dict``: ``check``, then write copies."""
    check(p, sd)
    p.policy.load_state_dict(sd["policy_state"])
    p.state.load_state_dict(sd["state"])
    p.passes.load(sd["generator"], sd["counters"])
    if p.sync is not None and sd["sync"] is not None:
        p.sync.load_state_dict(sd["sync"], p.state.device)
    p.cursor.load_state_dict({k: sd[k] for k in _CURSOR})
    p.budget.load_state_dict(sd["counters"])
