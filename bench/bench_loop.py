"""A whole training loop, fastsel's against a plain one: a 2-conv CNN on scikit-learn's
``load_digits`` (1,797 8x8 images), batch 32, the same number of steps; fastsel's loop is a
``uniform`` Sampler at budget 1.0 with ``sampler.loss``, the plain one a ``RandomSampler``
with ``F.cross_entropy``. Runs alternate, so a slow spell of a shared machine hits both.

    .venv/bin/python bench/bench_loop.py            # -> bench/results/loop_cpu.json

The ratio is fastsel's loop time over the plain loop's (1.0: no cost): it holds the
selection pass at each epoch, the index column the DataLoader collates, and the loss call.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastsel  # noqa: E402
from fastsel.machine import machine  # noqa: E402


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return TensorDataset(x, torch.tensor(d.target))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def plain_loop(ds: TensorDataset, epochs: int, batch: int) -> float:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds))
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return time.perf_counter() - t0


def fastsel_loop(ds: TensorDataset, epochs: int, batch: int, backend: str) -> float:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    indexed = fastsel.with_indices(ds)
    sampler = fastsel.Sampler(indexed, budget=1.0, epochs=epochs, seed=0, backend=backend)
    loader = DataLoader(indexed, batch_size=batch, sampler=sampler)
    t0 = time.perf_counter()
    for _ in sampler.epochs():
        for x, y, idx in loader:
            opt.zero_grad()
            sampler.loss(m(x), y, idx).backward()
            opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8, help="runs of each loop, alternating (default 8)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--backend", default="auto", help="fastsel's backend (default auto)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "loop_cpu.json"))
    args = p.parse_args(argv)
    ds = digits()
    ratios, plain, ours = [], [], []
    for k in range(args.runs):
        first, second = (plain_loop, fastsel_loop) if k % 2 else (fastsel_loop, plain_loop)
        times = {}
        for fn in (first, second):
            extra = (args.backend,) if fn is fastsel_loop else ()
            times[fn.__name__] = fn(ds, args.epochs, args.batch, *extra)
        plain.append(times["plain_loop"])
        ours.append(times["fastsel_loop"])
        ratios.append(ours[-1] / plain[-1])
    print(f"fastsel loop / plain loop per run: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median {statistics.median(ratios):.3f} (runs after the first: "
          f"{min(ratios[1:] or ratios):.3f}-{max(ratios[1:] or ratios):.3f})")
    cmd = ".venv/bin/python bench/bench_loop.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {"command": cmd, "machine": machine(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "what": __doc__.split("\n\n")[0], "epochs": args.epochs, "batch": args.batch,
           "plain_s": plain, "fastsel_s": ours, "ratio_per_run": ratios,
           "ratio_median": statistics.median(ratios)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
