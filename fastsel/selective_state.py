"""SelectiveStep's checkpoint, format 1: the fields its ``state_dict`` holds and the check of
every one before anything loads. The policy owns its fields: ``policy``, and, at the top
level where format 1 has always kept them, SB's ``pending`` rows and StaleSB's
``last_loss``/``known`` (``BatchPolicy.step_fields``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from .batch_policies import BatchPolicy
from .step_passes import COUNTS, TIMES
from .validation.fields import check_dict, check_int, check_keys, check_real, require

FORMAT = 1
KEYS = ("format", "config", "own_epoch", "counts", "times", "policy", "batch_size",
        "last_loss", "known", "pending")
#: Fields an older format-1 state_dict lacks.
OPTIONAL = ("pending",)


def write_state(policy: BatchPolicy, own_epoch: int, counts: Dict[str, int],
                times: Dict[str, float], batch_size: Optional[int]) -> Dict[str, Any]:
    """A step's state_dict: its counters and the policy's fields (tensors on the CPU)."""
    return {"format": FORMAT, "config": policy.config(), "own_epoch": own_epoch,
            "counts": dict(counts), "times": dict(times), "policy": policy.state_dict(),
            "batch_size": batch_size, **policy.step_fields()}


def check_state(sd: Any, policy: BatchPolicy) -> None:
    """Raise a ValueError naming the field unless ``sd`` is a state_dict of a step with
    ``policy``: every field present, of the right type and shape, counters >= 0, times
    finite; the policy's own fields checked by the policy. Changes nothing."""
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a fastsel SelectiveStep state_dict of format {FORMAT}")
    for key in KEYS:
        if key not in OPTIONAL:
            require(sd, key)
    check_keys(sd, KEYS, "")
    if sd["config"] != policy.config():
        raise ValueError(f"state_dict is for policy {sd['config']}, this step has "
                         f"{policy.config()}")
    check_int("own_epoch", sd["own_epoch"], lo=0)
    for k, v in check_dict(sd["counts"], COUNTS, "counts").items():
        check_int(f"counts.{k}", v, lo=0)
    for k, v in check_dict(sd["times"], TIMES, "times").items():
        check_real(f"times.{k}", v, lo=0.0)
    if sd["batch_size"] is not None:
        check_int("batch_size", sd["batch_size"], lo=1)
    policy.check_step_fields(sd)
    policy.check_state_dict(sd["policy"])
