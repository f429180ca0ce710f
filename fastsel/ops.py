"""The op family ``torch.ops.fastsel.*``: one schema per op, registered with ``torch.library``.

Every implementation (``reference``: PyTorch; ``csrc``: C++ on the CPU and CUDA in
``csrc/``; ``triton``: ``fastsel/kernels/``) registers the same schema under its own suffix, e.g.
``fastsel::ce_step_csrc``, so a backend is a choice of suffix and nothing else. Fake
kernels and the autograd formula are registered here, once, for every implementation;
``torch.compile`` then sees each op as one opaque node whose mutated state is declared.

Ops (``STATE`` is the per-sample buffers of ``layout.STEP_FIELDS``, the policy weights,
``stats`` and ``errors``; the state's size N is its buffers' length minus the scratch slot;
``ROWS`` is ``member`` (uint8 [N + 1], the epoch's selection as a mask), ``rows`` (int64
[``layout.ROW_SIZE``], the epoch's row counters) and ``epoch`` (a 0-d int64 tensor on the
state's device, so a compiled graph stays valid across epochs):

* ``ce_step(logits, target, indices, STATE, ROWS, class_weight, ignore_index,
  label_smoothing, ema, reduction, strict, update, need_grad) -> (out, grad, grad_scale)``:
  the fused cross-entropy. ``logits`` [B, C, d1..dk]; ``target`` class indices [B, d1..dk] or
  class probabilities shaped like the logits. ``grad`` is d(out)/d(logits) up to
  ``grad_scale`` (a 0-d float32: backward multiplies by ``grad_output * grad_scale``); empty
  unless ``need_grad``. With ``update`` it folds each sample's observation into the state.
* ``observe(losses, probs, indices, STATE, ROWS, ema, reduction, strict, update)
  -> (out, row_scale)``: per-sample losses of any loss function into the state; ``out`` is
  the policy-weighted reduction, ``row_scale`` d(out)/d(losses) per row.
* ``select(keys, k) -> indices``, ``uniform(idx, key, stream) -> u``,
  ``shuffle(chosen, key) -> permuted``: the selection pass's parts.

Which rows count (an ``update`` call with ``rows``; ``member`` and ``rows`` are None
together, and then every row counts): in this order, each check before anything is written,

1. room: with no epoch in progress (``rows[ROW_SHARD] < 0``) or ``rows[ROW_TRAINED] + B``
   past ``rows[ROW_SHARD]``, the whole call is refused: strict raises ``rows.room_message``
   (ValueError); otherwise its rows are left out and ``ROW_OVER_*`` records it;
2. membership: a row whose index is in [0, N) with ``member[index] == 0`` is stray: strict
   raises ``rows.stray_message`` (ValueError); otherwise it is left out and ``ROW_STRAY_*``
   counts it;
3. ranges: an index outside [0, N) or a label outside [0, C) (not ``ignore_index``): strict
   raises ``checks.raise_for_errors``'s IndexError; otherwise left out and counted in
   ``errors``;
4. an admitted call adds B to ``rows[ROW_TRAINED]`` and 1 to ``rows[ROW_CALLS]``.

A row left out adds nothing to the loss, its gradient or the state. Strict errors are raised
from inside the op, so they reach the user under ``torch.compile`` too.
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from . import layout

if TYPE_CHECKING:
    from .config import LossConfig

NAMESPACE = "fastsel"
IMPLS = ("reference", "csrc", "triton")

_STATE = ", ".join(
    [f"Tensor({chr(ord('a') + i)}!) state_{f}" for i, f in enumerate(layout.STEP_FIELDS)]
    + ["Tensor state_weight", "Tensor(y!) stats", "Tensor(z!) errors", "Tensor? member",
       "Tensor(r!)? rows", "Tensor epoch"])

#: One schema per op, shared by every implementation.
SCHEMAS: Dict[str, str] = {
    "ce_step": (f"(Tensor logits, Tensor target, Tensor indices, {_STATE}, Tensor? class_weight, "
                "int ignore_index, float label_smoothing, float ema, int reduction, bool strict, "
                "bool update, bool need_grad) -> (Tensor, Tensor, Tensor)"),
    "observe": (f"(Tensor losses, Tensor? probs, Tensor indices, {_STATE}, float ema, "
                "int reduction, bool strict, bool update) -> (Tensor, Tensor)"),
    "select": "(Tensor keys, int k) -> Tensor",
    "uniform": "(Tensor idx, int key, int stream) -> Tensor",
    "shuffle": "(Tensor chosen, int key) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")


def qualname(op: str, impl: str) -> str:
    """``fastsel::<op>_<impl>``."""
    return f"{NAMESPACE}::{op}_{impl}"


def get(op: str, impl: str) -> Any:
    """The ``torch.ops`` overload packet of ``op`` for ``impl``."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{op}_{impl}")


# ---- fake (meta) kernels: shapes and dtypes only ---------------------------------------------

#: Positions counted from the end of each op's arguments (``SCHEMAS``).
CE_REDUCTION, CE_UPDATE = -4, -2
OBS_REDUCTION, OBS_UPDATE = -3, -1
#: Arguments of ce_step and observe: what the backward returns None for.
CE_NARGS, OBS_NARGS = 22, 18

#: Set once a loss op with ``update`` has been traced (its fake kernel ran): calls may then
#: run where the host counts nothing (a compiled graph), so the host reads the device's
#: row counters at its sync points (``EpochRows.settle``) instead of trusting its own.
traced_updates = False


def _ce_step_fake(logits, target, indices, *state_and_cfg):
    global traced_updates
    reduction, need_grad = state_and_cfg[CE_REDUCTION], state_and_cfg[-1]
    traced_updates = traced_updates or bool(state_and_cfg[CE_UPDATE])
    shape = (logits.shape[0],) + tuple(logits.shape[2:]) if reduction == layout.REDUCTION_NONE else ()
    out = logits.new_empty(shape, dtype=torch.float32)
    grad = logits.new_empty(logits.shape if need_grad else (0,))
    return out, grad, logits.new_empty((), dtype=torch.float32)


def _observe_fake(losses, probs, indices, *state_and_cfg):
    global traced_updates
    reduction = state_and_cfg[OBS_REDUCTION]
    traced_updates = traced_updates or bool(state_and_cfg[OBS_UPDATE])
    shape = tuple(losses.shape) if reduction == layout.REDUCTION_NONE else ()
    return (losses.new_empty(shape, dtype=torch.float32),
            losses.new_empty(losses.shape, dtype=torch.float32))


def _select_fake(keys, k):
    return keys.new_empty((k,), dtype=torch.int64)


def _uniform_fake(idx, key, stream):
    return idx.new_empty(idx.shape, dtype=torch.float32)


def _shuffle_fake(chosen, key):
    return torch.empty_like(chosen)


_FAKES: Dict[str, Callable] = {"ce_step": _ce_step_fake, "observe": _observe_fake,
                               "select": _select_fake, "uniform": _uniform_fake,
                               "shuffle": _shuffle_fake}


# ---- the autograd formulas, once for every implementation ------------------------------------

def _plain_eager() -> bool:
    """No compile, tracing, dispatch mode or functorch transform is active."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
                or torch._C._are_functorch_transforms_active())


def _eager_ones(*ts: torch.Tensor) -> bool:
    """Whether every ``t`` is a host float32 scalar equal to 1, read only in plain eager mode:
    straight from its memory (no sync, and no op dispatched, as ``item()`` would)."""
    return _plain_eager() and all(
        type(t) is torch.Tensor and t.device.type == "cpu" and t.dim() == 0 and t.dtype == torch.float32
        and not t.requires_grad and ctypes.c_float.from_address(t.data_ptr()).value == 1.0 for t in ts)


def _ce_step_setup(ctx, inputs, output):
    ctx.per_row = inputs[CE_REDUCTION] == layout.REDUCTION_NONE
    ctx.save_for_backward(output[1], output[2])


#: One-launch kernels of the ce_step backward ``grad * (g_out * scale)`` by impl, with the
#: device types they run on; used in plain eager mode (the formula below takes two launches).
_SCALE_GRAD: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {}


def register_scale_grad(impl: str, fn: Callable, device_types: Tuple[str, ...]) -> None:
    """Register ``fn(grad, g_out, scale, per_row)``, bit-identical to the backward formula."""
    _SCALE_GRAD[impl] = (fn, tuple(device_types))


def _ce_step_backward(ctx, g_out, _g_grad=None, _g_scale=None):
    grad, scale = ctx.saved_tensors
    n_in = CE_NARGS
    if g_out is None:
        return (None,) * n_in
    if not ctx.per_row and _eager_ones(g_out, scale):
        return (grad,) + (None,) * (n_in - 1)  # the usual loss.backward(): no copy
    fused = _SCALE_GRAD.get(ctx.impl)
    if fused is not None and grad.device.type in fused[1] and grad.dim() == 2 and _plain_eager():
        return (fused[0](grad, g_out, scale, ctx.per_row),) + (None,) * (n_in - 1)
    s = g_out.to(torch.float32) * scale
    if ctx.per_row:
        s = s.unsqueeze(1)
    gi = grad * s if grad.dtype == torch.float32 else (grad.to(torch.float32) * s).to(grad.dtype)
    return (gi,) + (None,) * (n_in - 1)


def _observe_setup(ctx, inputs, output):
    ctx.per_row = inputs[OBS_REDUCTION] == layout.REDUCTION_NONE
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _observe_backward(ctx, g_out, _g_scale=None):
    if g_out is None:
        return (None,) * OBS_NARGS
    row_scale, = ctx.saved_tensors
    gi = (g_out if g_out.dtype == torch.float32 else g_out.to(torch.float32)) * row_scale
    return (gi if gi.dtype == ctx.dtype else gi.to(ctx.dtype),) + (None,) * (OBS_NARGS - 1)


def _register_autograd(op: str, impl: str, backward: Callable, setup: Callable) -> None:
    """The autograd formula of ``op``, as a kernel at the Autograd key.

    ``torch.library.register_autograd`` takes only functional schemas; these ops also write
    the per-sample state, which never requires grad. Its generic kernel also re-reads the
    schema on every call (~0.16 ms for 20 arguments) and zero-fills the gradients of the
    outputs that have none; this one does neither.
    """
    overload = getattr(get(op, impl), "default")

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):  # type: ignore[override]
            ctx.set_materialize_grads(False)
            ctx.impl = impl
            with torch._C._AutoDispatchBelowAutograd():
                output = overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)
            setup(ctx, args, output)
            ctx.mark_non_differentiable(*output[1:])
            return output

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[override]
            return (None,) + tuple(backward(ctx, *grads))

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return _Fn.apply(keyset, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _lib.impl(f"{op}_{impl}", kernel, "Autograd", with_keyset=True)


#: Implementations whose autograd formula is the Python one here; ``csrc`` registers its
#: own in C++ (csrc/autograd.cpp), so no Python runs per call on ``cpu``/``cuda``.
PYTHON_AUTOGRAD = ("reference", "triton")


def _define() -> None:
    for impl in IMPLS:
        for op, schema in SCHEMAS.items():
            _lib.define(f"{op}_{impl}{schema}")
            torch.library.register_fake(qualname(op, impl), _FAKES[op], lib=_lib)
        if impl in PYTHON_AUTOGRAD:
            _register_autograd("ce_step", impl, _ce_step_backward, _ce_step_setup)
            _register_autograd("observe", impl, _observe_backward, _observe_setup)


_define()


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def ce_step(impl: str, logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
            state: Sequence[Optional[torch.Tensor]], cfg: "LossConfig", update: bool) -> torch.Tensor:
    """One fused loss call: ``fastsel::ce_step_<impl>`` on ``state`` (``state_args``'s
    tuple) with ``cfg``'s settings; returns the loss (the gradient is the op's backward)."""
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    w = cfg.class_weight
    return OVERLOADS[("ce_step", impl)](
        logits if logits.is_contiguous() else logits.contiguous(),
        target if target.is_contiguous() else target.contiguous(),
        indices if indices.is_contiguous() else indices.contiguous(), *state,
        w if w is None else cfg.weight_for(logits.device), cfg.ignore_index, cfg.label_smoothing,
        cfg.ema, cfg.reduction_code, cfg.strict, update, need_grad)[0]


def observe(impl: str, losses: torch.Tensor, probs: Optional[torch.Tensor], indices: torch.Tensor,
            state: Sequence[Optional[torch.Tensor]], cfg: "LossConfig", update: bool) -> torch.Tensor:
    """``fastsel::observe_<impl>``: per-sample losses of any loss into ``state``; returns
    their policy-weighted reduction."""
    return OVERLOADS[("observe", impl)](
        _dense(losses), None if probs is None else _dense(probs), _dense(indices), *state,
        cfg.ema, cfg.reduction_code, cfg.strict, update)[0]


#: ``(op, impl)`` -> the op's default overload, filled once at import (never changed
#: after, so a compiled caller's guards on it hold).
OVERLOADS: Dict[Tuple[str, str], Any] = {(op, impl): get(op, impl).default for impl in IMPLS for op in SCHEMAS}


def register_python(impl: str, kernels: Dict[str, Callable], device_types: Tuple[str, ...] | None) -> None:
    """Register Python kernels of ``impl`` (``None``: every device)."""
    for op, fn in kernels.items():
        torch.library.register_kernel(qualname(op, impl), device_types, fn, lib=_lib)
