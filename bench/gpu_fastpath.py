"""The GPU fast path next to plain PyTorch, all measured in one run: GPU microseconds per
call (the profiler's device time of every kernel, memset and copy one call launches) and host
microseconds per call, for the fused step (forward + backward + state update) and the
selection, at the sizes of issue 13. Writes bench/results/gpu_fastpath_<gpu>.json (or --out):

    {"device": ..., "command": ..., "torch": ..., "rows": [
      {"op": "step", "impl": ..., "B": ..., "C": ..., "gpu_us": ..., "host_us": ..., "launches": ..., "top": [...]},
      {"op": "select", "impl": ..., "N": ..., "k": ..., "gpu_us": ..., "host_us": ..., ...}]}

and, for the fused backends, what one whole loss call costs the host: the profiler around
``sampler.loss(logits, y, idx).backward()`` (a Sampler with an epoch in progress, B = 256,
C = 10, 100, 1000), in ``loss_calls``:

    "loss_calls": [{"impl": "cuda", "B": 256, "C": 10, "host_us": ..., "launches": ...,
                    "kernels": ..., "copies": ..., "syncs": ..., "top": [...]}]

``launches``: kernel-launch runtime/driver calls (cudaLaunchKernel, cuLaunchKernel, ...) per
call, forward + backward; ``kernels``: kernels the device ran per call; ``copies``: memcpy /
memset calls per call; ``syncs``: host synchronisations per call (the measurement's own left
out); ``host_us``: the median wall time of one call (as the rows' host_us).

impl: ``cuda`` and ``triton`` (the fused backends, where available; their select rows also
carry ``shuffle_gpu_us`` / ``shuffle_host_us``, the epoch's shuffle of the k winners),
``plain`` (``F.cross_entropy(reduction="none")``, the same state's fields updated by index
ops, backward of the mean), ``bare_ce`` (``F.cross_entropy`` + backward), ``topk``
(``torch.topk(keys, k).indices``). host_us is the median wall time of one call with the GPU
queue kept short (a sync every few calls), so it is the host's own cost, not the GPU's.

``--dry-run`` runs the same code on the CPU at tiny sizes (the csrc CPU kernels stand in for
``cuda``, or the reference ops where the extension is not built; wall time for GPU time)
and writes the same file shape: a check of this script (tests/test_gpu_fastpath.py runs
it), not a measurement.

    python bench/gpu_fastpath.py [--out PATH] [--impls cuda,triton,plain,bare_ce,topk] [--dry-run]
                                 [--no-loss-calls]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastsel.backends import available, get_backend  # noqa: E402
from fastsel.config import LossConfig  # noqa: E402
from fastsel.sampler import Sampler  # noqa: E402
from fastsel.state import SampleState  # noqa: E402

STEPS = [(256, 10), (1024, 100), (4096, 1000)]
SELECTS = [1_280_000, 10_000_000]
DRY_STEPS = [(8, 5), (16, 10), (32, 20)]
DRY_SELECTS = [1000, 4000]
SHARE = 0.3   # k = 0.3 N
N_STATE = 50_000
IMPLS = ("cuda", "triton", "plain", "bare_ce", "topk")
#: The loss calls profiled whole (sampler.loss + backward), on the fused backends.
LOSS_CALLS = [(256, 10), (256, 100), (256, 1000)]
#: Runtime / driver calls that launch a kernel (CUDA graphs: one launch for the graph).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
COPY_CALLS = ("cudaMemcpy", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaMemset", "cuMemcpyAsync",
              "cuMemsetD8Async", "cuMemsetD32Async")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class Clock:
    """GPU time from the profiler and host time per call; on the CPU (dry run), wall time."""

    def __init__(self, device: str, quick: bool) -> None:
        self.cuda = device == "cuda"
        self.host_iters, self.gpu_iters = (20, 3) if quick else (200, 20)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def host_us(self, fn: Callable[[], Any], group: int = 5) -> float:
        """Median microseconds of one call, synchronised every `group` calls."""
        for _ in range(5):
            fn()
        self.sync()
        times: List[float] = []
        while len(times) < self.host_iters:
            for _ in range(group):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            self.sync()
        return statistics.median(times)

    def gpu(self, fn: Callable[[], Any]) -> Dict[str, Any]:
        """GPU microseconds per call, launches per call and the costliest kernels."""
        if not self.cuda:
            return {"gpu_us": self.host_us(fn), "launches": 0.0, "top": []}
        from torch.profiler import ProfilerActivity, profile
        fn()
        self.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(self.gpu_iters):
                fn()
            self.sync()
        per: Dict[str, List[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per.setdefault(e.name, []).append(e.device_time)
        it = self.gpu_iters
        top = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:6]
        return {"gpu_us": sum(sum(v) for v in per.values()) / it,
                "launches": sum(len(v) for v in per.values()) / it,
                "top": [{"name": k[:90], "calls": len(v) / it, "us": sum(v) / it} for k, v in top]}


def loss_call_profile(fn: Callable[[], Any], iters: int, cuda: bool) -> Dict[str, Any]:
    """What one call of ``fn`` launches, from torch.profiler: kernel launches (runtime and
    driver calls), device kernels, copies/memsets and host syncs, per call."""
    if not cuda:  # the dry run: the profiler runs, but there is no CUDA activity to count
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]):
            fn()
        return {"launches": 0.0, "kernels": 0.0, "copies": 0.0, "syncs": 0.0, "top": []}
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    launches = copies = syncs = kernels = 0
    per: Dict[str, int] = {}
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if not re.search(r"memcpy|memset", name, re.IGNORECASE):
                kernels += 1
                per[name] = per.get(name, 0) + 1
        elif name in LAUNCH_CALLS:
            launches += 1
        elif name in COPY_CALLS or name in SYNC_CALLS:
            copies += name in COPY_CALLS
            syncs += name in SYNC_CALLS
    syncs = max(0, syncs - 1)  # the torch.cuda.synchronize() that ends the measurement
    top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
    return {"launches": launches / iters, "kernels": kernels / iters, "copies": copies / iters,
            "syncs": syncs / iters, "top": [{"name": k[:90], "calls": v / iters} for k, v in top]}


def loss_call_fns(impls: List[str], fused: Dict[str, str], b: int, c: int, device: str, calls: int
                  ) -> List[Tuple[str, Callable[[], None]]]:
    """``sampler.loss(logits, y, idx).backward()`` on each fused backend: a Sampler whose
    epoch (every sample, uniform policy) is drawn and has room for ``calls`` calls, with
    ``idx`` rows of that epoch."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, device=device, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (b,), device=device, generator=g)
    out: List[Tuple[str, Callable[[], None]]] = []
    for impl in impls:
        if impl not in fused:
            continue
        n = b * (calls + 64)
        sampler = Sampler(n, "uniform", budget=1.0, epochs=1, seed=0, backend=fused[impl], device=device)
        iter(sampler)  # draws the epoch: the loss calls count towards it
        idx = torch.as_tensor(sampler.epoch_array()[:b]).to(device)

        def fn(s=sampler, idx=idx) -> None:
            x.grad = None
            s.loss(x, y, idx).backward()
        out.append((impl, fn))
    return out


def plain_step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, st: SampleState, a: float = 0.3) -> None:
    """What a user writes without fastsel: per-sample CE, the same state's fields updated by
    index ops (no duplicate merging), backward of the mean."""
    per = F.cross_entropy(x, y, reduction="none")
    with torch.no_grad():
        loss = per.detach()
        d = loss - st.loss[idx]
        st.loss[idx] += a * d
        st.loss_var[idx] = (1.0 - a) * (st.loss_var[idx] + a * d * d)
        st.seen[idx] += 1
        st.p_true[idx] += (torch.exp(-loss) - st.p_true[idx]) / st.seen[idx]
        st.last_epoch[idx] = 0
    per.mean().backward()


def step_fns(impls: List[str], fused: Dict[str, str], b: int, c: int, device: str
             ) -> List[Tuple[str, Callable[[], None]]]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, device=device, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (b,), device=device, generator=g)
    idx = torch.randint(0, N_STATE, (b,), device=device, generator=g)
    cfg = LossConfig(strict=False)
    out: List[Tuple[str, Callable[[], None]]] = []
    for impl in impls:
        st = SampleState(N_STATE, device)
        if impl in fused:
            be = get_backend(fused[impl], device)
            be.check_state(st)

            def fn(be=be, st=st) -> None:
                x.grad = None
                be.step(x, y, idx, st, cfg, 0).backward()
        elif impl == "plain":
            def fn(st=st) -> None:
                x.grad = None
                plain_step(x, y, idx, st)
        elif impl == "bare_ce":
            def fn() -> None:
                x.grad = None
                F.cross_entropy(x, y).backward()
        else:
            continue
        out.append((impl, fn))
    return out


def select_fns(impls: List[str], fused: Dict[str, str], n: int, k: int, device: str
               ) -> List[Tuple[str, Callable[[], Any], Optional[Callable[[], Any]]]]:
    g = torch.Generator(device=device).manual_seed(0)
    keys = torch.rand(n, device=device, generator=g)
    out: List[Tuple[str, Callable[[], Any], Optional[Callable[[], Any]]]] = []
    for impl in impls:
        if impl in fused:
            be = get_backend(fused[impl], device)
            chosen = be.select(keys, k)
            out.append((impl, lambda be=be: be.select(keys, k), lambda be=be, ch=chosen: be.shuffle(ch, 7)))
        elif impl == "topk":
            out.append((impl, lambda: torch.topk(keys, k).indices, None))
    return out


def gpu_tag(name: str) -> str:
    m = re.search(r"[a-z][0-9]{2,3}", name.lower())
    return m.group(0) if m else "gpu"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default: bench/results/gpu_fastpath_<gpu>.json")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--no-loss-calls", action="store_true", help="skip the whole loss calls' profile (loss_calls)")
    a = ap.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        ap.error(f"unknown impl(s) {unknown}; choose from {IMPLS}")
    if a.dry_run:
        device, steps, selects = "cpu", DRY_STEPS, DRY_SELECTS
        # The csrc CPU kernels stand in for the CUDA ones (the reference ops without the extension).
        stand_in = "cpu" if "cpu" in available("cpu") else "reference"
        fused = {"cuda": stand_in}
        device_name = f"cpu (dry run: the {stand_in} backend for cuda, wall time for gpu_us)"
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --dry-run to check the script on the CPU")
        device, steps, selects = "cuda", STEPS, SELECTS
        here = available("cuda")
        fused = {impl: impl for impl in ("cuda", "triton") if impl in here}
        device_name = torch.cuda.get_device_name()
    missing = [i for i in impls if i in ("cuda", "triton") and i not in fused]
    if missing:
        print(f"skipped (backend not available here): {missing}", file=sys.stderr)
    impls = [i for i in impls if i not in missing]
    clock = Clock(device, quick=a.dry_run)

    rows: List[Dict[str, Any]] = []
    for b, c in steps:
        for impl, fn in step_fns(impls, fused, b, c, device):
            rows.append({"op": "step", "impl": impl, "B": b, "C": c, "host_us": clock.host_us(fn), **clock.gpu(fn)})
            print(_line(rows[-1]), flush=True)
    for n in selects:
        k = int(n * SHARE)
        for impl, fn, shuffle in select_fns(impls, fused, n, k, device):
            row: Dict[str, Any] = {"op": "select", "impl": impl, "N": n, "k": k, "host_us": clock.host_us(fn),
                                   **clock.gpu(fn)}
            if shuffle is not None:
                row["shuffle_host_us"] = clock.host_us(shuffle)
                row["shuffle_gpu_us"] = clock.gpu(shuffle)["gpu_us"]
            rows.append(row)
            print(_line(rows[-1]), flush=True)

    loss_calls: List[Dict[str, Any]] = []
    if not a.no_loss_calls:
        # Every call must count (the sampler refuses a call past the epoch): room for all.
        calls = 5 + clock.host_iters + 5 + 1 + clock.gpu_iters + 1
        for b, c in LOSS_CALLS:
            for impl, fn in loss_call_fns(impls, fused, b, c, device, calls):
                row = {"impl": impl, "B": b, "C": c, "host_us": clock.host_us(fn),
                       **loss_call_profile(fn, clock.gpu_iters, clock.cuda)}
                loss_calls.append(row)
                print(f"loss   {impl:8} {f'B={b} C={c}':>20} launches {row['launches']:5.1f}  kernels "
                      f"{row['kernels']:5.1f}  syncs {row['syncs']:4.1f}  host {row['host_us']:8.1f} us", flush=True)

    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"gpu_fastpath_{gpu_tag(device_name) if device == 'cuda' else 'cpu'}.json")
    command = " ".join(["python", "bench/gpu_fastpath.py"] + (sys.argv[1:] if argv is None else list(argv)))
    data = {"device": device_name, "command": command, "torch": torch.__version__,
            "dry_run": bool(a.dry_run), "rows": rows, "loss_calls": loss_calls}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    print(_table(rows))
    print("wrote", out)
    return data


def _line(r: Dict[str, Any]) -> str:
    size = f"B={r['B']} C={r['C']}" if r["op"] == "step" else f"N={r['N']} k={r['k']}"
    return f"{r['op']:6} {r['impl']:8} {size:>20} gpu {r['gpu_us']:9.1f} us  host {r['host_us']:8.1f} us"


def _table(rows: List[Dict[str, Any]]) -> str:
    """Each fused row as a ratio of the plain way measured in the same run."""
    base = {}
    for r in rows:
        if r["impl"] in ("plain", "topk"):
            base[(r["op"], r.get("B"), r.get("C"), r.get("N"))] = r
    lines = ["op     impl      size                    gpu us   x plain/topk   host us"]
    for r in rows:
        ref = base.get((r["op"], r.get("B"), r.get("C"), r.get("N")))
        ratio = f"{r['gpu_us'] / ref['gpu_us']:.2f}x" if ref and ref["gpu_us"] > 0 else "-"
        size = f"B={r['B']} C={r['C']}" if r["op"] == "step" else f"N={r['N']}"
        lines.append(f"{r['op']:6} {r['impl']:8} {size:>20} {r['gpu_us']:10.1f} {ratio:>13} {r['host_us']:9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
