"""Named policies: one way to turn a name and its parameters into an instance."""
from __future__ import annotations

from typing import Any, Dict, Type, TypeVar, Union

T = TypeVar("T")


def build(registry: Dict[str, Type[T]], base: Type[T], policy: Union[str, T], kwargs: Dict[str, Any],
          hint: str = "") -> T:
    """``registry[policy](**kwargs)``, or ``policy`` itself if it is already a ``base``;
    unknown names and parameters give errors that name them."""
    if isinstance(policy, base):
        if kwargs:
            raise ValueError(f"policy parameters {sorted(kwargs)} given with a {base.__name__} instance")
        return policy
    if not isinstance(policy, str) or policy.lower() not in registry:
        raise ValueError(f"policy must be one of {sorted(registry)}{hint}, got policy={policy!r}")
    try:
        return registry[policy.lower()](**kwargs)
    except TypeError as e:
        raise TypeError(f"policy {policy!r}: {e}") from None
