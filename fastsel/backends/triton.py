"""The Triton backend: the op family's ``triton`` implementation (kernels in ``fastsel/kernels/``).

Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (tests), which ``"auto"`` never
picks. Triton is imported when a kernel is first needed, so ``import fastsel`` never needs it.

``ce_step_triton`` computes class-index targets of 2-D logits in two launches: the rows
kernel, then the duplicate merge, state fold and reduction (``fastsel.kernels.merge`` has
the design: a per-state int32 count scratch left at zero, owner election by compare-and-
swap, float64 group sums by atomics, the last program finishing the totals); other target
forms run on the ``reference`` op. ``observe_triton`` builds the same per-row arrays with
one small kernel and reuses the merge. Which rows count (``fastsel.ops``: the room and
membership checks of an update call given its epoch's ``member`` and ``rows``, and the
``ROW_*`` counts) is decided inside the same two launches, on the device; ``last_epoch``
comes from the 0-d ``epoch`` tensor, read by the merge kernel. No host sync unless
``strict`` (which checks room, membership, indices and labels first, before any launch,
with the reference's messages). Every call's metadata is checked first, by
``fastsel.validation.tensors`` (the faults and words of every implementation). The
gradient is returned unscaled by the reduction, with its scale (a 0-d device tensor) beside it; the autograd formula is
``fastsel.ops``'s. ``select_triton`` is a four-launch radix threshold select
(``fastsel.kernels.select``) and a stable sort of the winners' 32-bit keys for the rank
order, or the in-batch top-k up to ``BATCH_TOPK_MAX`` keys.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import weakref
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

import torch

from .. import layout, ops, rng
from ..rows import admit_rows
from ..validation.tensors import check_ce_step_call, check_observe_call
from .base import HARD_2D, Backend, check_k


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (read when they are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def load_kernels(name: str) -> ModuleType:
    """``fastsel.kernels.<name>``, imported on first use (it imports Triton)."""
    return importlib.import_module(f"fastsel.kernels.{name}")


def _configs() -> ModuleType:
    return load_kernels("configs")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _device_guard(device: torch.device) -> Any:
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---- the ops ---------------------------------------------------------------------------------

#: Per-state merge scratch (``kernels/merge.py``): int32, N + 2 entries, all zero between
#: steps. Keyed by the state's ``seen`` buffer (device, address, N); entries whose buffer
#: was freed are dropped when a new one is made (a buffer reallocated at the same address
#: reuses the zeroed scratch, which is correct for any state of that N).
_MERGE_SCRATCH: Dict[Tuple[str, int, int], Tuple[Any, torch.Tensor]] = {}


def merge_scratch(s_seen: torch.Tensor, n: int) -> torch.Tensor:
    """The zeroed duplicate-count scratch of the state whose ``seen`` buffer is ``s_seen``
    (made once per state: the only fill launch, on its first step)."""
    key = (str(s_seen.device), s_seen.data_ptr(), n)
    hit = _MERGE_SCRATCH.get(key)
    if hit is not None:
        if hit[0]() is not s_seen:
            _MERGE_SCRATCH[key] = (weakref.ref(s_seen), hit[1])
        return hit[1]
    for k in [k for k, (ref, _) in _MERGE_SCRATCH.items() if ref() is None]:
        del _MERGE_SCRATCH[k]
    t = torch.zeros(n + 2, dtype=torch.int32, device=s_seen.device)
    _MERGE_SCRATCH[key] = (weakref.ref(s_seen), t)
    return t


class _Workspace:
    """Every per-call buffer of a step or observe in ONE allocation (launch-bound steps):
    float64 group sums (2B) and per-program partials; float32 per-row loss, p_true, output,
    class weight (4B), the sum and ``spare`` scalars; int32 flags (B) and group arrivals and
    counts (2B). ``out`` is a tensor of its own (a custom op's outputs may not share
    storage); under reduction "none" it is ``per_row`` and ``total`` (the sum) is scratch."""

    def __init__(self, b: int, dev: torch.device, per_elem: bool, spare: int, nprog: int,
                 p_stride: int) -> None:
        nb = max(1, b)
        n64 = 2 * nb + nprog * p_stride
        n32 = 4 * nb + 1 + spare          # float32 entries
        ni = 3 * nb                       # int32 entries
        ws = torch.empty(n64 + (n32 + ni + 1) // 2, dtype=torch.float64, device=dev)
        self.acc = ws[:2 * nb]
        self.part = ws[2 * nb:n64]
        w32 = ws[n64:].view(torch.float32)
        self.loss, self.p_true, self.per_row, self.wy = (w32[i * nb:(i + 1) * nb] for i in range(4))
        self.total = w32[4 * nb]
        self.spare = w32[4 * nb + 1:n32]
        i32 = w32[n32:n32 + ni].view(torch.int32)
        self.flags = i32[:nb]
        self.grp = i32[nb:3 * nb]
        if per_elem:
            self.per_row = self.out = torch.empty(b, dtype=torch.float32, device=dev)
        else:
            self.out = self.total = torch.empty((), dtype=torch.float32, device=dev)


def _merge_grid(b: int) -> Tuple[int, int, int, int]:
    """(programs, BLOCK, PBLOCK, num_warps) of ``merge_update_kernel``: a grid over the rows."""
    blk, pblk, warps = _configs().merge_blocks(b, interpreting())
    return _cdiv(max(1, b), blk), blk, pblk, warps


def _row_args(w: _Workspace, member: Optional[torch.Tensor], rows: Optional[torch.Tensor],
              errors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(member, rows) for the kernels: without them, views of buffers of the same dtypes
    that the kernels never read (``check`` 0), so no other specialisation compiles."""
    if rows is None:
        return w.flags.view(torch.uint8), errors
    return member, rows  # type: ignore[return-value]


def _merge_update(ks: ModuleType, w: _Workspace, indices, labels, state, dup, scale,
                  rows: torch.Tensor, epoch: torch.Tensor, b: int, n: int, nprog: int, blk: int,
                  pblk: int, warps: int, ema: float, reduction: int, safe_mean: bool,
                  update: bool, check: bool) -> None:
    """The second launch: the duplicate merge and state fold of every observed row, the
    batch totals and the reduction into ``w.total`` and ``scale``, and (``check``) the
    row counters in ``rows``."""
    s_loss, s_var, s_p, s_seen, s_last, _, stats, errors = state
    ks.merge_update_kernel[(nprog,)](
        w.flags, indices, labels, w.loss, w.p_true, w.per_row, w.wy, s_loss, s_var, s_p, s_seen,
        s_last, stats, errors, w.total, scale, dup, w.acc, w.grp, w.part, rows, epoch,
        b, n, ema, 1.0 - ema, int(bool(update)), reduction, int(safe_mean), int(check),
        BLOCK=blk, PBLOCK=pblk, num_warps=warps, enable_fp_fusion=False)


def _strict_check(indices: torch.Tensor, labels: Optional[torch.Tensor], n: int,
                  c: Optional[int], ignore_index: int, member: Optional[torch.Tensor],
                  rows: Optional[torch.Tensor], epoch: torch.Tensor, update: bool) -> None:
    """Strict mode: raise the reference's ValueError for a call refused for room or a stray
    row, then its IndexError for a bad index or label, before any launch (so nothing is
    written and the merge scratch stays zero): the reference's own checks, so the same
    order and messages. Host syncs."""
    from .reference import check_or_record
    bad_index = (indices < 0) | (indices >= n)
    _, bad_index, _ = admit_rows(indices, bad_index, n, member, rows, epoch, True, update)
    bad_label = None
    if labels is not None:
        bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= c))
    check_or_record(indices.new_zeros(layout.ERR_SIZE, dtype=torch.int64), n, c, indices,
                    bad_index, labels, bad_label, True)


def ce_step(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor,
            errors: torch.Tensor, member: Optional[torch.Tensor], rows: Optional[torch.Tensor],
            epoch: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: int,
            label_smoothing: float, ema: float, reduction: int, strict: bool, update: bool,
            need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastsel::ce_step_triton``: class-index targets of 2-D logits in two launches; other
    target forms on ``fastsel::ce_step_reference``. Returns (out, gradient unscaled by the
    reduction, its 0-d scale)."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    n = check_ce_step_call(logits, target, indices, state, member, rows, epoch, class_weight,
                           label_smoothing, ema, reduction)
    if logits.dim() != 2 or target.is_floating_point():
        from . import reference  # noqa: F401  (registers the reference ops)
        return ops.get("ce_step", "reference")(
            logits, target, indices, *state, member, rows, epoch, class_weight, ignore_index,
            label_smoothing, ema, reduction, strict, update, need_grad)
    dev = logits.device
    b, c = logits.shape
    check = rows is not None and bool(update)

    ks = load_kernels("cross_entropy")
    cf = _configs()
    x, cw = logits, class_weight   # checked: contiguous, class_weight float32
    eps = float(label_smoothing)
    per_elem = reduction == layout.REDUCTION_NONE
    nb = max(1, b)
    with _device_guard(dev):
        if strict:
            _strict_check(indices, target, n, c, int(ignore_index), member, rows, epoch,
                          bool(update))
        nprog, blk, pblk, mwarps = _merge_grid(b)
        w = _Workspace(b, dev, per_elem, 0, nprog, cf.MERGE_PARTIALS)
        k_member, k_rows = _row_args(w, member, rows, errors)
        dup = merge_scratch(s_seen, n)
        scale = torch.empty((), dtype=torch.float32, device=dev)
        grad = torch.empty((b, c), dtype=x.dtype, device=dev) if need_grad else x.new_empty((0,))
        br, bc, single, warps = cf.step_blocks(c, b, interpreting())
        ks.ce_step_kernel[(_cdiv(nb, br),)](
            x, x.stride(0), target, indices, s_weight, cw if cw is not None else w.loss,
            w.loss, w.p_true, w.per_row, w.wy, w.flags, grad if need_grad else w.loss,
            dup, w.acc, w.grp, k_member, k_rows, b, c, n, int(ignore_index), eps, 1.0 - eps,
            int(bool(update)), int(check),
            HAS_CW=cw is not None, SMOOTH=eps != 0.0, WRITE_GRAD=bool(need_grad),
            BLOCK_R=br, BLOCK_C=bc, SINGLE=single, num_warps=warps)
        _merge_update(load_kernels("merge"), w, indices, target, state, dup, scale, k_rows,
                      epoch, b, n, nprog, blk, pblk, mwarps, float(ema), int(reduction), False,
                      bool(update), check)
    return w.out, grad, scale


def observe(losses: torch.Tensor, probs: Optional[torch.Tensor], indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor,
            errors: torch.Tensor, member: Optional[torch.Tensor], rows: Optional[torch.Tensor],
            epoch: torch.Tensor, ema: float, reduction: int, strict: bool,
            update: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fastsel::observe_triton``: per-row arrays by ``observe_rows_kernel``, then the step's
    ``merge_update_kernel``. Returns (out, d(out)/d(losses) per row)."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    n = check_observe_call(losses, probs, indices, state, member, rows, epoch, ema, reduction)
    dev = losses.device
    b = losses.shape[0]
    check = rows is not None and bool(update)

    ks = load_kernels("observe")
    cf = _configs()
    per_elem = reduction == layout.REDUCTION_NONE
    nb = max(1, b)
    with _device_guard(dev):
        if strict:
            _strict_check(indices, None, n, None, 0, member, rows, epoch, bool(update))
        nprog, blk, pblk, mwarps = _merge_grid(b)
        w = _Workspace(b, dev, per_elem, 1, nprog, cf.MERGE_PARTIALS)
        k_member, k_rows = _row_args(w, member, rows, errors)
        dup = merge_scratch(s_seen, n)
        inv = w.spare[0]                      # 1/(active rows) under "mean", else 1
        row_scale = torch.empty(b, dtype=torch.float32, device=dev)
        oblk, warps = cf.observe_blocks(b, interpreting())
        ks.observe_rows_kernel[(_cdiv(nb, oblk),)](
            losses, probs if probs is not None else losses, indices, s_weight,
            w.loss, w.p_true, w.per_row, w.wy, w.flags, row_scale, dup, w.acc, w.grp, k_member,
            k_rows, b, n, int(bool(update)), int(check), HAS_PROBS=probs is not None,
            BLOCK=oblk, num_warps=warps)
        _merge_update(load_kernels("merge"), w, indices, indices, state, dup, inv, k_rows,
                      epoch, b, n, nprog, blk, pblk, mwarps, float(ema), int(reduction), True,
                      bool(update), check)
        if reduction == layout.REDUCTION_MEAN:
            row_scale.mul_(inv)
    return w.out, row_scale


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


def scale_grad(grad: torch.Tensor, g_out: torch.Tensor, scale: torch.Tensor,
               per_row: bool) -> torch.Tensor:
    """The ce_step backward ``grad * (g_out * scale)`` in one launch (``scale_grad_kernel``),
    bit-identical to ``fastsel.ops``' formula, which takes two (``g_out * scale``, then the
    product) because grad_output is a device tensor. For an autograd hook in ``fastsel.ops``."""
    ks = load_kernels("scale_grad")
    cf = _configs()
    out = torch.empty_like(grad)
    c = grad.shape[1]
    if out.numel() == 0:
        return out
    g = g_out.reshape(-1) if per_row else g_out.reshape(())
    if g.dtype != torch.float32:   # the formula's g_out.to(float32)
        g = g.to(torch.float32)
    blk, warps = cf.scale_blocks(interpreting())
    with _device_guard(grad.device):
        ks.scale_grad_kernel[(_cdiv(out.numel(), blk),)](
            grad.contiguous(), g, g.stride(0) if per_row else 0, scale, out, out.numel(), c,
            PER_ROW=bool(per_row), BLOCK=blk, num_warps=warps)
    return out


#: Selection scratch per (device, stream): int64 ``ctrl`` (8), int32 histogram (2048 bins),
#: int64 look-back statuses (one per compaction block). The kernels leave all of it zero.
_SELECT_SCRATCH: Dict[Tuple[str, int], torch.Tensor] = {}


def select_scratch(dev: torch.device, blocks: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ctrl, hist, status) for a select of ``blocks`` compaction blocks on the current
    stream of ``dev``: zeroed once (grown when more blocks are needed), no fill per call."""
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    key = (str(dev), stream)
    bins = _configs().RADIX_BINS
    size = 8 + bins // 2 + blocks
    t = _SELECT_SCRATCH.get(key)
    if t is None or t.numel() < size:
        t = _SELECT_SCRATCH[key] = torch.zeros(max(size, 8 + bins // 2 + 64), dtype=torch.int64,
                                               device=dev)
    return t[:8], t[8:8 + bins // 2].view(torch.int32), t[8 + bins // 2:]


def select_radix(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The radix threshold select of float32 ``keys`` (any N), k in [0, len(keys)]: four
    launches give the winners in index order with their keys; a stable sort of their 32-bit
    keys gives the rank order."""
    ks = load_kernels("select")
    cf = _configs()
    n, dev = keys.numel(), keys.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if n > cf.SELECT_MAX_N:  # the compaction's status words hold 30-bit counts
        from . import reference
        return reference.select(keys, k)
    blk, warps, cand_progs = cf.select_blocks(interpreting())
    grid = _cdiv(n, blk)
    with _device_guard(dev):
        ctrl, hist, status = select_scratch(dev, grid)
        cand = torch.empty(n, dtype=torch.int32, device=dev)
        out_idx = torch.empty(k, dtype=torch.int64, device=dev)
        out_key = torch.empty(k, dtype=torch.int32, device=dev)
        ks.radix_first_kernel[(grid,)](keys, n, k, ctrl, hist, BLOCK=blk, num_warps=warps)
        ks.radix_filter_kernel[(grid,)](keys, n, ctrl, hist, cand, BLOCK=blk, num_warps=warps)
        ks.radix_cand_kernel[(min(grid, cand_progs),)](keys, ctrl, hist, cand, BLOCK=blk,
                                                        num_warps=warps)
        ks.select_compact_kernel[(grid,)](keys, n, ctrl, status, out_idx, out_key, BLOCK=blk,
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
ops.register_scale_grad("triton", scale_grad, _DEVICES)   # the backward in one launch


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
