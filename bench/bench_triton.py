"""Triton backend micro-benchmarks: the fused step and the selection pass (GPU only), and the
AOT resource report (no GPU needed).

    .venv/bin/python -m pytest bench/bench_triton.py --benchmark-only   # pytest-benchmark
    .venv/bin/python bench/bench_triton.py            # do_bench -> bench/results/triton_bench_<gpu>.json
    .venv/bin/python bench/bench_triton.py --aot      # -> bench/results/triton_aot_resources.json

Fused step (two launches forward: rows kernel, then merge + update): ``TritonBackend.step``
+ backward against plain PyTorch (``F.cross_entropy(reduction="none")`` + the per-sample
index updates + backward) and against ``F.cross_entropy`` alone, for B in {256, 1024, 4096}
x C in {10, 100, 1000}: time ratio and achieved GB/s (logits read + gradient written)
against the measured copy bandwidth; the merge's worst case, every row one sample; and the
step given the epoch's rows (``fused_rows``: the room and membership checks and the row
counts, inside the same two launches). The epoch is a device tensor, as the sampler
passes it (an int would cost a host-to-device copy per step).
Selection (four launches of the radix threshold select + the rank-order sort): ``select``
for N in {50k, 1.28M, 10M}, k = 0.3 N, against ``torch.topk`` (and the reference's stable
sort, which has the same tie rule). Targets (never asserted): step ratio <= 0.5 vs plain;
selection over 1.28M under 100 us and >= 5x topk.
Without a GPU the timed benchmarks skip.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from fastsel.config import LossConfig  # noqa: E402
from fastsel.rows import EpochRows  # noqa: E402
from fastsel.state import SampleState  # noqa: E402

STEP_B = (256, 1024, 4096)
STEP_C = (10, 100, 1000)
SELECT_N = (50_000, 1_280_000, 10_000_000)
KEEP = 0.3


def gpu_ready() -> str | None:
    """None when the GPU benchmarks can run, else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the kernels would be interpreted"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _backend():
    from fastsel.backends import get_backend
    return get_backend("triton", "cuda")


def do_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (L2 flushed between runs)."""
    from triton.testing import do_bench as _db
    return float(_db(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write) of a 512 MiB buffer, GB/s."""
    src = torch.empty(128 * 2**20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def step_fns(b: int, c: int, n: int = 1_000_000, dtype=torch.float32) -> Dict[str, Callable]:
    """The three contenders for one (B, C): each runs forward + backward of one step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(b, c, device="cuda", generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, c, (b,), device="cuda", generator=g)
    idx = torch.randint(0, n, (b,), device="cuda", generator=g)
    tb, cfg = _backend(), LossConfig(strict=False)
    state = SampleState(n, "cuda")
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    p = torch.zeros(n, device="cuda")
    seen = torch.zeros(n, dtype=torch.int32, device="cuda")
    last = torch.zeros(n, dtype=torch.int32, device="cuda")
    a = cfg.ema
    rows = EpochRows(n, "cuda")   # every sample selected, room for any number of steps
    rows.open(torch.arange(n, device="cuda"), 0, 2**62, 0)
    epoch = rows.epoch

    def fused():
        logits.grad = None
        tb.step(logits, labels, idx, state, cfg, epoch).backward()

    def fused_rows():
        logits.grad = None
        tb.step(logits, labels, idx, state, cfg, epoch, rows=rows).backward()

    def plain():
        logits.grad = None
        rows = F.cross_entropy(logits, labels, reduction="none")
        with torch.no_grad():   # the state update a PyTorch loop would do (no duplicate merge)
            lo = rows.detach()
            d = lo - m[idx]
            m.index_copy_(0, idx, m[idx] + a * d)
            v.index_copy_(0, idx, (1 - a) * (v[idx] + a * d * d))
            p.index_copy_(0, idx, torch.exp(-lo))
            seen.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
            last.index_fill_(0, idx, 0)
        rows.mean().backward()

    def ce_only():
        logits.grad = None
        F.cross_entropy(logits, labels).backward()

    one = torch.full_like(idx, 7)

    def fused_one_index():   # the merge's worst case: every row one sample (B atomics)
        logits.grad = None
        tb.step(logits, labels, one, state, cfg, epoch).backward()

    return {"fused": fused, "plain": plain, "cross_entropy": ce_only,
            "fused_one_index": fused_one_index, "fused_rows": fused_rows}


def select_fns(n: int) -> Dict[str, Callable]:
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.rand(n, device="cuda", generator=g)
    k = int(n * KEEP)
    tb = _backend()
    return {
        "fused": lambda: tb.select(keys, k),
        "topk": lambda: torch.topk(keys, k, sorted=True),
        "stable_sort": lambda: torch.sort(keys, descending=True, stable=True).indices[:k],
    }


def run_all() -> Dict[str, object]:
    """Every step and selection case by do_bench; ratios and GB/s."""
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs()
    steps: List[Dict[str, object]] = []
    for b in STEP_B:
        for c in STEP_C:
            fns = step_fns(b, c)
            t = {name: do_bench(fn) for name, fn in fns.items()}
            moved = 2 * b * c * 4  # logits read once, gradient written once (fp32)
            gbs = moved / (t["fused"] * 1e-3) / 1e9
            steps.append({"B": b, "C": c, "ms": t, "ratio_vs_plain": t["fused"] / t["plain"],
                          "one_index_vs_fused": t["fused_one_index"] / t["fused"],
                          "rows_vs_fused": t["fused_rows"] / t["fused"],
                          "ratio_vs_cross_entropy": t["fused"] / t["cross_entropy"],
                          "fused_GBps": gbs, "fraction_of_copy_bw": gbs / bw})
    sel: List[Dict[str, object]] = []
    for n in SELECT_N:
        t = {name: do_bench(fn) for name, fn in select_fns(n).items()}
        sel.append({"N": n, "k": int(n * KEEP), "ms": t, "speedup_vs_topk": t["topk"] / t["fused"],
                    "speedup_vs_stable_sort": t["stable_sort"] / t["fused"]})
    import triton
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "command": "python bench/bench_triton.py", "copy_bandwidth_GBps": bw,
            "step": steps, "select": sel}


def aot_resources(out: str) -> Dict[str, object]:
    """Compile every kernel configuration for sm_80 and sm_90 (no GPU needed) and write each
    one's registers, spills and shared memory to ``out``."""
    import tempfile
    from fastsel.backends.triton import load_kernels
    old = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: real compile times
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            report = load_kernels("aot").run_subprocess()
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    report["command"] = "python bench/bench_triton.py --aot"
    report["device"] = "none (ahead-of-time build; targets: " + ", ".join(report["targets"]) + ")"
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    return report


# ---- pytest-benchmark -------------------------------------------------------------------

_why = gpu_ready()
gpu_only = pytest.mark.skipif(_why is not None, reason=_why or "")


def _timed(benchmark, fn):
    def once():
        fn()
        torch.cuda.synchronize()
    once()
    benchmark.pedantic(once, rounds=50, iterations=5, warmup_rounds=5)


@gpu_only
@pytest.mark.parametrize("c", STEP_C)
@pytest.mark.parametrize("b", STEP_B)
@pytest.mark.parametrize("impl", ["fused", "plain", "cross_entropy", "fused_one_index",
                                  "fused_rows"])
def test_step(benchmark, impl, b, c):
    benchmark.group = f"step B={b} C={c}"
    _timed(benchmark, step_fns(b, c)[impl])


@gpu_only
@pytest.mark.parametrize("n", SELECT_N)
@pytest.mark.parametrize("impl", ["fused", "topk", "stable_sort"])
def test_select(benchmark, impl, n):
    benchmark.group = f"select N={n}"
    _timed(benchmark, select_fns(n)[impl])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aot", action="store_true", help="write the AOT resource report")
    ap.add_argument("--out", help="output JSON path")
    a = ap.parse_args()
    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    if a.aot:
        out = a.out or os.path.join(results, "triton_aot_resources.json")
        rep = aot_resources(out)
        for r in rep["kernels"]:
            print(f"{r['target']:10s} {r['kernel']:22s} {r['dtype']:5s} warps={r['num_warps']} "
                  f"regs={r.get('registers')} spills={r.get('spill_store_bytes')}/"
                  f"{r.get('spill_load_bytes')} smem={r['shared_bytes']} {r['constexprs']}")
        print(f"wrote {out}")
        return
    why = gpu_ready()
    if why:
        print(f"skipped: {why}")
        return
    rep = run_all()
    name = "".join(ch if ch.isalnum() else "_" for ch in rep["device"]).strip("_")
    out = a.out or os.path.join(results, f"triton_bench_{name}.json")
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)
        f.write("\n")
    print(json.dumps(rep, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
