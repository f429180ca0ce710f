"""The CUDA backend: the op family's ``csrc`` implementation on CUDA (``fastsel._C`` built
with CUDA, ``csrc/*.cu``).

Its kernels compute the fused step for class-index targets of 2-D logits (two launches: the
rows, then the duplicate merge and state update; csrc/README.md) and the selection pass
(radix threshold, order-preserving compaction, a stable sort of the winners); soft and
K-dim targets and ``observe`` run on the ``reference`` ops on the same device until the GPU
fast path covers them. Everything runs in the registered C++ op (no Python per call inside
the op); the step's two launches also make the checks of which rows count (the epoch's
``member`` mask and ``rows`` counters, read and written on the device, and the epoch read
from its 0-d device tensor). No step needs a host synchronisation except strict mode's
checks, so a step with ``strict=False`` can be captured in a CUDA graph after one eager
warm-up call, and the graph stays valid across epochs (``EpochRows`` changes its tensors in
place).
``unavailable()`` says in one line why the backend cannot run.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..state import SampleState
from .base import HARD_2D, Backend, state_args
from .cpu import _C, _IMPORT_ERROR


class CudaBackend(Backend):
    """The csrc/ CUDA implementation."""

    name = "cuda"
    impl = "csrc"
    devices = ("cuda",)
    auto_devices = ("cuda",)
    step_forms = (HARD_2D,)
    observe_devices = ()

    def unavailable(self) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not getattr(_C, "with_cuda", False):
            return ("fastsel._C was built without CUDA (it needs a CUDA toolkit and a CUDA build "
                    "of torch at build time; FORCE_CUDA=1 builds without a visible GPU)")
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None

    def check_state(self, state: SampleState) -> None:
        _C.check_state(*state_args(state))
