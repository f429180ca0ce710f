"""Does Selective Backprop pay in wall time? SB against a uniform subset of the same
backward budget, on the CPU: per-epoch wall time of a small CNN on synthetic 32x32 images.

    .venv/bin/python bench/bench_sb.py        # -> bench/results/sb_walltime_cpu.json

Arms (every one a fresh copy of the same model, SGD with momentum, batches of ``--batch``):

* ``full``: every row of every batch trained (the cost of the full epoch).
* ``uniform_batch``: a uniform random ``keep`` share of each batch trained (one backward
  batch of keep·B rows per input batch): the same backward budget as SB, no selection.
* ``uniform_sampler``: ``fastsel.Sampler(policy="uniform", budget=keep)``: a uniform
  ``keep`` share of the epoch, in full batches of B (the "train on a uniform half" baseline).
* ``sb_sf1.0`` / ``sb_sf0.5``: ``SelectiveStep(model, "sb", keep=keep, batch_size=keep·B)``
  with the exact share, selection forward at full resolution / downsampled by 0.5. SB's
  backward batches have keep·B rows, as ``uniform_batch``'s, so the two differ only by
  the selection forward (and the bookkeeping around it).

Each repeat trains every arm (a fresh copy) for ``--epochs`` epochs, interleaved: epoch e
of every arm, in an order rotated each epoch and repeat, before epoch e + 1 of any (so a
busy neighbour's load falls on all of them alike); each arm's first epoch is a warm-up
and not timed. Reported: per arm, the median per-epoch time over all timed epochs with its spread
(min, quartiles, max), and the ratios of each arm's per-repeat median to ``full``'s and
``uniform_batch``'s in the same repeat (median and range over repeats). ``--threads``
(default 1) pins torch's intra-op threads: this machine is shared, and one thread is the
steadiest measure of work done. Each run is sized to finish in a few minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastsel  # noqa: E402
from fastsel.machine import machine  # noqa: E402


def conv_bn(i: int, o: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU())


def small_cnn(width: int = 16, classes: int = 10) -> nn.Module:
    """A small CIFAR-style CNN; global average pooling lets it take any image size."""
    w = width
    return nn.Sequential(conv_bn(3, w), conv_bn(w, w), conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w),
                         conv_bn(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * w, classes))


def synthetic(n: int, size: int, classes: int, seed: int):
    """Class-dependent blobs plus noise: a learnable task with a loss that falls."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    protos = torch.randn(classes, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(protos[y], size=(size, size), mode="bilinear", align_corners=False)
    x = x + 2.0 * torch.randn(n, 3, size, size, generator=g)
    return x.contiguous(), y


class Arm:
    """One way to train an epoch; ``epoch()`` runs one and returns its wall time."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> None:
        self.name, self.x, self.y, self.args = name, x, y, args
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9)
        self.g = torch.Generator().manual_seed(args.seed + 17)
        self.step = None
        self.sampler = None
        self.rows_trained = 0
        self.rows_seen = 0
        n, keep, bsz = x.shape[0], args.keep, args.batch
        if name.startswith("sb_"):
            sf = float(name.split("sf")[1])
            self.step = fastsel.SelectiveStep(self.model, "sb", keep=keep, optimizer=self.opt,
                                              batch_size=max(1, round(keep * bsz)),
                                              scale_factor=sf, seed=args.seed)
        elif name == "uniform_sampler":
            self.sampler = fastsel.Sampler(n, policy="uniform", budget=keep, epochs=args.epochs,
                                           seed=args.seed)
            self._epochs = self.sampler.epochs()

    def _train(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(xb), yb).backward()
        self.opt.step()
        self.rows_trained += int(xb.shape[0])

    def epoch(self) -> float:
        x, y, bsz, keep = self.x, self.y, self.args.batch, self.args.keep
        n = x.shape[0]
        t0 = time.perf_counter()
        if self.sampler is not None:
            next(self._epochs)
            order = torch.as_tensor(self.sampler.epoch_indices(), dtype=torch.int64)
            for i in range(0, len(order), bsz):
                idx = order[i:i + bsz]
                self.opt.zero_grad(set_to_none=True)
                self.sampler.loss(self.model(x[idx]), y[idx], idx).backward()
                self.opt.step()
                self.rows_trained += int(idx.numel())
                self.rows_seen += int(idx.numel())
            return time.perf_counter() - t0
        perm = torch.randperm(n, generator=self.g)
        for i in range(0, n, bsz):
            idx = perm[i:i + bsz]
            self.rows_seen += int(idx.numel())
            if self.name == "full":
                self._train(x[idx], y[idx])
            elif self.name == "uniform_batch":
                k = max(1, round(keep * idx.numel()))
                sub = idx[torch.randperm(idx.numel(), generator=self.g)[:k]]
                self._train(x[sub], y[sub])
            else:
                self.step.step(x[idx], y[idx], idx)
        if self.step is not None:
            self.step.end_epoch()
            self.rows_trained = self.step.counts["backward"]
        return time.perf_counter() - t0

    @torch.no_grad()
    def accuracy(self) -> float:
        self.model.eval()
        correct = sum(int((self.model(self.x[i:i + 512]).argmax(1) == self.y[i:i + 512]).sum())
                      for i in range(0, self.x.shape[0], 512))
        self.model.train()
        return correct / self.x.shape[0]


def spread(v: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": min(v), "q1": q[0], "q3": q[2], "max": max(v),
            "n": len(v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="training images (default 2048)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--batch", type=int, default=64, help="input batch size (default 64)")
    p.add_argument("--keep", type=float, default=0.5, help="kept share / budget (default 0.5)")
    p.add_argument("--width", type=int, default=16, help="CNN width (default 16)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs per arm and repeat, the first untimed (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="full,uniform_batch,uniform_sampler,sb_sf1.0,sb_sf0.5")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sb_walltime_cpu.json"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch of each arm is a warm-up)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = synthetic(args.n, args.size, 10, args.seed)
    model = small_cnn(args.width)
    names = args.arms.split(",")
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    times: Dict[str, List[List[float]]] = {a: [] for a in names}
    last: Dict[str, Arm] = {}
    for r in range(args.repeats):
        arms_r = {name: Arm(name, model, x, y, args) for name in names}
        ts_r: Dict[str, List[float]] = {name: [] for name in names}
        for e in range(args.epochs):
            shift = (r + e) % len(names)           # epochs interleaved, the order rotated
            for name in names[shift:] + names[:shift]:
                t = arms_r[name].epoch()
                if e > 0:                           # the first epoch is a warm-up
                    ts_r[name].append(t)
        for name in names:
            times[name].append(ts_r[name])
            last[name] = arms_r[name]
            print(f"repeat {r} {name:16s} " + " ".join(f"{t:.3f}" for t in ts_r[name]), flush=True)
    load1 = os.getloadavg()
    rep_median = {a: [statistics.median(ts) for ts in times[a]] for a in names}
    arms = {}
    for a in names:
        arm = last[a]
        row = {"epoch_s": spread([t for ts in times[a] for t in ts]),
               "per_repeat_median_s": rep_median[a],
               "rows_per_epoch": arm.rows_seen // args.epochs,
               "backward_rows_per_epoch": arm.rows_trained / args.epochs,
               # a sanity check that each arm trains, not a comparison (a few epochs only)
               "train_accuracy_after_last_repeat": arm.accuracy()}
        if arm.step is not None:
            sm = arm.step.summary()
            row["chosen_share"] = sm.get("chosen_share")
            row["selection_forward_share_of_step_time"] = (
                sm["selection_forward_time_s"] / sm["total_time_s"] if sm["total_time_s"] else None)
        for base in ("full", "uniform_batch"):
            if base in rep_median:
                ratios = [t / b for t, b in zip(rep_median[a], rep_median[base])]
                row[f"time_vs_{base}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                          "max": max(ratios)}
        arms[a] = row
    cmd = ".venv/bin/python bench/bench_sb.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {"command": cmd, "machine": machine(),
           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_before_after": [load0, load1],
           "wall_s": time.perf_counter() - t_start,
           "what": "per-epoch wall time (train only) of a small CNN (5 conv-BN-ReLU, global pool) "
                   "on synthetic 32x32 images; SB (exact share) vs a uniform subset of the same "
                   "backward budget; first epoch of each arm untimed; ratios are per-repeat "
                   "medians over the same repeat's baseline, median and range over repeats",
           "config": {k: getattr(args, k) for k in ("n", "size", "batch", "keep", "width", "epochs",
                                                     "repeats", "threads", "lr", "seed")},
           "arms": arms}
    print(f"\n{'arm':16s} {'epoch s (median [min, max])':>30s} {'vs full':>8s} {'vs uniform':>11s}")
    for a, row in arms.items():
        e = row["epoch_s"]
        vf = row.get("time_vs_full", {}).get("median", float("nan"))
        vu = row.get("time_vs_uniform_batch", {}).get("median", float("nan"))
        print(f"{a:16s} {e['median']:10.3f} [{e['min']:.3f}, {e['max']:.3f}]{'':6s} {vf:8.2f} {vu:11.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
