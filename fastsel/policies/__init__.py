"""Epoch-level policies by name: ``make_policy("tftb", alpha=0.3)``."""
from __future__ import annotations

from typing import Any, Dict, Type, Union

from ..registry import build
from .active_bias import CSGD, PSGD
from .base import Policy, Selection, SelectionContext
from .baseline import Scan, Uniform
from .infobatch import InfoBatch
from .rho import RHO
from .rs2 import RS2
from .tftb import TFTB

POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls for cls in (Uniform, Scan, PSGD, CSGD, TFTB, InfoBatch, RHO, RS2)
}


def make_policy(policy: Union[str, Policy], **kwargs: Any) -> Policy:
    """A policy instance from a name and its parameters (or an instance, as is)."""
    return build(POLICIES, Policy, policy, kwargs)

__all__ = ["POLICIES", "Policy", "Selection", "SelectionContext", "make_policy",
           "Uniform", "Scan", "PSGD", "CSGD", "TFTB", "InfoBatch", "RHO", "RS2"]
