"""CPU micro-benchmarks of csrc/'s extension against the reference backend (pytest-benchmark).

* the fused step, forward + backward + state update, for B in {256, 1024, 4096} and
  C in {10, 100, 1000} (target: the "cpu" backend >= 2x faster than "reference");
* the selection over N = 1.28M keys, k = 0.3 N and k = N, and the shuffle of 0.3 N
  indices (target: >= 2x faster).

Both backends of one case run back to back in the same session, and the ratios
(reference time / cpu time, from the median and from the minimum of the rounds) are
written with the CPU model and the exact command to
bench/results/cpu_<model>_<threads>threads.json (FASTSEL_BENCH_OUT overrides the path;
FASTSEL_BENCH_THREADS sets torch's intra-op threads). Run:

    .venv/bin/python -m pytest -q bench/bench_cpu.py --benchmark-only

The logits are a leaf tensor, so both backends also pay for x.grad; the timed region is
step() + backward(), with a fresh copy of the logits made outside it.
"""
import json
import os
import platform
import re
import sys
import time

import pytest
import torch

from fastsel.backends import get_backend, list_backends
from fastsel.config import LossConfig
from fastsel.machine import cpu_name
from fastsel.state import SampleState

pytest.importorskip("pytest_benchmark")

if os.environ.get("FASTSEL_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTSEL_BENCH_THREADS"]))

BACKENDS = ("reference", "cpu")
SIZES = [(b, c) for b in (256, 1024, 4096) for c in (10, 100, 1000)]
N_SELECT = 1_280_000
N_STATE = 50_000
_results = {}


def _need(name):
    if not list_backends()[name].startswith("available"):
        pytest.skip(f"backend {name!r}: {list_backends()[name]}")


def _record(kind, case, name, benchmark):
    st = benchmark.stats.stats
    _results.setdefault(kind, {}).setdefault(case, {})[name] = {
        "median_ms": st.median * 1e3, "min_ms": st.min * 1e3, "mean_ms": st.mean * 1e3,
        "rounds": st.rounds}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("b,c", SIZES, ids=[f"B{b}-C{c}" for b, c in SIZES])
def test_step_forward_backward_update(benchmark, name, b, c):
    _need(name)
    backend = get_backend(name, "cpu")
    g = torch.Generator().manual_seed(b * 7919 + c)
    logits = torch.randn(b, c, generator=g) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    indices = torch.randint(0, N_STATE, (b,), generator=g)
    state, cfg = SampleState(N_STATE), LossConfig()

    def setup():
        return (logits.clone().requires_grad_(True),), {}

    def run(x):
        backend.step(x, labels, indices, state, cfg, 0).backward()

    rounds = max(20, min(200, int(2e6 / (b * c)) + 10))
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=2)
    _record("step", f"B={b},C={c}", name, benchmark)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("share", [0.3, 1.0], ids=["k0.3N", "kN"])
def test_select_1_28M(benchmark, name, share):
    _need(name)
    backend = get_backend(name, "cpu")
    keys = torch.rand(N_SELECT, generator=torch.Generator().manual_seed(0))
    k = int(N_SELECT * share)
    benchmark.pedantic(backend.select, args=(keys, k), rounds=7, warmup_rounds=1)
    _record("select", f"N={N_SELECT},k={k}", name, benchmark)


@pytest.mark.parametrize("name", BACKENDS)
def test_shuffle_0_3N(benchmark, name):
    _need(name)
    backend = get_backend(name, "cpu")
    chosen = torch.randperm(N_SELECT, generator=torch.Generator().manual_seed(1))[: int(0.3 * N_SELECT)]
    benchmark.pedantic(backend.shuffle, args=(chosen, 12345), rounds=7, warmup_rounds=1)
    _record("shuffle", f"m={chosen.numel()}", name, benchmark)


@pytest.fixture(scope="module", autouse=True)
def _report():
    """After the module: the ratios per case, written as JSON with the machine and command."""
    yield
    if not _results:
        return
    ratios = {}
    for kind, cases in _results.items():
        for case, by in cases.items():
            if "reference" in by and "cpu" in by:
                by["speedup_median"] = by["reference"]["median_ms"] / by["cpu"]["median_ms"]
                by["speedup_min"] = by["reference"]["min_ms"] / by["cpu"]["min_ms"]
                ratios[f"{kind} {case}"] = round(by["speedup_median"], 2)
    model = cpu_name()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "unknown"
    out = os.environ.get("FASTSEL_BENCH_OUT") or os.path.join(
        os.path.dirname(__file__), "results", f"cpu_{slug}_{torch.get_num_threads()}threads.json")
    doc = {
        "what": "fastsel csrc CPU extension ('cpu' backend) vs the reference backend",
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(
            ([f"FASTSEL_BENCH_THREADS={os.environ['FASTSEL_BENCH_THREADS']}"]
             if os.environ.get("FASTSEL_BENCH_THREADS") else [])
            + [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
               else sys.executable, "-m", "pytest", *sys.argv[1:]]),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {"step": ">= 2x (median)", "select": ">= 2x (median)"},
        "speedup_median": ratios,
        "results": _results,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nfastsel bench: wrote {out}")
    for name, r in ratios.items():
        print(f"  {name}: {r}x")
