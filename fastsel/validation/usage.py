"""Refusals of a misused Sampler, each naming the fix: loss settings passed to the call
instead of the Sampler, and iteration through a distributed wrapper."""
from __future__ import annotations

import types
from typing import Any, Dict, Optional

import torch


#: Loss settings a user may pass to the call, where they belong on the Sampler.
_SAMPLER_SETTINGS = ("ignore_index", "label_smoothing", "class_weight", "weight", "ema")


def refuse_call_settings(call: str, unknown: Dict[str, Any]) -> None:
    """Refuse keyword arguments ``loss``/``observe`` do not take, naming where they go."""
    name, value = next(iter(unknown.items()))
    if name in _SAMPLER_SETTINGS:
        arg = "class_weight" if name == "weight" else name
        raise TypeError(f"Sampler.{call}() takes no {name}={value!r}: the loss settings belong on the "
                        f"Sampler, set once for every call: fastsel.Sampler(..., {arg}={value!r})")
    raise TypeError(f"Sampler.{call}() got an unexpected keyword argument {name!r} (it takes "
                    "reduction= and update=; the loss settings go on the Sampler)")


def refuse_wrappers(frame: Optional[types.FrameType]) -> None:
    """Refuse iteration by a distributed wrapper (Lightning's DistributedSamplerWrapper, a
    torch DistributedSampler over the sampler): fastsel shards itself, so a wrapper would
    shard its shard and read lengths of epochs it does not know."""
    for _ in range(3):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.utils.data.DistributedSampler) or type(owner).__name__ == "_DatasetSamplerWrapper":
            raise TypeError(f"fastsel.Sampler is being iterated by {type(owner).__name__}, a distributed "
                            "wrapper: fastsel shards itself (num_replicas and rank default to the process "
                            "group). Give the DataLoader the Sampler itself: in Lightning pass "
                            "Trainer(use_distributed_sampler=False); elsewhere drop the "
                            "DistributedSampler/DistributedSamplerWrapper")
        frame = frame.f_back
