"""The op family ``torch.ops.fastsel.*``: one schema per op, registered with ``torch.library``.

Every implementation (``reference``: PyTorch; ``csrc``: C++ on the CPU and CUDA in
``csrc/``; ``triton``: ``kernels/``) registers the same schema under its own suffix, e.g.
``fastsel::ce_step_csrc``, so a backend is a choice of suffix and nothing else. Fake
kernels and the autograd formula are registered here, once, for every implementation;
``torch.compile`` then sees each op as one opaque node whose mutated state is declared.

Ops (``STATE`` is the per-sample buffers of ``layout.STEP_FIELDS``, the policy weights,
``stats`` and ``errors``; the state's size N is its buffers' length minus the scratch slot):

* ``ce_step(logits, target, indices, STATE, class_weight, ignore_index, label_smoothing,
  ema, reduction, strict, epoch, update, need_grad) -> (out, grad, grad_scale)``: the fused
  cross-entropy. ``logits`` [B, C, d1..dk]; ``target`` class indices [B, d1..dk] or class
  probabilities shaped like the logits. ``grad`` is d(out)/d(logits) up to ``grad_scale``
  (a 0-d float32: backward multiplies by ``grad_output * grad_scale``); empty unless
  ``need_grad``. With ``update`` it folds each sample's observation into the state.
* ``observe(losses, probs, indices, STATE, ema, reduction, strict, epoch, update)
  -> (out, row_scale)``: per-sample losses of any loss function into the state; ``out`` is
  the policy-weighted reduction, ``row_scale`` d(out)/d(losses) per row.
* ``select(keys, k) -> indices``, ``uniform(idx, key, stream) -> u``,
  ``shuffle(chosen, key) -> permuted``: the selection pass's parts.

A strict-mode range error is raised from inside the op (so it reaches the user under
``torch.compile`` too); otherwise bad rows are masked and counted in ``errors``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

from . import layout

NAMESPACE = "fastsel"
IMPLS = ("reference", "csrc", "triton")

_STATE = ", ".join(
    [f"Tensor({chr(ord('a') + i)}!) state_{f}" for i, f in enumerate(layout.STEP_FIELDS)]
    + ["Tensor state_weight", "Tensor(y!) stats", "Tensor(z!) errors"])

#: One schema per op, shared by every implementation.
SCHEMAS: Dict[str, str] = {
    "ce_step": (f"(Tensor logits, Tensor target, Tensor indices, {_STATE}, Tensor? class_weight, "
                "int ignore_index, float label_smoothing, float ema, int reduction, bool strict, "
                "int epoch, bool update, bool need_grad) -> (Tensor, Tensor, Tensor)"),
    "observe": (f"(Tensor losses, Tensor? probs, Tensor indices, {_STATE}, float ema, "
                "int reduction, bool strict, int epoch, bool update) -> (Tensor, Tensor)"),
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

def _ce_step_fake(logits, target, indices, *state_and_cfg):
    reduction, need_grad = state_and_cfg[-5], state_and_cfg[-1]
    shape = (logits.shape[0],) + tuple(logits.shape[2:]) if reduction == layout.REDUCTION_NONE else ()
    out = logits.new_empty(shape, dtype=torch.float32)
    grad = logits.new_empty(logits.shape if need_grad else (0,))
    return out, grad, logits.new_empty((), dtype=torch.float32)


def _observe_fake(losses, probs, indices, *state_and_cfg):
    reduction = state_and_cfg[-4]
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
    """Whether every ``t`` is a host scalar equal to 1, read only in plain eager mode (no
    sync: they are on the CPU)."""
    return _plain_eager() and all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dim() == 0
               and t.item() == 1.0 for t in ts)


def _ce_step_setup(ctx, inputs, output):
    ctx.per_row = inputs[-5] == layout.REDUCTION_NONE
    ctx.save_for_backward(output[1], output[2])


#: One-launch kernels of the ce_step backward ``grad * (g_out * scale)`` by impl, with the
#: device types they run on; used in plain eager mode (the formula below takes two launches).
_SCALE_GRAD: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {}


def register_scale_grad(impl: str, fn: Callable, device_types: Tuple[str, ...]) -> None:
    """Register ``fn(grad, g_out, scale, per_row)``, bit-identical to the backward formula."""
    _SCALE_GRAD[impl] = (fn, tuple(device_types))


def _ce_step_backward(ctx, g_out, _g_grad=None, _g_scale=None):
    grad, scale = ctx.saved_tensors
    n_in = 20
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
    ctx.per_row = inputs[-4] == layout.REDUCTION_NONE
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _observe_backward(ctx, g_out, _g_scale=None):
    if g_out is None:
        return (None,) * 16
    row_scale, = ctx.saved_tensors
    gi = (g_out.to(torch.float32) * row_scale).to(ctx.dtype)
    return (gi,) + (None,) * 15


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


def _define() -> None:
    for impl in IMPLS:
        for op, schema in SCHEMAS.items():
            _lib.define(f"{op}_{impl}{schema}")
            torch.library.register_fake(qualname(op, impl), _FAKES[op], lib=_lib)
        _register_autograd("ce_step", impl, _ce_step_backward, _ce_step_setup)
        _register_autograd("observe", impl, _observe_backward, _observe_setup)


_define()


def register_python(impl: str, kernels: Dict[str, Callable], device_types: Tuple[str, ...] | None) -> None:
    """Register Python kernels of ``impl`` (``None``: every device)."""
    for op, fn in kernels.items():
        torch.library.register_kernel(qualname(op, impl), device_types, fn, lib=_lib)
