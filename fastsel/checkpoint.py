"""A Sampler's checkpoint: what ``state_dict`` holds (tensors, numbers and strings only,
so ``torch.load(weights_only=True)`` reads it), and a load that checks every field before
it writes anything and keeps no tensor of the dict it was given."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import torch

from .validation.values import is_int

if TYPE_CHECKING:
    from .sampler import Sampler

FORMAT = 1
KEYS = ("format", "config", "seed", "epoch", "position", "exhausted", "selection",
        "selection_epoch", "state", "policy_state", "generator", "sync", "counters")


def config(s: "Sampler") -> Dict[str, Any]:
    """What a checkpoint must match to load: N, the policy, the budget and the sharding."""
    b = s.budget
    return {"n": s.n, "policy": s.policy.config(), "budget": b.fraction,
            "time_budget": b.seconds, "epochs": b.epochs_total,
            "world_size": s.world_size, "drop_last": s.drop_last}


def state_dict(s: "Sampler") -> Dict[str, Any]:
    """``Sampler.state_dict``."""
    counters = s.budget.state_dict()
    counters.update(selection_time=s._passes.seconds,
                    epoch_losses=list(s._passes.epoch_losses))
    return {
        "format": FORMAT, "config": config(s), "seed": s.seed,
        "epoch": s.epoch, "position": s.position,
        # An iterator that ran out with batches still in flight is not a finished epoch.
        "exhausted": s._exhausted and (s.time_mode or s._epoch_trained()),
        "selection": None if s._selection is None else s._selection.cpu().clone(),
        "selection_epoch": s._selection_epoch,
        "state": s.state.state_dict(), "policy_state": s.policy.state_dict(),
        "generator": s._passes.generator.get_state(),
        "sync": None if s._sync is None else s._sync.state_dict(),
        "counters": counters,
    }


def check(s: "Sampler", sd: Any) -> None:
    """Refuse a state_dict that cannot be loaded, naming the field; changes nothing."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a fastsel Sampler state_dict of format {FORMAT}")
    missing = [k for k in KEYS if k not in sd]
    if missing:
        raise ValueError(f"state_dict is missing {missing}: pass a dict from Sampler.state_dict()")
    mine, theirs = config(s), sd["config"]
    if not isinstance(theirs, dict):
        raise ValueError(f"state_dict field 'config' must be a dict, got {type(theirs).__name__}")
    for key in mine:
        if mine[key] != theirs.get(key):
            raise ValueError(f"state_dict is for {key}={theirs.get(key)!r}, "
                             f"this sampler has {key}={mine[key]!r}")
    if sd["seed"] != s.seed:
        raise ValueError(f"state_dict is for seed={sd['seed']!r}, this sampler has seed={s.seed!r}")
    for key in ("epoch", "position"):
        if not is_int(sd[key]) or sd[key] < 0:
            raise ValueError(f"state_dict field {key!r} must be a non-negative int, got {sd[key]!r}")
    if not isinstance(sd["exhausted"], bool):
        raise ValueError(f"state_dict field 'exhausted' must be a bool, got {sd['exhausted']!r}")
    sel, sel_epoch = sd["selection"], sd["selection_epoch"]
    if sel is not None and (not isinstance(sel, torch.Tensor) or sel.dtype != torch.int64
                            or sel.dim() != 1 or sel.numel() > s.n
                            or (sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= s.n))):
        raise ValueError(f"state_dict field 'selection' must be None or a 1-D int64 tensor of at "
                         f"most {s.n} indices in [0, {s.n}), got {sel!r:.80}")
    if (sel is None) != (sel_epoch is None) or (sel_epoch is not None and (not is_int(sel_epoch) or sel_epoch < 0)):
        raise ValueError("state_dict field 'selection_epoch' must be a non-negative int with a "
                         f"selection and None without one, got {sel_epoch!r}")
    limit = s.shard.length(sel.numel()) if sel_epoch == sd["epoch"] else 0
    if sd["position"] > limit:
        raise ValueError(f"state_dict field 'position' is {sd['position']}, beyond the {limit} rows "
                         f"of epoch {sd['epoch']}'s shard")
    gen = sd["generator"]
    ref = s._passes.generator.get_state()
    if not isinstance(gen, torch.Tensor) or gen.dtype != ref.dtype or gen.shape != ref.shape:
        raise ValueError(f"state_dict field 'generator' must be a torch.Generator state "
                         f"({ref.dtype} tensor of shape {tuple(ref.shape)})")
    s.state.check_state_dict(sd["state"])
    s.policy.check_state_dict(sd["policy_state"])
    if s._sync is not None and sd["sync"] is not None:
        s._sync.check_state_dict(sd["sync"], s.n)
    s.budget.check_state_dict(sd["counters"])


def load(s: "Sampler", sd: Dict[str, Any]) -> None:
    """``Sampler.load_state_dict``: ``check``, then write copies."""
    check(s, sd)
    s.policy.load_state_dict(sd["policy_state"])
    s.state.load_state_dict(sd["state"])
    s._passes.generator.set_state(sd["generator"].clone())
    if s._sync is not None and sd["sync"] is not None:
        s._sync.load_state_dict(sd["sync"], s.state.device)
    s.epoch, s.position = sd["epoch"], sd["position"]
    s._exhausted = sd["exhausted"]
    sel = sd["selection"]
    s._set_selection(None if sel is None else sel.to(s.state.device, copy=True),
                        sd["selection_epoch"])
    c = sd["counters"]
    s.budget.load_state_dict(c)
    s._passes.seconds = float(c["selection_time"])
    s._passes.epoch_losses = [float(v) for v in c.get("epoch_losses", [])]
