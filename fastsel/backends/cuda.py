"""The CUDA backend: csrc/'s CUDA kernels (``fastsel._C`` built with CUDA).

The fused step writes the per-row gradient in the same pass as the loss; ``backward``
scales it by ``grad_output`` (and, for ``reduction="mean"``, by the divisor the step left
on the device), so no step needs a host synchronisation except strict mode's range check.
``unavailable()`` says in one line why the backend cannot run here.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import raise_for_errors
from ..config import LossConfig
from ..state import SampleState
from .cpu import _C, _IMPORT_ERROR, step_args


def _stream(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream)


class _FusedStep(torch.autograd.Function):
    """Forward: the fused CUDA step. Backward: the saved gradient scaled on the device."""

    @staticmethod
    def forward(ctx, logits, labels, indices, state, cfg, epoch):  # type: ignore[override]
        args = step_args(logits, labels, indices, state, cfg)
        need_grad = bool(ctx.needs_input_grad[0])
        out, grad, strict_errors, denom = _C.cuda_step(*args, int(epoch), need_grad, _stream(logits))
        if cfg.strict:
            errs = strict_errors.cpu()  # strict mode checks at once: one sync, as the reference's
            if int(errs[0]) + int(errs[2]) > 0:
                raise_for_errors(errs, state.n, logits.shape[1])
        ctx.save_for_backward(grad, denom)
        ctx.per_row = cfg.reduction == "none"
        ctx.mean = cfg.reduction == "mean"
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        saved, denom = ctx.saved_tensors
        g = g.to(torch.float32).contiguous()
        gi = _C.cuda_scale_grad(saved, g, ctx.per_row, denom if ctx.mean else None, _stream(g))
        return gi, None, None, None, None, None


class _NoGrad:
    """A stand-in ctx for running the forward alone (no graph: evaluation, no_grad)."""

    needs_input_grad = (False,)

    def save_for_backward(self, *tensors) -> None:
        pass


class CudaBackend:
    """The csrc/ CUDA implementation of the fused step and selection."""

    name = "cuda"
    devices = ("cuda",)

    def unavailable(self) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not getattr(_C, "with_cuda", False):
            return ("fastsel._C was built without CUDA (it needs a CUDA toolkit and a CUDA build "
                    "of torch at build time; FORCE_CUDA=1 builds without a visible GPU)")
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig, epoch: int) -> torch.Tensor:
        if torch.is_grad_enabled() and logits.requires_grad:
            return _FusedStep.apply(logits, labels, indices, state, cfg, epoch)
        return _FusedStep.forward(_NoGrad(), logits, labels, indices, state, cfg, epoch)

    def uniform(self, idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
        flat = idx.contiguous().reshape(-1)
        return _C.cuda_uniform(flat, int(key), int(stream), _stream(flat)).reshape(idx.shape)

    def select(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys, in rank order; ties go to the lower index; NaN ranks last."""
        keys = keys.float().contiguous().reshape(-1)
        n = keys.numel()
        k = int(k)
        k = max(0, n + k) if k < 0 else min(k, n)  # the reference's order[:k]
        return _C.cuda_select(keys, k, _stream(keys))

    def shuffle(self, chosen: torch.Tensor, key: int) -> torch.Tensor:
        """``chosen`` reordered by its ``STREAM_SHUFFLE`` uniforms, as the reference does."""
        return _C.cuda_shuffle(chosen.contiguous(), int(key), _stream(chosen))
