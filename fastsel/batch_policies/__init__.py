"""Batch-level policies by name, for :class:`fastsel.SelectiveStep`: each scores the rows of
a mini-batch and keeps some of them for the backward pass."""
from __future__ import annotations

from typing import Any, Dict, Type, Union

from ..registry import build
from .base import BatchPolicy, batch_topk, spearman
from .osgd import KAWAGUCHI_SCHEDULE, OrderedSGD
from .sb import SelectiveBackprop
from .sift import SIFT
from .step_api import StepView

BATCH_POLICIES: Dict[str, Type[BatchPolicy]] = {
    cls.name: cls for cls in (SelectiveBackprop, OrderedSGD, SIFT)
}


def make_batch_policy(policy: Union[str, BatchPolicy], **kwargs: Any) -> BatchPolicy:
    """A batch policy instance from a name and its parameters (or an instance, as is)."""
    return build(BATCH_POLICIES, BatchPolicy, policy, kwargs,
                 " (batch level; epoch-level policies go to fastsel.Sampler)")

__all__ = ["BATCH_POLICIES", "BatchPolicy", "make_batch_policy", "SelectiveBackprop",
           "OrderedSGD", "SIFT", "KAWAGUCHI_SCHEDULE", "batch_topk", "spearman", "StepView"]
