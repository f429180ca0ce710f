"""Where a GPU step's time goes: host time per call (launch-bound), GPU kernel time per call
(from the profiler) and the kernels launched, for the fused step and the selection of every
GPU backend, next to plain PyTorch. Needs a CUDA GPU.

    python bench/gpu_profile.py [--out bench/results/gpu_profile_<gpu>.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastsel.backends import available  # noqa: E402
from fastsel.experiments.bench import select_case, step_case  # noqa: E402

STEPS = [(256, 10), (1024, 100), (4096, 1000)]
SELECTS = [50_000, 1_280_000, 10_000_000]


def host_us(fn: Callable[[], object], iters: int = 300) -> float:
    """Mean host microseconds per call when calls are queued back to back (one sync at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def kernels(fn: Callable[[], object], iters: int = 20) -> Dict[str, object]:
    """GPU kernel microseconds per call and the kernels one call launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per: Dict[str, List[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per.setdefault(e.name, []).append(e.device_time)
    total = sum(sum(v) for v in per.values()) / iters
    launches = sum(len(v) for v in per.values()) / iters
    top = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {"gpu_us": total, "launches": launches,
            "top": [{"name": k[:90], "calls": len(v) / iters, "us": sum(v) / iters} for k, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    names = [n for n in available("cuda") if n != "reference"] + ["reference"]
    for b, c in STEPS:
        for name in names:
            fused, plain, _ = step_case(name, b, c, "cuda")
            for label, fn in ((name, fused), ("plain", plain)):
                if label == "plain" and name != names[0]:
                    continue
                rows.append({"op": "step", "impl": label, "B": b, "C": c, "host_us": host_us(fn),
                             **kernels(fn)})
    for n in SELECTS:
        for name in names:
            sel, topk, _ = select_case(name, n, "cuda")
            for label, fn in ((name, sel), ("topk", topk)):
                if label == "topk" and name != names[0]:
                    continue
                rows.append({"op": "select", "impl": label, "N": n, "host_us": host_us(fn, 50),
                             **kernels(fn, 5)})
    print(f"{'op':7} {'impl':10} {'size':>16} {'host us':>9} {'gpu us':>9} {'launches':>8}  top kernel")
    for r in rows:
        size = f"B={r['B']} C={r['C']}" if r["op"] == "step" else f"N={r['N']}"
        top = r["top"][0] if r["top"] else {"name": "-", "us": 0}
        print(f"{r['op']:7} {r['impl']:10} {size:>16} {r['host_us']:9.1f} {r['gpu_us']:9.1f} "
              f"{r['launches']:8.1f}  {top['name'][:40]} {top['us']:.1f}")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                "gpu_profile.json")
    with open(out, "w") as f:
        json.dump({"command": "python bench/gpu_profile.py", "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
