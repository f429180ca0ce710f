"""pytest-benchmark: every available backend's fused step and selection, each next to the
plain-PyTorch way in the same benchmark group (the ratio is read off the group).

    .venv/bin/python -m pytest bench/bench_core.py --benchmark-only \
        --benchmark-json bench/results/core_<device>.json

Cases come from ``fastsel.experiments.bench`` (the same code ``fastsel bench`` times). Nothing here
asserts a time.
"""
import pytest
import torch

from fastsel.backends import available
from fastsel.experiments.bench import FULL_SELECT, FULL_STEP, select_case, step_case

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
CASES = [(d, b) for d in DEVICES for b in available(d, auto=True)]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("b,c", FULL_STEP)
def test_step(benchmark, device, backend, b, c):
    fused, plain, _ = step_case(backend, b, c, device)
    benchmark.group = f"step {device} B={b} C={c}"
    benchmark.name = f"fastsel[{backend}]"
    benchmark(fused)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,c", FULL_STEP)
def test_step_plain(benchmark, device, b, c):
    _, plain, _ = step_case("reference", b, c, device)
    benchmark.group = f"step {device} B={b} C={c}"
    benchmark(plain)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("n", FULL_SELECT)
def test_select(benchmark, device, backend, n):
    sel, _, _ = select_case(backend, n, device)
    benchmark.group = f"select {device} N={n}"
    benchmark(sel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", FULL_SELECT)
def test_select_topk(benchmark, device, n):
    _, topk, _ = select_case("reference", n, device)
    benchmark.group = f"select {device} N={n}"
    benchmark(topk)
