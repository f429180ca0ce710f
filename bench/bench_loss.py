"""What a user pays per loss call: ``sampler.loss(logits, target, idx).backward()`` on a real
Sampler (state update included) against bare ``F.cross_entropy(logits, target).backward()``
(no state), on the same tensors, for B = 256 at C = 10, 100, 1000 and segmentation logits
[16, 21, 64, 64] with labels [16, 64, 64]; host and device time apart on a GPU.

    .venv/bin/python bench/bench_loss.py                  # -> bench/results/loss_cost_cpu.json
    .venv/bin/python bench/bench_loss.py --device cuda    # -> bench/results/loss_cost_cuda.json
    .venv/bin/python -m pytest bench/bench_loss.py --benchmark-only   # pytest-benchmark

The script times both sides in interleaved blocks and reports medians (``fastsel.experiments.bench.
bench_loss_cost``; ``fastsel bench`` prints the same table). Targets (issue 11, never
asserted): on the CPU, ``cpu`` backend <= 1.10x bare CE for C >= 100 and K-dim, <= 1.5x at
C = 10; on a GPU, host time per call <= 60 us. The load average before and after is written
too: this machine is shared, and a busy neighbour inflates both sides' times.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fastsel.backends import available  # noqa: E402
from fastsel.experiments.bench import LOSS_CASES, LossCase, format_loss_cost, run_loss_cost  # noqa: E402
from fastsel.machine import machine  # noqa: E402

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
SIDES = [(d, b) for d in DEVICES for b in available(d, auto=True)] + [(d, "bare") for d in DEVICES]
IDS = ["x".join(map(str, ls)) for ls, _ in LOSS_CASES]


@pytest.mark.parametrize("device,side", SIDES)
@pytest.mark.parametrize("logits_shape,target_shape", LOSS_CASES, ids=IDS)
def test_loss_cost(benchmark, device, side, logits_shape, target_shape):
    """One call per round; the next index batch of the epoch is prepared outside the timing."""
    case = LossCase("reference" if side == "bare" else side, logits_shape, target_shape, device)
    fn = case.bare if side == "bare" else case.fastsel
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(idx):
        fn(idx)
        sync()

    benchmark.group = f"loss {device} {'x'.join(map(str, logits_shape))}"
    benchmark.name = "F.cross_entropy" if side == "bare" else f"sampler.loss[{side}]"
    rounds = 30 if len(logits_shape) > 2 else 300
    benchmark.pedantic(run, setup=lambda: ((case.batches(1)[0],), {}), rounds=rounds, warmup_rounds=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per side and case (default 2)")
    p.add_argument("--out", default=None, help="default bench/results/loss_cost_<device>.json")
    args = p.parse_args(argv)
    names = args.backends.split(",") if args.backends else None
    load0 = os.getloadavg()
    rows = run_loss_cost(args.device, names, min_run_time=args.min_run_time)
    load1 = os.getloadavg()
    print(format_loss_cost(rows))
    out = args.out or os.path.join(HERE, "results", f"loss_cost_{torch.device(args.device).type}.json")
    cmd = ".venv/bin/python bench/bench_loss.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {"device": args.device, "command": cmd, "machine": machine(),
           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_before_after": [load0, load1],
           "what": "sampler.loss(logits, target, idx).backward() (uniform Sampler, budget 1.0, "
                   "epoch started, state updated) vs F.cross_entropy(logits, target).backward() on "
                   "the same leaf logits; medians of interleaved blocks of back-to-back calls",
           "rows": rows}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
