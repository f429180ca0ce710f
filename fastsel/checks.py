"""Argument checks shared by every backend: clear errors that name the argument and value.

Only metadata (shapes, dtypes, devices) is checked here, which costs no host sync; value
checks (index and label ranges) are the backends' job, strict or deferred.
"""
from __future__ import annotations

import torch

from .config import LossConfig
from .state import ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE

_INT_DTYPES = (torch.int64, torch.int32)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_step_args(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                    cfg: LossConfig) -> None:
    """Refuse wrong shapes, dtypes and devices before anything is computed or written."""
    for name, t in (("logits", logits), ("labels", labels), ("indices", indices)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, classes], got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    b = logits.shape[0]
    for name, t in (("labels", labels), ("indices", indices)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [batch], got shape {tuple(t.shape)}")
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must be int64 or int32, got dtype {t.dtype}")
        if t.shape[0] != b:
            raise ValueError(
                f"{name} has {t.shape[0]} entries but logits has {b} rows: lengths must match")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    w = cfg.class_weight
    if w is not None and (w.shape[0] != logits.shape[1] or w.device != logits.device):
        raise ValueError(
            f"class_weight must have {logits.shape[1]} entries on {logits.device}, "
            f"got {w.shape[0]} on {w.device}")


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
            f"e.g. {errs[ERR_LABEL_VALUE]}; those rows were left out of the per-sample state")
