"""The backend contract: every backend is a :class:`Backend`, a choice of op implementation.

A backend names the suffix of its ops in ``torch.ops.fastsel`` (``fastsel.ops``) and says
where it runs; the arguments are normalised here, once, for all of them. A target form or
an op an implementation has no kernel for runs on the ``reference`` ops (pure PyTorch, any
device), so every backend takes every input ``F.cross_entropy`` takes.
"""
from __future__ import annotations

import abc
import operator
from typing import Any, Optional, Tuple, Union

import torch

from .. import layout, ops
from ..config import LossConfig
from ..rows import EpochRows
from ..state import SampleState

#: The target forms of the fused step.
HARD_2D, HARD_KDIM, SOFT = "hard-2d", "hard-kdim", "soft"
ALL_FORMS = (HARD_2D, HARD_KDIM, SOFT)


def target_form(logits: torch.Tensor, target: torch.Tensor) -> str:
    """Which of the step's target forms ``target`` is (shapes already checked)."""
    if target.is_floating_point():
        return SOFT
    return HARD_2D if logits.dim() == 2 else HARD_KDIM


def check_k(k: Any, n: int) -> int:
    """``select``'s k as an int in [0, n]; k > n keeps all n. Refuses anything else."""
    try:
        kk = operator.index(k)  # Python and numpy ints; not floats or tensors
    except TypeError:
        kk = -1
    if isinstance(k, (bool, torch.Tensor)) or kk < 0:
        raise ValueError(f"k must be a non-negative int (the number of keys to keep), got k={k!r}")
    return min(kk, n)


def state_args(state: SampleState, epoch: Union[int, torch.Tensor] = 0,
               rows: Optional[EpochRows] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """The state's tensors in the op schemas' order (``ops.SCHEMAS``), then ``member, rows,
    epoch``: an :class:`EpochRows`' (None: every row counts) and the epoch as a 0-d tensor."""
    buf = state.buffers()
    if not isinstance(epoch, torch.Tensor):
        epoch = torch.tensor(int(epoch), dtype=torch.int64, device=state.device)
    member, counts = (None, None) if rows is None else (rows.member, rows.counts)
    return (tuple(buf[f] for f in layout.STEP_FIELDS)
            + (buf["weight"], state.stats, state.errors, member, counts, epoch))


class Backend(abc.ABC):
    """One implementation of the op family: ``step``, ``observe``, ``select``, ``uniform``,
    ``shuffle``, checked against ``reference`` by the shared suite (tests/test_backends.py)."""

    #: The name users pass as ``backend=``.
    name: str = ""
    #: The suffix of this backend's ops (``fastsel::ce_step_<impl>``).
    impl: str = ""
    #: Device types it runs on, and those where ``"auto"`` may pick it.
    devices: Tuple[str, ...] = ()
    auto_devices: Tuple[str, ...] = ()
    #: Target forms its ``ce_step`` computes itself; the others run on ``reference``.
    step_forms: Tuple[str, ...] = ALL_FORMS
    #: Device types where its ``observe`` has a kernel; elsewhere ``reference`` runs it.
    observe_devices: Tuple[str, ...] = ("cpu", "cuda")

    @abc.abstractmethod
    def unavailable(self) -> Optional[str]:
        """None when the backend runs here, else the one-line reason it does not."""

    def op(self, name: str, impl: Optional[str] = None) -> Any:
        """``torch.ops.fastsel.<name>_<impl>`` (this backend's by default)."""
        return ops.OVERLOADS[(name, impl or self.impl)]

    def check_state(self, state: SampleState) -> None:
        """Check the state's tensors once, when it is bound or moved (not on every step)."""

    # ---- the loss ops --------------------------------------------------------------------------
    def step_impl(self, logits: torch.Tensor, target: torch.Tensor) -> str:
        """The implementation that computes this target form on this device."""
        if self.step_forms is ALL_FORMS:
            return self.impl
        return self.impl if target_form(logits, target) in self.step_forms else "reference"

    def observe_impl(self, losses: torch.Tensor) -> str:
        return self.impl if losses.device.type in self.observe_devices else "reference"

    def step(self, logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig, epoch: Union[int, torch.Tensor] = 0,
             update: bool = True, rows: Optional[EpochRows] = None) -> torch.Tensor:
        """The fused cross-entropy over any ``F.cross_entropy`` target, policy weights applied;
        with ``update`` each sample's observation is folded into ``state``; ``rows``: the
        epoch's rows (None: every row counts)."""
        return ops.ce_step(self.step_impl(logits, target), logits, target, indices,
                           state_args(state, epoch, rows), cfg, update)

    def observe(self, losses: torch.Tensor, indices: torch.Tensor, state: SampleState,
                cfg: LossConfig, epoch: Union[int, torch.Tensor] = 0,
                probs: Optional[torch.Tensor] = None, update: bool = True,
                rows: Optional[EpochRows] = None) -> torch.Tensor:
        """Per-sample losses of any loss into ``state``; the policy-weighted reduction."""
        return ops.observe(self.observe_impl(losses), losses, probs, indices,
                           state_args(state, epoch, rows), cfg, update)

    # ---- the selection pass --------------------------------------------------------------------
    def select(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys, in rank order: +inf > finite > -inf > NaN, equal keys
        (-0 == +0) to the lower index."""
        keys = keys.detach().reshape(-1).float().contiguous()
        return self.op("select")(keys, check_k(k, keys.numel()))

    def uniform(self, idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
        """The counter-based uniforms of ``fastsel.rng.uniform``, bit for bit."""
        flat = idx.reshape(-1).contiguous()
        return self.op("uniform")(flat, int(key), int(stream)).reshape(idx.shape)

    def shuffle(self, chosen: torch.Tensor, key: int) -> torch.Tensor:
        """``chosen`` reordered by its ``STREAM_SHUFFLE`` uniforms: the same on every device."""
        return self.op("shuffle")(chosen.contiguous(), int(key))
