"""Micro-benchmarks of the fused step, the selection and the loss call a user makes, per
backend, as ratios against the plain-PyTorch way measured in the same run (``fastsel bench``;
bench/ wraps the same code).

Step and selection times come from ``torch.utils.benchmark.Timer``, which synchronises CUDA
and picks the repeat count itself; the loss call is timed in interleaved blocks against bare
``F.cross_entropy`` (medians), with host and device time apart. Nothing here asserts a time.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from ..backends import available, get_backend
from ..config import LossConfig
from ..state import SampleState

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


#: The one direction of every ratio ``fastsel bench`` prints, said above each table.
RATIO_RULE = "ratio = fastsel time / baseline time: < 1 means fastsel is faster"


def format_results(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [f"step and selection; {RATIO_RULE} (baseline: plain PyTorch)",
             f"{'backend':<10} {'op':<7} {'size':>14} {'fastsel ms':>11} {'plain ms':>9} {'ratio':>7}"]
    for r in rows:
        if r["kind"] not in ("step", "select"):
            continue
        if r["kind"] == "step":
            size, ours, plain = f"B={r['B']} C={r['C']}", r["fused_s"], r["plain_s"]
        else:
            size, ours, plain = f"N={r['N']}", r["select_s"], r["topk_s"]
        lines.append(f"{r['backend']:<10} {r['kind']:<7} {size:>14} {ours * 1e3:>11.3f} {plain * 1e3:>9.3f} "
                     f"{ours / plain:>6.2f}x")
    lines.append("step: forward + backward + state update vs F.cross_entropy + index updates + backward; "
                 "select: vs torch.topk.")
    return "\n".join(lines)


def save(rows: Sequence[Dict[str, Any]], path: str, command: str) -> None:
    from ..machine import machine
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": command, "machine": machine(), "results": list(rows)}, f, indent=1)


# ---- what a user pays per loss call: Sampler.loss against bare F.cross_entropy --------------

#: (logits shape, target shape): B = 1, C = 2 (nothing but the call's overhead), B = 256 at
#: C = 10, 100, 1000, and a segmentation batch.
LOSS_CASES = [((1, 2), (1,)), ((256, 10), (256,)), ((256, 100), (256,)), ((256, 1000), (256,)),
              ((16, 21, 64, 64), (16, 64, 64))]
LOSS_N = 50_000        # a CIFAR-sized per-sample state
LOSS_BLOCK_S = 0.02    # seconds of one timed block of back-to-back calls
HOST_CALLS = 16        # calls per host-time block on a GPU: few enough not to fill the launch queue


def loss_target(device: str, logits_shape: Sequence[int]) -> Tuple[Optional[float], Optional[float]]:
    """Issue 19's targets: (max fastsel/bare ratio, max host µs per call); None where none.
    On the CPU: <= 1.25x at B = 1 (all overhead), <= 1.0x at B = 256 and for K-dim."""
    if torch.device(device).type != "cpu":
        return None, 60.0
    return (1.25 if logits_shape[0] == 1 else 1.0), None


def top_level_ops(fn: Callable[[], Any]) -> List[str]:
    """The aten/fastsel ops ``fn()`` dispatches that no other aten/fastsel op dispatched
    (torch.profiler), leaving out the autograd engine's accumulation into a leaf's .grad."""
    from torch.profiler import profile
    ours = ("aten::", "fastsel::")
    with profile() as prof:
        fn()
    names = []
    for e in prof.events():
        if not e.name.startswith(ours):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith(ours) and "AccumulateGrad" not in p.name:
            p = p.cpu_parent
        if p is None:
            names.append(e.name)
    return names


class LossCase:
    """One training step's loss, both ways, on the same leaf logits and targets: ``fastsel(idx)``
    is ``sampler.loss(logits, target, idx).backward()`` on a real uniform Sampler at budget 1.0
    whose epoch is started; ``bare(idx)`` is ``F.cross_entropy(logits, target).backward()``.

    ``loss()`` updates the state and advances the epoch's position, as in training; ``batches``
    hands out the epoch's next index batches, as the DataLoader would, starting a fresh epoch
    (a selection pass, untimed) when this one has too few left, so the position stays valid.
    """

    def __init__(self, backend: str, logits_shape: Sequence[int], target_shape: Sequence[int],
                 device: str = "cpu", n: int = LOSS_N, seed: int = 0) -> None:
        from ..sampler import Sampler
        g = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)
        self.logits = torch.randn(tuple(logits_shape), device=device, generator=g).requires_grad_(True)
        self.target = torch.randint(0, logits_shape[1], tuple(target_shape), device=device, generator=g)
        self.b = int(logits_shape[0])
        if self.b > n:
            raise ValueError(f"a batch of {self.b} needs N >= {self.b}, got N={n}")
        # epochs: a cap the timing never reaches (each block takes at most one epoch).
        self.sampler = Sampler(n, policy="uniform", budget=1.0, epochs=1_000_000, seed=seed,
                               backend=backend, device=device)
        iter(self.sampler)

    def batches(self, calls: int) -> List[torch.Tensor]:
        """The epoch's next ``calls`` index batches (``calls`` at most N // B)."""
        s = self.sampler
        if len(s.epoch_array()) < calls * self.b:
            with warnings.catch_warnings():   # the epoch's tail is left untrained on purpose
                warnings.simplefilter("ignore")
                s.set_epoch(s.epoch + 1)
            iter(s)
        idx = torch.from_numpy(s.epoch_array()[: calls * self.b]).to(self.device)
        return list(idx.view(calls, self.b).unbind(0))

    def fastsel(self, idx: torch.Tensor) -> None:
        self.logits.grad = None
        self.sampler.loss(self.logits, self.target, idx).backward()

    def bare(self, idx: torch.Tensor) -> None:
        self.logits.grad = None
        F.cross_entropy(self.logits, self.target).backward()


def _cpu_seconds() -> Tuple[Optional[float], float]:
    """(CPU seconds every process on the machine has used, from Linux's /proc/stat, or None;
    CPU seconds this process has used). Their difference is what other processes took."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own  # less idle, iowait
    except (OSError, ValueError, IndexError):
        return None, own


def _block(fn: Callable[[torch.Tensor], None], batches: Sequence[torch.Tensor],
           sync: Callable[[], None]) -> Tuple[float, float]:
    """(host, wall) seconds per call of ``fn`` over ``batches`` back to back: host stops when
    the last call returns, wall once the device has finished too (equal on the CPU)."""
    sync()
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land on whichever side happens to run
    try:
        t0 = time.perf_counter()
        for idx in batches:
            fn(idx)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
    finally:
        if gc_was_on:
            gc.enable()
    return (t1 - t0) / len(batches), (t2 - t0) / len(batches)


def _interleaved(sides: Dict[str, Callable[[torch.Tensor], None]], case: "LossCase", calls: int,
                 sync: Callable[[], None], min_run_time: float, min_pairs: int
                 ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """(wall, host) seconds per call of each side, one entry per block. The sides take turns,
    the order alternating each round, so a slow spell of a shared machine hits both; rounds
    go on until each side ran ``min_run_time`` s. On a GPU the host time comes from short
    extra blocks issued without waiting (a long block would fill the launch queue)."""
    wall: Dict[str, List[float]] = {k: [] for k in sides}
    host: Dict[str, List[float]] = {k: [] for k in sides}
    spent = dict.fromkeys(sides, 0.0)
    names = list(sides)
    rounds = 0
    while rounds < min_pairs or min(spent.values()) < min_run_time:
        for k in (names if rounds % 2 == 0 else names[::-1]):
            h, w = _block(sides[k], case.batches(calls), sync)
            if case.device.type != "cpu":
                h = _block(sides[k], case.batches(min(calls, HOST_CALLS)), sync)[0]
            wall[k].append(w)
            host[k].append(h)
            spent[k] += w * calls
        rounds += 1
    return wall, host


def bench_loss_cost(backend: str, logits_shape: Sequence[int], target_shape: Sequence[int],
                    device: str = "cpu", min_run_time: float = 0.3, n: int = LOSS_N,
                    min_pairs: int = 5) -> Dict[str, Any]:
    """One row: ``LossCase.fastsel`` against ``LossCase.bare``, medians per call of
    interleaved blocks of about ``LOSS_BLOCK_S`` s, host time apart from wall time."""
    (all0, own0), t0 = _cpu_seconds(), time.perf_counter()
    case = LossCase(backend, logits_shape, target_shape, device, n)
    sync = (lambda: torch.cuda.synchronize(case.device)) if case.device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: allocator, first dispatch, lazy imports
        _block(case.fastsel, case.batches(2), sync)
        _block(case.bare, case.batches(2), sync)
    per_call = _block(case.fastsel, case.batches(3), sync)[1]
    calls = max(1, min(n // case.b, int(LOSS_BLOCK_S / max(per_call, 1e-9))))
    wall, host = _interleaved({"fastsel": case.fastsel, "bare": case.bare}, case, calls, sync,
                              min_run_time, min_pairs)
    (all1, own1), elapsed = _cpu_seconds(), time.perf_counter() - t0
    others = None if all0 is None else max(0.0, (all1 - all0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_host = {k: statistics.median(v) for k, v in host.items()}
    paired = [f / b for f, b in zip(wall["fastsel"], wall["bare"])]
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    idx = case.batches(2)
    ops_fastsel = top_level_ops(lambda: case.fastsel(idx[0]))
    ops_bare = top_level_ops(lambda: case.bare(idx[1]))
    ratio = med["fastsel"] / med["bare"]
    max_ratio, max_host_us = loss_target(device, logits_shape)
    meets = ((max_ratio is None or ratio <= max_ratio)
             and (max_host_us is None or med_host["fastsel"] * 1e6 <= max_host_us))
    return {"kind": "loss_cost", "backend": backend, "device": str(case.device),
            "logits_shape": list(logits_shape), "target_shape": list(target_shape),
            "fastsel_s": med["fastsel"], "bare_s": med["bare"], "ratio": ratio,
            "ratio_paired": statistics.median(paired), "ratio_paired_iqr": [q[0], q[2]],
            "ratio_range": [min(paired), max(paired)],
            "ops_per_call": len(ops_fastsel), "ops": ops_fastsel, "bare_ops_per_call": len(ops_bare),
            "ratio_min": min(wall["fastsel"]) / min(wall["bare"]),
            "overhead_us": (med["fastsel"] - med["bare"]) * 1e6,
            "host_s": med_host["fastsel"], "bare_host_s": med_host["bare"],
            "calls_per_block": calls, "blocks": len(paired), "N": n, "others_cpu_share": others,
            "target": f"ratio <= {max_ratio}" if max_ratio else f"host <= {max_host_us:g} us",
            "meets_target": meets}


def run_loss_cost(device: str = "cpu", backends: Optional[Sequence[str]] = None,
                  cases: Optional[Sequence[Tuple[Sequence[int], Sequence[int]]]] = None,
                  min_run_time: float = 0.3, n: int = LOSS_N) -> List[Dict[str, Any]]:
    """``bench_loss_cost`` for every backend that runs on ``device`` (default: all) and case
    (default ``LOSS_CASES``)."""
    names = list(backends) if backends else list(available(device, auto=True))
    return [bench_loss_cost(name, ls, ts, device, min_run_time, n)
            for name in names for ls, ts in (cases or LOSS_CASES)]


def _share(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.0%}"


def format_loss_cost(rows: Sequence[Dict[str, Any]]) -> str:
    lines = [f"loss call; {RATIO_RULE} (baseline: bare F.cross_entropy)",
             f"{'backend':<10} {'logits':>16} {'fastsel ms':>11} {'bare ms':>9} {'ratio':>7} "
             f"{'range':>13} {'+us/call':>9} {'host us':>8} {'ops':>7} {'busy':>5}  target"]
    for r in rows:
        if r["kind"] != "loss_cost":
            continue
        shape = "x".join(str(s) for s in r["logits_shape"])
        lo, hi = r["ratio_range"]
        lines.append(f"{r['backend']:<10} {shape:>16} {r['fastsel_s'] * 1e3:>11.3f} {r['bare_s'] * 1e3:>9.3f} "
                     f"{r['ratio']:>6.2f}x {f'{lo:.2f}-{hi:.2f}x':>13} {r['overhead_us']:>9.1f} "
                     f"{r['host_s'] * 1e6:>8.1f} {r['ops_per_call']:>3}/{r['bare_ops_per_call']:<3} "
                     f"{_share(r['others_cpu_share']):>5}  "
                     f"{r['target']}: {'met' if r['meets_target'] else 'MISSED'}")
    lines.append("sampler.loss(logits, target, idx)"
                 ".backward() with the state update, vs F.cross_entropy(logits, target).backward(); "
                 "medians of interleaved blocks (range: the blocks' paired ratios, lowest to highest). "
                 "host = time until the calls return (= wall on the CPU). ops = top-level aten/fastsel "
                 "ops one call dispatches (torch.profiler), fastsel/bare. "
                 "busy = share of the machine's CPU other processes used meanwhile (it inflates both sides).")
    return "\n".join(lines)
