"""The CPU backend: the fused step and the selection pass in C++ (``fastsel._C``, csrc/).

Same results as ``reference`` on the same inputs. The step runs forward, the per-row
gradient and the state update in one call; an ``autograd.Function`` keeps that gradient
and ``backward`` only scales it by ``grad_output`` (returning it as is when that is 1).
If the extension cannot be imported, ``unavailable()`` says why in one line and
``"auto"`` falls back to ``reference``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..checks import raise_for_errors
from ..config import LossConfig
from ..state import SampleState

try:
    from .. import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"fastsel._C is not importable ({type(e).__name__}: {e}); build it with " \
                    "`pip install --no-build-isolation -e .`"

REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}


def step_args(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
              state: SampleState, cfg: LossConfig) -> Tuple:
    """The tensors and settings of one ``_C`` step call, in its argument order (shared by the
    CPU and CUDA backends). Non-contiguous inputs are made contiguous here."""
    buf = state.buffers()
    w = cfg.class_weight
    if w is not None:
        w = w.to(device=logits.device, dtype=torch.float32).contiguous()
    return (logits.contiguous(), labels.contiguous(), indices.contiguous(),
            buf["loss"], buf["loss_var"], buf["p_true"], buf["seen"], buf["last_epoch"],
            buf["weight"], state.stats, state.errors, w, state.n, int(cfg.ignore_index),
            float(cfg.label_smoothing), float(cfg.ema), REDUCTION_CODES[cfg.reduction],
            bool(cfg.strict))


def scale_grad(saved: torch.Tensor, g: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The saved d(loss)/d(logits) times grad_output (one value, or one per row)."""
    if per_row:
        return (saved.float() * g.to(torch.float32).unsqueeze(1)).to(saved.dtype)
    if g.device.type == "cpu" and float(g) == 1.0:
        return saved  # the usual loss.backward(): no copy (autograd copies before any write)
    return saved * g.to(torch.float32)


class _FusedStep(torch.autograd.Function):
    """Forward: the fused C++ step. Backward: the saved gradient scaled by grad_output."""

    @staticmethod
    def forward(ctx, logits, labels, indices, state, cfg, epoch, op):  # type: ignore[override]
        args = step_args(logits, labels, indices, state, cfg)
        need_grad = bool(ctx.needs_input_grad[0])
        out, grad, errs = op(*args, int(epoch), need_grad)
        if errs is not None:
            raise_for_errors(errs.cpu(), state.n, logits.shape[1])
        # Saved as a saved tensor, not an attribute: autograd frees it after backward (unless
        # retain_graph), so the gradient handed back can be stolen by AccumulateGrad uncopied.
        ctx.save_for_backward(grad)
        ctx.per_row = cfg.reduction == "none"
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        saved, = ctx.saved_tensors
        gi = scale_grad(saved, g, ctx.per_row)
        return gi, None, None, None, None, None, None


class CpuBackend:
    """The csrc/ C++ implementation of the fused step and selection, for CPU tensors."""

    name = "cpu"
    devices = ("cpu",)

    def unavailable(self) -> Optional[str]:
        return _IMPORT_ERROR

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig, epoch: int) -> torch.Tensor:
        if torch.is_grad_enabled() and logits.requires_grad:
            return _FusedStep.apply(logits, labels, indices, state, cfg, epoch, _C.step)
        # No graph to build (evaluation, no_grad): the same step without the gradient.
        out, _, errs = _C.step(*step_args(logits, labels, indices, state, cfg), int(epoch), False)
        if errs is not None:
            raise_for_errors(errs.cpu(), state.n, logits.shape[1])
        return out

    def uniform(self, idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
        return _C.uniform(idx.contiguous(), int(key), int(stream))

    def select(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys, in rank order; ties go to the lower index; NaN ranks last."""
        keys = keys.float().contiguous().reshape(-1)
        n = keys.numel()
        k = int(k)
        k = max(0, n + k) if k < 0 else min(k, n)  # the reference's order[:k]
        return _C.select(keys, k)

    def shuffle(self, chosen: torch.Tensor, key: int) -> torch.Tensor:
        """``chosen`` reordered by its ``STREAM_SHUFFLE`` uniforms, as the reference does."""
        return _C.shuffle(chosen.contiguous(), int(key))
