"""Batch-level policies by name, for :class:`fastsel.SelectiveStep`: each scores the rows of
a mini-batch and keeps some of them for the backward pass."""
from __future__ import annotations

from typing import Any, Dict, Type, Union

from .base import BatchPolicy, batch_topk, spearman
from .osgd import KAWAGUCHI_SCHEDULE, OrderedSGD
from .sb import SelectiveBackprop
from .sift import SIFT

BATCH_POLICIES: Dict[str, Type[BatchPolicy]] = {
    cls.name: cls for cls in (SelectiveBackprop, OrderedSGD, SIFT)
}


def make_batch_policy(policy: Union[str, BatchPolicy], **kwargs: Any) -> BatchPolicy:
    """A batch policy instance from a name and its parameters (or an instance, as is)."""
    if isinstance(policy, BatchPolicy):
        if kwargs:
            raise ValueError(f"policy parameters {sorted(kwargs)} given with a BatchPolicy instance")
        return policy
    if not isinstance(policy, str) or policy.lower() not in BATCH_POLICIES:
        raise ValueError(f"policy must be one of {sorted(BATCH_POLICIES)} (batch level; epoch-level "
                         f"policies go to fastsel.Sampler), got policy={policy!r}")
    cls = BATCH_POLICIES[policy.lower()]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"policy {policy!r}: {e}") from None


__all__ = ["BATCH_POLICIES", "BatchPolicy", "make_batch_policy", "SelectiveBackprop",
           "OrderedSGD", "SIFT", "KAWAGUCHI_SCHEDULE", "batch_topk", "spearman"]
