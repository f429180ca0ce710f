"""Epoch-level policies by name: ``make_policy("tftb", alpha=0.3)``."""
from __future__ import annotations

from typing import Any, Dict, Type, Union

from .active_bias import CSGD, PSGD
from .base import Policy, Selection, SelectionContext
from .baseline import Scan, Uniform
from .infobatch import InfoBatch
from .tftb import TFTB

POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (Uniform, Scan, PSGD, CSGD, TFTB, InfoBatch)
}


def make_policy(policy: Union[str, Policy], **kwargs: Any) -> Policy:
    """A policy instance from a name and its parameters (or an instance, as is)."""
    if isinstance(policy, Policy):
        if kwargs:
            raise ValueError(f"policy parameters {sorted(kwargs)} given with a Policy instance")
        return policy
    if not isinstance(policy, str) or policy.lower() not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got policy={policy!r}")
    cls = POLICIES[policy.lower()]
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"policy {policy!r}: {e}") from None


__all__ = ["POLICIES", "Policy", "Selection", "SelectionContext", "make_policy",
           "Uniform", "Scan", "PSGD", "CSGD", "TFTB", "InfoBatch"]
