"""The Triton backend: the fused step and the selection pass as Triton kernels (``kernels/``).

Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (tests), which ``"auto"`` never
picks. Triton is imported when a kernel is first needed, so ``import fastsel`` never needs it.

A step is two launches (see ``fastsel.kernels.step`` for why the duplicate merge is a
second one; it also reduces the loss), and backward one scale of the stored gradient; no
host sync unless ``cfg.strict``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Tuple

import torch

from ..checks import raise_for_errors
from ..config import LossConfig
from ..state import SampleState
from .. import rng


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


class _FusedStep(torch.autograd.Function):
    """Forward runs the fused kernels; backward scales the gradient they already wrote."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, run: Callable) -> torch.Tensor:
        out, grad, scale = run()
        ctx.grad, ctx.scale = grad, scale
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Tuple[torch.Tensor, None]:
        grad, scale = ctx.grad, ctx.scale
        if scale is None:                      # reduction="none": one grad_output per row
            s = g.to(torch.float32)[:, None]
        elif scale == "sum":
            s = g.to(torch.float32)
        else:                                  # "mean": divide by the sum of class weights
            s = g.to(torch.float32) / scale
        if grad.dtype == torch.float32:
            return grad * s, None
        return (grad.to(torch.float32) * s).to(grad.dtype), None


class TritonBackend:
    """Fused step, selection pass and counter-based noise as Triton kernels."""

    name = "triton"
    auto_devices = ("cuda",)

    def __init__(self) -> None:
        self.devices = ("cuda", "cpu") if interpreting() else ("cuda",)

    def unavailable(self) -> str | None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return f"triton is not importable: {type(e).__name__}: {e}"
        return None

    # ---- the fused step -------------------------------------------------------------

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig, epoch: int) -> torch.Tensor:
        ks = load_kernels("step")
        cf = _configs()
        interp = interpreting()
        n = state.n
        b, c = logits.shape
        dev = logits.device
        x = logits.detach()
        if x.stride(1) != 1:
            x = x.contiguous()
        labels = labels.contiguous()
        indices = indices.contiguous()
        buf = state.buffers()
        need_grad = logits.requires_grad and torch.is_grad_enabled()
        eps = float(cfg.label_smoothing)
        cw = cfg.class_weight
        cw = cw.to(device=dev, dtype=torch.float32).contiguous() if cw is not None else None
        ema = float(cfg.ema)
        nb = max(1, b)

        def run():
            # One allocation for every per-row output and the reduction (launch-bound steps).
            ws = torch.empty(5 * nb + 3, dtype=torch.float32, device=dev)
            loss, p_true, per_row, wy = (ws[i * nb:(i + 1) * nb] for i in range(4))
            flags = ws[4 * nb:5 * nb].view(torch.int32)
            red = ws[5 * nb:]
            grad = torch.empty((b, c), dtype=x.dtype, device=dev) if need_grad else loss
            br, bc, single, warps = cf.step_blocks(c, b, interp)
            ks.ce_step_kernel[(_cdiv(nb, br),)](
                x, x.stride(0), labels, indices, buf["weight"], cw if cw is not None else loss,
                loss, p_true, per_row, wy, flags, grad,
                b, c, n, int(cfg.ignore_index), eps, 1.0 - eps,
                HAS_CW=cw is not None, SMOOTH=eps != 0.0, WRITE_GRAD=need_grad,
                BLOCK_R=br, BLOCK_C=bc, SINGLE=single, num_warps=warps)
            bi, bj, swarps = cf.state_blocks(b, interp)
            if cfg.strict:  # the totals program alone, into scratch: errors before any write
                errs = torch.zeros(4, dtype=torch.int64, device=dev)
                scratch = torch.zeros(3, dtype=torch.float64, device=dev)
                ks.state_update_kernel[(1,)](
                    flags, indices, labels, loss, p_true, per_row, wy, buf["loss"],
                    buf["loss_var"], buf["p_true"], buf["seen"], buf["last_epoch"], scratch, errs,
                    red, b, int(epoch), ema, 1.0 - ema, 0, BLOCK_I=bi, BLOCK_J=bj,
                    num_warps=swarps, enable_fp_fusion=False)
                errs = errs.cpu()
                if int(errs[0]) + int(errs[2]) > 0:
                    raise_for_errors(errs, n, c)
            nu = _cdiv(b, bi)
            ks.state_update_kernel[(nu + 1,)](
                flags, indices, labels, loss, p_true, per_row, wy, buf["loss"], buf["loss_var"],
                buf["p_true"], buf["seen"], buf["last_epoch"], state.stats, state.errors, red,
                b, int(epoch), ema, 1.0 - ema, nu, BLOCK_I=bi, BLOCK_J=bj, num_warps=swarps,
                enable_fp_fusion=False)
            if cfg.reduction == "none":
                return per_row[:b], grad, None
            if cfg.reduction == "sum":
                return red[0], grad, "sum"
            return red[2], grad, red[1]

        with _device_guard(dev):
            if need_grad:
                return _FusedStep.apply(logits, run)
            with torch.no_grad():
                return run()[0]

    # ---- selection ------------------------------------------------------------------

    def select(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys, in rank order; ties go to the lower index; NaN ranks last."""
        n = keys.numel()
        if n <= _configs().BATCH_TOPK_MAX:
            return self.topk_batch(keys, k)
        return self.select_radix(keys, k)

    def select_radix(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """``select`` by the radix threshold select, for any N (``select`` uses it above 8192)."""
        ks = load_kernels("select")
        cf = _configs()
        keys = keys.detach().reshape(-1).float().contiguous()
        n, dev = keys.numel(), keys.device
        k = max(0, min(int(k), n))
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

    def topk_batch(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """In-batch top-k (B <= 8192): indices of the k largest keys in rank order, ties by
        lower index, NaN last (as ``select``)."""
        ks = load_kernels("select")
        cf = _configs()
        keys = keys.detach().reshape(-1).float().contiguous()
        b, dev = keys.numel(), keys.device
        k = max(0, min(int(k), b))
        out = torch.empty(k, dtype=torch.int64, device=dev)
        if k == 0:
            return out
        if b > cf.BATCH_TOPK_MAX:
            raise ValueError(f"topk_batch takes at most {cf.BATCH_TOPK_MAX} keys, got {b}")
        bi, bj, warps = cf.topk_blocks(b, interpreting())
        with _device_guard(dev):
            ks.batch_topk_kernel[(_cdiv(b, bi),)](keys, b, k, out, BLOCK_I=bi, BLOCK_J=bj,
                                                  num_warps=warps)
        return out

    # ---- counter-based noise --------------------------------------------------------

    def uniform(self, idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
        kn = load_kernels("noise")
        cf = _configs()
        idx = idx.reshape(-1).contiguous()
        out = torch.empty(idx.numel(), dtype=torch.float32, device=idx.device)
        if idx.numel() == 0:
            return out
        base = rng.stream_base(key, stream)
        with _device_guard(idx.device):
            kn.uniform_kernel[(_cdiv(idx.numel(), cf.NOISE_BLOCK),)](
                idx, out, idx.numel(), base, BLOCK=cf.NOISE_BLOCK, num_warps=4)
        return out

    def shuffle(self, chosen: torch.Tensor, key: int) -> torch.Tensor:
        """A counter-based permutation of ``chosen``: the same on every device and rank."""
        u = self.uniform(chosen, key, rng.STREAM_SHUFFLE)
        return chosen[torch.sort(u, stable=True).indices]


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
