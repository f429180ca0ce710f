"""The CPU backend: the op family's ``csrc`` implementation (``fastsel._C``, C++ in csrc/).

Every target form and ``observe`` run in C++; the step computes loss, gradient and state
update in one call. If the extension cannot be imported, ``unavailable()`` says why in one
line and ``"auto"`` falls back to ``reference``.
"""
from __future__ import annotations

from typing import Optional

from .. import ops  # noqa: F401  (the schemas are defined before _C registers its kernels)
from ..state import SampleState
from .base import Backend, state_args

try:
    from .. import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"fastsel._C is not importable ({type(e).__name__}: {e}); build it with " \
                    "`pip install --no-build-isolation -e .`"


class CpuBackend(Backend):
    """The csrc/ C++ implementation, for CPU tensors."""

    name = "cpu"
    impl = "csrc"
    devices = ("cpu",)
    auto_devices = ("cpu",)
    observe_devices = ("cpu",)

    def unavailable(self) -> Optional[str]:
        return _IMPORT_ERROR

    def check_state(self, state: SampleState) -> None:
        _C.check_state(*state_args(state))
