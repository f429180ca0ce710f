"""Micro-benchmarks of the fused step and the selection, per backend, as ratios against the
plain-PyTorch way measured in the same run (``fastsel bench``; bench/ wraps the same code).

Times come from ``torch.utils.benchmark.Timer``, which synchronises CUDA and picks the
repeat count itself. Nothing here asserts a time.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from .backends import available, get_backend
from .config import LossConfig
from .state import SampleState

QUICK_STEP = [(256, 10), (1024, 100)]
FULL_STEP = [(b, c) for b in (256, 1024, 4096) for c in (10, 100, 1000)]
QUICK_SELECT = [50_000]
FULL_SELECT = [50_000, 1_280_000]


def _time(fn: Any, min_run_time: float) -> float:
    """Median seconds per call."""
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def plain_step(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, loss_ema: torch.Tensor,
               seen: torch.Tensor) -> None:
    """What a user writes without fastsel: per-sample CE, index updates, backward."""
    per = F.cross_entropy(logits.float(), labels, reduction="none")
    with torch.no_grad():
        loss_ema[idx] = 0.7 * loss_ema[idx] + 0.3 * per.detach()
        seen[idx] += 1
    per.mean().backward()


def step_case(backend: str, b: int, c: int, device: str = "cpu", n: int = 50_000,
              dtype: torch.dtype = torch.float32) -> Tuple[Callable[[], None], Callable[[], None], int]:
    """(fused, plain, logits bytes): the fused step (forward + backward + state update) and
    what a user writes without fastsel (``plain_step``), on the same random batch."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, device=device, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, c, (b,), device=device, generator=g)
    idx = torch.randint(0, n, (b,), device=device, generator=g)
    state = SampleState(n, device)
    be = get_backend(backend, device)
    cfg = LossConfig(strict=False)
    ema, seen = torch.zeros(n, device=device), torch.zeros(n, dtype=torch.int32, device=device)

    def fused() -> None:
        x.grad = None
        be.step(x, y, idx, state, cfg, 0).backward()

    def plain() -> None:
        x.grad = None
        plain_step(x, y, idx, ema, seen)

    return fused, plain, x.numel() * x.element_size()


def select_case(backend: str, n: int, device: str = "cpu", share: float = 0.3
                ) -> Tuple[Callable[[], Any], Callable[[], Any], int]:
    """(select, topk, k): the k = share·N largest keys (ties by index) and ``torch.topk``."""
    g = torch.Generator(device=device).manual_seed(0)
    keys = torch.rand(n, device=device, generator=g)
    k = max(1, int(n * share))
    be = get_backend(backend, device)
    return (lambda: be.select(keys, k)), (lambda: torch.topk(keys, k).indices), k


def bench_step(backend: str, b: int, c: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32, min_run_time: float = 0.3) -> Dict[str, Any]:
    fused, plain, nbytes = step_case(backend, b, c, device, dtype=dtype)
    t_fused, t_plain = _time(fused, min_run_time), _time(plain, min_run_time)
    return {"kind": "step", "backend": backend, "device": device, "B": b, "C": c, "dtype": str(dtype),
            "fused_s": t_fused, "plain_s": t_plain, "speedup_vs_plain": t_plain / t_fused,
            "logits_GBps": nbytes * 2 / t_fused / 1e9}


def bench_select(backend: str, n: int, device: str = "cpu", share: float = 0.3,
                 min_run_time: float = 0.3) -> Dict[str, Any]:
    sel, topk, k = select_case(backend, n, device, share)
    t_sel, t_topk = _time(sel, min_run_time), _time(topk, min_run_time)
    return {"kind": "select", "backend": backend, "device": device, "N": n, "k": k,
            "select_s": t_sel, "topk_s": t_topk, "speedup_vs_topk": t_topk / t_sel}


def run_all(device: str = "cpu", backends: Optional[Sequence[str]] = None, quick: bool = True,
            min_run_time: float = 0.3) -> List[Dict[str, Any]]:
    names = list(backends) if backends else list(available(device, auto=True))
    out = []
    for name in names:
        for b, c in (QUICK_STEP if quick else FULL_STEP):
            out.append(bench_step(name, b, c, device, min_run_time=min_run_time))
        for n in (QUICK_SELECT if quick else FULL_SELECT):
            out.append(bench_select(name, n, device, min_run_time=min_run_time))
    return out


def format_results(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [f"{'backend':<10} {'op':<7} {'size':>14} {'fastsel ms':>11} {'plain ms':>9} {'ratio':>7}"]
    for r in rows:
        if r["kind"] == "step":
            size, ours, plain, ratio = f"B={r['B']} C={r['C']}", r["fused_s"], r["plain_s"], r["speedup_vs_plain"]
        else:
            size, ours, plain, ratio = f"N={r['N']}", r["select_s"], r["topk_s"], r["speedup_vs_topk"]
        lines.append(f"{r['backend']:<10} {r['kind']:<7} {size:>14} {ours * 1e3:>11.3f} {plain * 1e3:>9.3f} {ratio:>6.2f}x")
    lines.append("ratio = plain time / fastsel time (> 1: fastsel faster). step: forward + backward + state "
                 "update vs F.cross_entropy + index updates + backward; select: vs torch.topk.")
    return "\n".join(lines)


def save(rows: Sequence[Dict[str, Any]], path: str, command: str) -> None:
    from .machine import machine
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": command, "machine": machine(), "results": list(rows)}, f, indent=1)
