"""Argument checks shared by every backend: clear errors that name the argument and value.

Only metadata (shapes, dtypes, devices) is checked here, which costs no host sync; value
checks (index and label ranges) are the backends' job, strict or deferred.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import LossConfig
from ..layout import ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE

_INT_DTYPES = (torch.int64, torch.int32)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_indices(indices: torch.Tensor, b: int, device: torch.device, rows: str) -> None:
    shape = indices.shape
    if len(shape) != 1:
        raise ValueError(f"indices must be 1-D [batch], got shape {tuple(shape)}")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"indices must be int64 or int32, got dtype {indices.dtype}")
    if shape[0] != b:
        raise ValueError(f"indices has {indices.shape[0]} entries but {rows} has {b} rows: "
                         "lengths must match")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but {rows} is on {device}")


def check_step_args(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
                    cfg: LossConfig) -> None:
    """Refuse wrong shapes, dtypes and devices before anything is computed or written.

    ``target`` is what ``F.cross_entropy`` takes: class indices [B, d1..dk] for logits
    [B, C, d1..dk], or class probabilities of the logits' shape.
    """
    if not (isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)
            and isinstance(indices, torch.Tensor)):
        for name, t in (("logits", logits), ("target", target), ("indices", indices)):
            _check_tensor(name, t)
    shape = logits.shape   # read once: each read of a tensor's metadata costs a call
    if len(shape) < 2:
        raise ValueError(f"logits must be [batch, classes] or [batch, classes, d1, ..., dk], "
                         f"got shape {tuple(shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got dtype {logits.dtype}")
    if shape[1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(shape)}")
    b = shape[0]
    tshape = target.shape
    if target.is_floating_point():
        if tshape != shape:
            raise ValueError(f"target holds class probabilities (dtype {target.dtype}), so it must "
                             f"have the logits' shape {tuple(shape)}, got {tuple(tshape)}; "
                             "class indices must be an integer tensor")
    else:
        if target.dtype not in _INT_DTYPES:
            raise TypeError(f"target must be int64 or int32 class indices or floating class "
                            f"probabilities, got dtype {target.dtype}")
        if len(tshape) != len(shape) - 1 or tshape[0] != b or tshape[1:] != shape[2:]:
            hard_shape = (b,) + tuple(shape[2:])
            raise ValueError(f"target of class indices must have shape {hard_shape} for logits of "
                             f"shape {tuple(shape)}, got {tuple(tshape)}")
    device = logits.device
    if target.device != device:
        raise ValueError(f"target is on {target.device} but logits is on {device}")
    _check_indices(indices, b, device, "logits")
    w = cfg.class_weight
    if w is not None and (w.shape[0] != shape[1] or w.device != device):
        raise ValueError(
            f"class_weight must have {shape[1]} entries on {device}, "
            f"got {w.shape[0]} on {w.device}")


def check_observe_args(losses: torch.Tensor, indices: torch.Tensor,
                       p_true: Optional[torch.Tensor]) -> None:
    """Refuse per-sample losses that are not a floating [B] tensor matching ``indices``."""
    _check_tensor("losses", losses)
    _check_tensor("indices", indices)
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D [batch] (one loss per sample: reduce other dims "
                         f"first, e.g. .flatten(1).mean(1)), got shape {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be a floating dtype, got dtype {losses.dtype}")
    _check_indices(indices, losses.shape[0], losses.device, "losses")
    if p_true is not None:
        _check_tensor("p_true", p_true)
        if p_true.shape != losses.shape or not p_true.is_floating_point() or p_true.device != losses.device:
            raise ValueError(f"p_true must be a floating tensor of the losses' shape "
                             f"{tuple(losses.shape)} on {losses.device}, got {p_true.dtype} "
                             f"{tuple(p_true.shape)} on {p_true.device}")


def raise_for_errors(errors: torch.Tensor, n: int, num_classes: int | None = None) -> None:
    """Turn the (host) error counters into the same exception strict mode raises."""
    errs = [int(v) for v in errors.tolist()]
    if errs[ERR_INDEX_COUNT]:
        raise IndexError(
            f"indices: {errs[ERR_INDEX_COUNT]} sample index(es) outside [0, {n}), e.g. "
            f"{errs[ERR_INDEX_VALUE]}; those rows were left out of the per-sample state")
    if errs[ERR_LABEL_COUNT]:
        rng = f"[0, {num_classes})" if num_classes is not None else "[0, C)"
        raise IndexError(
            f"labels: {errs[ERR_LABEL_COUNT]} label(s) outside {rng} and not ignore_index, "
            f"e.g. {errs[ERR_LABEL_VALUE]}; those rows were left out of the per-sample state; if "
            f"{errs[ERR_LABEL_VALUE]} marks elements to ignore, pass "
            f"fastsel.Sampler(..., ignore_index={errs[ERR_LABEL_VALUE]})")
