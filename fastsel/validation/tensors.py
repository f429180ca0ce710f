"""The checks of a loss call's tensors: clear errors that name the argument, its value and
the fix, from the one table of faults (``fastsel.validation.faults``, which the C++ ops
raise from too).

* ``check_ce_step_call`` and ``check_observe_call``: every metadata fault of a direct op
  call (shapes, dtypes, devices, contiguity, settings, the state's tensors, the epoch's
  rows), run first by the ``reference`` and ``triton`` ops, in the order ``csrc`` checks;
* ``check_step_args`` and ``check_observe_args``: the Sampler's checks of what a user hands
  ``loss()``/``observe()``, the same faults in the same words (contiguity aside: the
  Sampler makes its tensors contiguous);
* ``raise_for_errors``: strict mode's range errors (IndexError).

Only metadata is read (no host sync), but for ``epoch_range``, read where the epoch
tensor is on the CPU.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch

from ..config import LossConfig
from ..layout import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,
                      ERR_SIZE, FIELDS, REDUCTION_MEAN, REDUCTION_NONE, ROW_SIZE, STAT_SIZE,
                      STEP_FIELDS)
from .faults import FAULTS

_INT_DTYPES = (torch.int64, torch.int32)
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EXCEPTIONS = {"TypeError": TypeError, "ValueError": ValueError}
_INT32 = (-2 ** 31, 2 ** 31 - 1)

#: The op schemas' state tensors: names, dtypes, and lengths (None: N + 1, as state_loss).
STATE_NAMES = tuple(f"state_{f}" for f in STEP_FIELDS) + ("state_weight", "stats", "errors")
_DT = dict(FIELDS)
STATE_DTYPES = tuple(getattr(torch, _DT[f]) for f in STEP_FIELDS + ("weight",)) + (
    torch.float64, torch.int64)
_STATE_LENGTHS = (None,) * 6 + (STAT_SIZE, ERR_SIZE)


def fault(which: str, /, **values: object) -> Exception:
    """The exception of fault ``which`` (``faults.FAULTS``), its template filled with
    ``values`` as text."""
    exc, text = FAULTS[which]
    return _EXCEPTIONS[exc](text.format(**values))


def _tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _contiguous(fault_name: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise fault(fault_name, name=name, strides=t.stride(), shape=tuple(t.shape))


def _logits(logits: torch.Tensor, dense: bool) -> torch.Size:
    shape = logits.shape   # read once: each read of a tensor's metadata costs a call
    if len(shape) < 2:
        raise fault("logits_dim", shape=tuple(shape))
    if logits.dtype not in _LOGIT_DTYPES:
        raise fault("logits_dtype", dtype=logits.dtype)
    if shape[1] < 1:
        raise fault("logits_classes", shape=tuple(shape))
    if dense:
        _contiguous("logits_contiguous", "logits", logits)
    return shape


def _target(target: torch.Tensor, shape: torch.Size, device: torch.device, dense: bool) -> None:
    tshape, dt = target.shape, target.dtype
    if target.is_floating_point():
        if dt not in _LOGIT_DTYPES:
            raise fault("target_dtype", dtype=dt)
        if tshape != shape:
            raise fault("target_probs_shape", dtype=dt, want=tuple(shape), shape=tuple(tshape))
    else:
        if dt not in _INT_DTYPES:
            raise fault("target_dtype", dtype=dt)
        if len(tshape) != len(shape) - 1 or tshape[0] != shape[0] or tshape[1:] != shape[2:]:
            raise fault("target_indices_shape", want=(shape[0],) + tuple(shape[2:]),
                        logits=tuple(shape), shape=tuple(tshape))
    if target.device != device:
        raise fault("target_device", device=target.device, want=device)
    if dense:
        _contiguous("target_contiguous", "target", target)


def _losses(losses: torch.Tensor, dense: bool) -> int:
    if losses.dim() != 1:
        raise fault("losses_dim", shape=tuple(losses.shape))
    if not losses.is_floating_point():
        raise fault("losses_dtype", dtype=losses.dtype)
    if dense:
        _contiguous("losses_contiguous", "losses", losses)
    return losses.shape[0]


def _probs(probs: torch.Tensor, b: int, device: torch.device, name: str, dense: bool) -> None:
    if not probs.is_floating_point():
        raise fault("probs_dtype", name=name, dtype=probs.dtype)
    if probs.shape != (b,):
        raise fault("probs_shape", name=name, want=(b,), shape=tuple(probs.shape))
    if probs.device != device:
        raise fault("probs_device", name=name, device=probs.device, want=device)
    if dense:
        _contiguous("probs_contiguous", name, probs)


def _indices(indices: torch.Tensor, b: int, device: torch.device, of: str, dense: bool) -> None:
    shape = indices.shape
    if len(shape) != 1:
        raise fault("indices_dim", shape=tuple(shape))
    if indices.dtype not in _INT_DTYPES:
        raise fault("indices_dtype", dtype=indices.dtype)
    if shape[0] != b:
        raise fault("indices_length", length=shape[0], of=of, batch=b)
    if indices.device != device:
        raise fault("indices_device", device=indices.device, of=of, want=device)
    if dense:
        _contiguous("indices_contiguous", "indices", indices)


def _class_weight(w: torch.Tensor, c: int, device: torch.device, dense: bool) -> None:
    if dense and w.dtype != torch.float32:
        raise fault("class_weight_dtype", dtype=w.dtype)
    if w.shape != (c,):
        raise fault("class_weight_shape", want=(c,), shape=tuple(w.shape))
    if w.device != device:
        raise fault("class_weight_device", device=w.device, want=device)
    if dense:
        _contiguous("class_weight_contiguous", "class_weight", w)


def _settings(label_smoothing: Optional[float], ema: float, reduction: int) -> None:
    if label_smoothing is not None and not 0.0 <= label_smoothing <= 1.0:
        raise fault("label_smoothing_range", value=repr(float(label_smoothing)))
    if not 0.0 < ema <= 1.0:
        raise fault("ema_range", value=repr(float(ema)))
    if not REDUCTION_MEAN <= reduction <= REDUCTION_NONE:
        raise fault("reduction_range", value=int(reduction))


def check_state(state: Sequence[torch.Tensor], device: torch.device, of: str) -> int:
    """The state's N (its buffers hold N + 1 entries, slot N the scratch): refuses a state
    the kernels would index out of bounds or off ``device`` (``of``'s, named in messages)."""
    first = state[0]
    if first.dim() != 1 or first.shape[0] < 2:
        raise fault("state_size", shape=tuple(first.shape))
    size = first.shape[0]
    for name, t, dt, length in zip(STATE_NAMES, state, STATE_DTYPES, _STATE_LENGTHS):
        if t.dtype != dt:
            raise fault("state_dtype", name=name, want=dt, dtype=t.dtype)
        if length is None:
            if t.shape != (size,):
                raise fault("state_length", name=name, length=size, shape=tuple(t.shape))
        elif t.shape != (length,):
            raise fault("state_vector_length", name=name, length=length, shape=tuple(t.shape))
        if t.device != device:
            raise fault("state_device", name=name, device=t.device, of=of, want=device)
        if not t.is_contiguous():
            raise fault("state_contiguous", name=name, strides=t.stride())
    return size - 1


def check_rows(member: Optional[torch.Tensor], rows: Optional[torch.Tensor], epoch: torch.Tensor,
               n: int, device: torch.device, of: str) -> bool:
    """Whether the call checks and counts its rows (``member`` and ``rows`` given, None
    together); refuses tensors the kernels would read out of bounds or off ``device``."""
    if (member is None) != (rows is None):
        raise fault("rows_together", member="None" if member is None else "given",
                    rows="None" if rows is None else "given")
    if member is not None:
        for name, t, dt, length in (("member", member, torch.uint8, n + 1),
                                    ("rows", rows, torch.int64, ROW_SIZE)):
            if t.dtype != dt:
                raise fault(f"{name}_dtype", dtype=t.dtype)
            if t.shape != (length,):
                raise fault(f"{name}_length", length=length, shape=tuple(t.shape))
            if t.device != device:
                raise fault("rows_device", name=name, device=t.device, of=of, want=device)
            if not t.is_contiguous():
                raise fault("rows_contiguous", name=name, strides=t.stride())
    if epoch.dtype != torch.int64:
        raise fault("epoch_dtype", dtype=epoch.dtype)
    if epoch.dim() != 0:
        raise fault("epoch_shape", shape=tuple(epoch.shape))
    if epoch.device != device:
        raise fault("epoch_device", device=epoch.device, of=of, want=device)
    if epoch.device.type == "cpu":   # read as C++ does: from memory, no op dispatched
        v = (ctypes.c_int64.from_address(epoch.data_ptr()).value if type(epoch) is torch.Tensor
             else int(epoch))
        if not _INT32[0] <= v <= _INT32[1]:
            raise fault("epoch_range", value=v)
    return member is not None


def check_ce_step_call(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
                       state: Sequence[torch.Tensor], member: Optional[torch.Tensor],
                       rows: Optional[torch.Tensor], epoch: torch.Tensor,
                       class_weight: Optional[torch.Tensor], label_smoothing: float, ema: float,
                       reduction: int) -> int:
    """Every metadata fault of a direct ``ce_step`` call, in ``faults.FAULTS``' order (as
    csrc/checks.cpp); returns the state's N."""
    shape = _logits(logits, True)
    device = logits.device
    _target(target, shape, device, True)
    _indices(indices, shape[0], device, "logits", True)
    if class_weight is not None:
        _class_weight(class_weight, shape[1], device, True)
    _settings(label_smoothing, ema, reduction)
    n = check_state(state, device, "logits")
    check_rows(member, rows, epoch, n, device, "logits")
    return n


def check_observe_call(losses: torch.Tensor, probs: Optional[torch.Tensor], indices: torch.Tensor,
                       state: Sequence[torch.Tensor], member: Optional[torch.Tensor],
                       rows: Optional[torch.Tensor], epoch: torch.Tensor, ema: float,
                       reduction: int) -> int:
    """Every metadata fault of a direct ``observe`` call, in ``faults.FAULTS``' order (as
    csrc/checks.cpp); returns the state's N."""
    b = _losses(losses, True)
    device = losses.device
    if probs is not None:
        _probs(probs, b, device, "probs", True)
    _indices(indices, b, device, "losses", True)
    _settings(None, ema, reduction)
    n = check_state(state, device, "losses")
    check_rows(member, rows, epoch, n, device, "losses")
    return n


def check_step_args(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
                    cfg: LossConfig) -> None:
    """The Sampler's check of ``loss()``'s tensors before anything is computed or written.

    ``target`` is what ``F.cross_entropy`` takes: class indices [B, d1..dk] for logits
    [B, C, d1..dk], or class probabilities of the logits' shape.
    """
    if not (isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)
            and isinstance(indices, torch.Tensor)):
        for name, t in (("logits", logits), ("target", target), ("indices", indices)):
            _tensor(name, t)
    shape = _logits(logits, False)
    device = logits.device
    _target(target, shape, device, False)
    _indices(indices, shape[0], device, "logits", False)
    if cfg.class_weight is not None:
        _class_weight(cfg.class_weight, shape[1], device, False)


def check_observe_args(losses: torch.Tensor, indices: torch.Tensor,
                       p_true: Optional[torch.Tensor]) -> None:
    """The Sampler's check of ``observe()``'s tensors: floating [B] losses (and p_true)
    matching ``indices``."""
    _tensor("losses", losses)
    _tensor("indices", indices)
    b = _losses(losses, False)
    if p_true is not None:
        _tensor("p_true", p_true)
        _probs(p_true, b, losses.device, "p_true", False)
    _indices(indices, b, losses.device, "losses", False)


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
