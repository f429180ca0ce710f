"""The Triton backend: the op family's ``triton`` implementation (kernels in ``kernels/``).

Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (tests), which ``"auto"`` never
picks. Triton is imported when a kernel is first needed, so ``import fastsel`` never needs it.

``ce_step_triton`` computes class-index targets of 2-D logits in two launches (see
``fastsel.kernels.step`` for why the duplicate merge is a second one; it also reduces the
loss); other target forms run on the ``reference`` op. ``observe_triton`` builds the same
per-row arrays with one small kernel and reuses the step's state update. No host sync
unless ``strict``. The gradient is returned unscaled by the reduction, with its scale (a
0-d device tensor) beside it; the autograd formula is ``fastsel.ops``'s.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Tuple

import torch

from .. import layout, ops, rng
from ..checks import raise_for_errors
from .base import HARD_2D, Backend, check_k


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (read when they are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def load_kernels(name: str) -> ModuleType:
    """``fastsel.kernels.<name>``; in a source checkout that was not installed (where
    setuptools' ``package_dir`` mapping does not exist), ``kernels/`` is mapped by hand."""
    try:
        return importlib.import_module(f"fastsel.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("fastsel.kernels", f"fastsel.kernels.{name}"):
            raise
    root = Path(__file__).resolve().parents[2] / "kernels"
    if "fastsel.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastsel.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("fastsel.kernels (kernels/ not found)", name="fastsel.kernels")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastsel.kernels"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"fastsel.kernels.{name}")


def _configs() -> ModuleType:
    return load_kernels("configs")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _device_guard:
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""

    def __init__(self, device: torch.device) -> None:
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*a)


# ---- metadata checks of a direct op call (no sync; the kernels index with these sizes) -------

_INT = (torch.int32, torch.int64)
_LOGITS = (torch.float32, torch.float16, torch.bfloat16)
_STATE_NAMES = tuple(f"state_{f}" for f in layout.STEP_FIELDS) + ("state_weight", "stats", "errors")
_STATE_DTYPES = tuple(getattr(torch, dict(layout.FIELDS)[f]) for f in layout.STEP_FIELDS) + (
    getattr(torch, dict(layout.FIELDS)["weight"]), torch.float64, torch.int64)


def _check_state(state: Tuple[torch.Tensor, ...], device: torch.device) -> int:
    """The state's N (buffers hold N + 1 entries, slot N the scratch); refuses a state the
    kernels would index out of bounds. A few attribute reads per tensor, no sync."""
    first = state[0]
    if first.dim() != 1 or first.shape[0] < 2:
        raise ValueError(f"state_loss must be 1-D with N + 1 >= 2 entries (N samples and the "
                         f"scratch slot; pass the buffers of one SampleState, "
                         f"fastsel.backends.base.state_args), got shape {tuple(first.shape)}")
    size = first.shape[0]
    for t, dt, want in zip(state, _STATE_DTYPES, (size,) * 6 + (layout.STAT_SIZE, layout.ERR_SIZE)):
        if t.dtype != dt or t.shape != (want,) or t.device != device or not t.is_contiguous():
            name = _STATE_NAMES[[x is t for x in state].index(True)]
            raise ValueError(
                f"{name} must be a contiguous 1-D {dt} tensor of {want} entries on {device} "
                f"(pass the buffers of one SampleState, fastsel.backends.base.state_args), got "
                f"{t.dtype} of shape {tuple(t.shape)} on {t.device}")
    return size - 1


def _check_indices(indices: torch.Tensor, b: int, device: torch.device, rows: str) -> None:
    if indices.dtype not in _INT or tuple(indices.shape) != (b,) or indices.device != device:
        raise ValueError(f"indices must be an int64 or int32 tensor of shape ({b},) on {device}, "
                         f"one sample index per row of {rows}; got {indices.dtype} of shape "
                         f"{tuple(indices.shape)} on {indices.device}")


def _check_reduction(reduction: int) -> None:
    if reduction not in (layout.REDUCTION_MEAN, layout.REDUCTION_SUM, layout.REDUCTION_NONE):
        raise ValueError(f"reduction must be one of {dict(enumerate(layout.REDUCTIONS))} "
                         f"(fastsel.layout.REDUCTION_*), got reduction={reduction!r}")


# ---- the ops ---------------------------------------------------------------------------------

def _state_update(ks: ModuleType, flags, indices, labels, loss, p_true, per_row, wy, state,
                  out, scale, b: int, n: int, c: Optional[int], ema: float, reduction: int,
                  safe_mean: bool, strict: bool, epoch: int, update: bool) -> None:
    """The duplicate merge and state update of every observed row, the batch totals and the
    reduction into ``out`` and ``scale`` (``state_update_kernel``). Strict: the totals
    program alone first, errors into scratch, and raise on a bad row before any write."""
    cf = _configs()
    s_loss, s_var, s_p, s_seen, s_last, _, stats, errors = state
    dev = loss.device
    bi, bj, swarps = cf.state_blocks(b, interpreting())
    common = (b, int(epoch), ema, 1.0 - ema)
    if strict:
        errs = torch.zeros(layout.ERR_SIZE, dtype=torch.int64, device=dev)
        scratch = torch.zeros(layout.STAT_SIZE, dtype=torch.float64, device=dev)
        ks.state_update_kernel[(1,)](
            flags, indices, labels, loss, p_true, per_row, wy, s_loss, s_var, s_p, s_seen,
            s_last, scratch, errs, out, scale, *common, 0, 0, reduction, int(safe_mean),
            BLOCK_I=bi, BLOCK_J=bj, num_warps=swarps, enable_fp_fusion=False)
        host = errs.cpu()
        if int(host[layout.ERR_INDEX_COUNT]) + int(host[layout.ERR_LABEL_COUNT]) > 0:
            raise_for_errors(host, n, c)
        if not update:
            return
    nu = _cdiv(b, bi) if update else 0
    ks.state_update_kernel[(nu + 1,)](
        flags, indices, labels, loss, p_true, per_row, wy, s_loss, s_var, s_p, s_seen, s_last,
        stats, errors, out, scale, *common, nu, int(bool(update)), reduction, int(safe_mean),
        BLOCK_I=bi, BLOCK_J=bj, num_warps=swarps, enable_fp_fusion=False)


def _row_buffers(b: int, dev: torch.device, per_elem: bool, spare: int) -> Tuple[torch.Tensor, ...]:
    """The per-row arrays of a step or observe in one allocation (launch-bound steps):
    (loss, p_true, per_row, wy, flags, out, total, ``spare`` extra scalars). ``out`` is a
    tensor of its own (a custom op's outputs may not share storage); under reduction
    "none" it is ``per_row`` and ``total`` (the sum) is scratch."""
    nb = max(1, b)
    ws = torch.empty(5 * nb + 1 + spare, dtype=torch.float32, device=dev)
    loss, p_true, per_row, wy = (ws[i * nb:(i + 1) * nb] for i in range(4))
    flags = ws[4 * nb:5 * nb].view(torch.int32)
    if per_elem:
        per_row = out = torch.empty(b, dtype=torch.float32, device=dev)
        total = ws[5 * nb]
    else:
        out = total = torch.empty((), dtype=torch.float32, device=dev)
    return loss, p_true, per_row, wy, flags, out, total, ws[5 * nb + 1:]


def ce_step(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor,
            errors: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: int,
            label_smoothing: float, ema: float, reduction: int, strict: bool, epoch: int,
            update: bool, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastsel::ce_step_triton``: class-index targets of 2-D logits in two launches; other
    target forms on ``fastsel::ce_step_reference``. Returns (out, gradient unscaled by the
    reduction, its 0-d scale)."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    if logits.dim() != 2 or target.is_floating_point():
        from . import reference  # noqa: F401  (registers the reference ops)
        return ops.get("ce_step", "reference")(
            logits, target, indices, *state, class_weight, ignore_index, label_smoothing, ema,
            reduction, strict, epoch, update, need_grad)
    dev = logits.device
    b, c = logits.shape
    if logits.dtype not in _LOGITS or c < 1:
        raise ValueError(f"logits must be float32, float16 or bfloat16 with at least one class, "
                         f"got {logits.dtype} of shape {tuple(logits.shape)}")
    if target.dtype not in _INT or tuple(target.shape) != (b,) or target.device != dev:
        raise ValueError(f"target of class indices must be an int64 or int32 tensor of shape "
                         f"({b},) on {dev} for logits of shape {tuple(logits.shape)}; got "
                         f"{target.dtype} of shape {tuple(target.shape)} on {target.device}")
    _check_indices(indices, b, dev, "logits")
    if class_weight is not None and (class_weight.dim() != 1 or class_weight.shape[0] != c
                                     or class_weight.device != dev):
        raise ValueError(f"class_weight must be a 1-D tensor of {c} entries (one per class) on "
                         f"{dev}, got shape {tuple(class_weight.shape)} on {class_weight.device}")
    _check_reduction(reduction)
    n = _check_state(state, dev)

    ks = load_kernels("step")
    cf = _configs()
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    target, indices = target.contiguous(), indices.contiguous()
    cw = None if class_weight is None else class_weight.to(torch.float32).contiguous()
    eps = float(label_smoothing)
    per_elem = reduction == layout.REDUCTION_NONE
    nb = max(1, b)
    with _device_guard(dev):
        loss, p_true, per_row, wy, flags, out, total, _ = _row_buffers(b, dev, per_elem, 0)
        scale = torch.empty((), dtype=torch.float32, device=dev)
        grad = torch.empty((b, c), dtype=x.dtype, device=dev) if need_grad else x.new_empty((0,))
        br, bc, single, warps = cf.step_blocks(c, b, interpreting())
        ks.ce_step_kernel[(_cdiv(nb, br),)](
            x, x.stride(0), target, indices, s_weight, cw if cw is not None else loss,
            loss, p_true, per_row, wy, flags, grad if need_grad else loss,
            b, c, n, int(ignore_index), eps, 1.0 - eps,
            HAS_CW=cw is not None, SMOOTH=eps != 0.0, WRITE_GRAD=bool(need_grad),
            BLOCK_R=br, BLOCK_C=bc, SINGLE=single, num_warps=warps)
        _state_update(ks, flags, indices, target, loss, p_true, per_row, wy, state, total, scale,
                      b, n, c, float(ema), int(reduction), False, bool(strict), epoch,
                      bool(update))
    return out, grad, scale


def observe(losses: torch.Tensor, probs: Optional[torch.Tensor], indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor,
            errors: torch.Tensor, ema: float, reduction: int, strict: bool, epoch: int,
            update: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fastsel::observe_triton``: per-row arrays by ``observe_rows_kernel``, then the step's
    ``state_update_kernel``. Returns (out, d(out)/d(losses) per row)."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    dev = losses.device
    if losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError(f"losses must be a 1-D floating tensor [batch] (one loss per sample), "
                         f"got {losses.dtype} of shape {tuple(losses.shape)}")
    b = losses.shape[0]
    if probs is not None and (not probs.is_floating_point() or probs.shape != losses.shape
                              or probs.device != dev):
        raise ValueError(f"probs must be None or a floating tensor of shape ({b},) on {dev} "
                         f"(each sample's probability of its true class), got {probs.dtype} "
                         f"of shape {tuple(probs.shape)} on {probs.device}")
    _check_indices(indices, b, dev, "losses")
    _check_reduction(reduction)
    n = _check_state(state, dev)

    ks = load_kernels("step")
    cf = _configs()
    losses, indices = losses.contiguous(), indices.contiguous()
    probs = None if probs is None else probs.contiguous()
    per_elem = reduction == layout.REDUCTION_NONE
    nb = max(1, b)
    with _device_guard(dev):
        loss, p_true, per_row, wy, flags, out, total, spare = _row_buffers(b, dev, per_elem, 1)
        inv = spare[0]                      # 1/(active rows) under "mean", else 1
        row_scale = torch.empty(b, dtype=torch.float32, device=dev)
        blk, warps = cf.observe_blocks(b, interpreting())
        ks.observe_rows_kernel[(_cdiv(nb, blk),)](
            losses, probs if probs is not None else losses, indices, s_weight,
            loss, p_true, per_row, wy, flags, row_scale, b, n,
            HAS_PROBS=probs is not None, BLOCK=blk, num_warps=warps)
        _state_update(ks, flags, indices, indices, loss, p_true, per_row, wy, state, total, inv,
                      b, n, None, float(ema), int(reduction), True, bool(strict), epoch,
                      bool(update))
        if reduction == layout.REDUCTION_MEAN:
            row_scale.mul_(inv)
    return out, row_scale


def topk_batch(keys: torch.Tensor, k: int) -> torch.Tensor:
    """In-batch top-k of float32 ``keys`` (at most ``BATCH_TOPK_MAX``), k in [0, len(keys)]."""
    ks = load_kernels("select")
    cf = _configs()
    b, dev = keys.numel(), keys.device
    out = torch.empty(k, dtype=torch.int64, device=dev)
    if k == 0:
        return out
    if b > cf.BATCH_TOPK_MAX:
        raise ValueError(f"topk_batch takes at most {cf.BATCH_TOPK_MAX} keys, got {b}; "
                         "use select_radix (or select) for more")
    bi, bj, warps = cf.topk_blocks(b, interpreting())
    with _device_guard(dev):
        ks.batch_topk_kernel[(_cdiv(b, bi),)](keys, b, k, out, BLOCK_I=bi, BLOCK_J=bj,
                                              num_warps=warps)
    return out


def select_radix(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The radix threshold select of float32 ``keys`` (any N), k in [0, len(keys)]."""
    ks = load_kernels("select")
    cf = _configs()
    n, dev = keys.numel(), keys.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    blk, warps = cf.SELECT_BLOCK, cf.SELECT_WARPS
    grid = _cdiv(n, blk)
    with _device_guard(dev):
        ctrl = torch.zeros(3, dtype=torch.int64, device=dev)  # prefix, mask, count left
        ctrl[2] = k
        hist = torch.zeros(256, dtype=torch.int32, device=dev)
        for shift in cf.RADIX_SHIFTS:
            ks.radix_hist_kernel[(grid,)](keys, n, ctrl, hist, SHIFT=shift, BLOCK=blk,
                                          num_warps=warps)
            ks.radix_pick_kernel[(1,)](ctrl, hist, SHIFT=shift, num_warps=4)
        gt = torch.empty(grid, dtype=torch.int64, device=dev)
        eq = torch.empty(grid, dtype=torch.int64, device=dev)
        ks.select_count_kernel[(grid,)](keys, n, ctrl, gt, eq, BLOCK=blk, num_warps=warps)
        ks.select_scan_kernel[(1,)](ctrl, gt, eq, grid, BLOCK=cf.SCAN_BLOCK, num_warps=4)
        out_idx = torch.empty(k, dtype=torch.int64, device=dev)
        out_key = torch.empty(k, dtype=torch.int64, device=dev)
        ks.select_write_kernel[(grid,)](keys, n, ctrl, eq, gt, out_idx, out_key, BLOCK=blk,
                                        num_warps=warps)
    # The k winners are in index order: a stable sort by key gives the rank order.
    order = torch.sort(out_key, descending=True, stable=True).indices
    return out_idx[order]


def _flat_keys(keys: torch.Tensor) -> torch.Tensor:
    keys = keys.detach().reshape(-1)
    return (keys if keys.dtype == torch.float32 else keys.float()).contiguous()


def select(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``fastsel::select_triton``: the in-batch top-k up to ``BATCH_TOPK_MAX`` keys, else the
    radix select; k in [0, N] (``Backend.select`` normalises it)."""
    flat = _flat_keys(keys)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the number of keys) for select_triton, got "
                         f"k={k}; clamp it first (fastsel.backends.base.check_k)")
    if n <= _configs().BATCH_TOPK_MAX:
        return topk_batch(flat, k)
    return select_radix(flat, k)


def uniform(idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """``fastsel::uniform_triton``: ``fastsel.rng.uniform``'s bits by ``uniform_kernel``."""
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor of sample indices, got dtype {idx.dtype}")
    kn = load_kernels("noise")
    cf = _configs()
    flat = idx.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), dtype=torch.float32, device=idx.device)
    if flat.numel():
        with _device_guard(idx.device):
            kn.uniform_kernel[(_cdiv(flat.numel(), cf.NOISE_BLOCK),)](
                flat, out, flat.numel(), rng.stream_base(int(key), int(stream)),
                BLOCK=cf.NOISE_BLOCK, num_warps=4)
    return out.reshape(idx.shape)


def shuffle(chosen: torch.Tensor, key: int) -> torch.Tensor:
    """``fastsel::shuffle_triton``: ``chosen`` ordered by its ``STREAM_SHUFFLE`` uniforms."""
    u = uniform(chosen, key, rng.STREAM_SHUFFLE)
    return chosen[torch.sort(u.reshape(-1), stable=True).indices]


_DEVICES: Tuple[str, ...] = ("cuda", "cpu") if interpreting() else ("cuda",)

ops.register_python("triton", {"ce_step": ce_step, "observe": observe, "select": select,
                               "uniform": uniform, "shuffle": shuffle}, _DEVICES)


class TritonBackend(Backend):
    """The ``triton`` ops: fused step, observe, selection pass and counter-based noise."""

    name = "triton"
    impl = "triton"
    devices = _DEVICES
    auto_devices = ("cuda",)
    step_forms = (HARD_2D,)
    observe_devices = _DEVICES

    def unavailable(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return f"triton is not importable: {type(e).__name__}: {e}"
        return None

    # The two selection paths, for tests and benchmarks (``select`` picks one by N).
    def select_radix(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """``select`` by the radix threshold select, for any N (``select`` uses it above
        ``BATCH_TOPK_MAX`` keys)."""
        flat = _flat_keys(keys)
        return select_radix(flat, check_k(k, flat.numel()))

    def topk_batch(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """``select`` by the in-batch top-k (at most ``BATCH_TOPK_MAX`` keys)."""
        flat = _flat_keys(keys)
        return topk_batch(flat, check_k(k, flat.numel()))
