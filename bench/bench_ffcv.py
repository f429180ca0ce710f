"""FFCV loader throughput: fastsel's Order against FFCV's own RANDOM order, same .beton.

    .venv/bin/python bench/bench_ffcv.py [--n 50000] [--epochs 20] [--workers 2]

Writes a seeded CIFAR-shaped set (32×32 RGB, raw) once, then times full epochs of each
order, interleaved so machine noise hits both alike, and reports images/s and the ratio
(target ≥ 0.95). fastsel's epochs include its selection pass (FFCV asks for the order when
an epoch starts). A third variant adds the training loop's ``sampler.loss`` call per
batch (on zero logits), to show its cost apart from the loader's, and a fourth gives
RANDOM the loss a plain loop computes instead (``F.cross_entropy``). On a shared 2-core
machine single epochs (about 90 ms) vary by ±20%, hence the median of 20 epochs per
variant. Results go to bench/results/ffcv_throughput_cpu.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastsel  # noqa: E402
from fastsel.ffcv import Order, pipelines, write_beton  # noqa: E402
from fastsel.machine import cpu_name  # noqa: E402


def make_images(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = g.integers(0, 10, size=n)
    return [(images[i], int(labels[i])) for i in range(n)]


def epoch_rate(loader, loss=None) -> float:
    """Images/s of one full epoch; ``loss(labels, ids)`` is called per batch if given."""
    t0 = time.perf_counter()
    count = 0
    for img, lab, ids in loader:
        if loss is not None:
            loss(lab, ids)
        count += len(ids)
    return count / (time.perf_counter() - t0)


def run(n: int, epochs: int, workers: int, batch_size: int) -> dict:
    """Median images/s over ``epochs`` interleaved epochs of each variant."""
    from ffcv.loader import Loader, OrderOption
    with tempfile.TemporaryDirectory() as tmp:
        path = write_beton(make_images(n), os.path.join(tmp, "bench.beton"), num_workers=workers)
        pipes = pipelines(float_images=False)
        rand = Loader(path, batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                      pipelines=pipes, drop_last=False, seed=0)
        sampler = fastsel.Sampler(n, policy="uniform", budget=1.0, epochs=2 * epochs + 1, seed=0)
        ours = Loader(path, batch_size=batch_size, num_workers=workers, order=Order(sampler),
                      pipelines=pipelines(float_images=False), drop_last=False)

        def fastsel_loss(lab, ids):  # the training loop's call, on zero logits
            sampler.loss(torch.zeros(len(ids), 10), lab, ids)

        def plain_loss(lab, ids):  # what a loop without fastsel computes instead
            F.cross_entropy(torch.zeros(len(ids), 10), lab)

        epoch_rate(rand)  # warm-up: numba compilation and page cache
        epoch_rate(ours)
        r_rates, o_rates, l_rates, c_rates = [], [], [], []
        for e in range(epochs):
            r_rates.append(epoch_rate(rand))
            sampler.set_epoch(2 * e + 1)  # a fresh selection pass inside the timed epoch
            o_rates.append(epoch_rate(ours))
            sampler.set_epoch(2 * e + 2)
            l_rates.append(epoch_rate(ours, fastsel_loss))
            c_rates.append(epoch_rate(rand, plain_loss))
    r, o, l, c = (float(np.median(x)) for x in (r_rates, o_rates, l_rates, c_rates))
    return {"ffcv_random_images_per_s": r, "fastsel_order_images_per_s": o, "ratio": o / r,
            "fastsel_order_with_loss_call_images_per_s": l, "ratio_with_loss_call": l / r,
            "ffcv_random_with_cross_entropy_images_per_s": c, "ratio_loss_call_vs_cross_entropy": l / c,
            "random_per_epoch": r_rates, "fastsel_per_epoch": o_rates, "fastsel_with_loss_per_epoch": l_rates,
            "random_with_cross_entropy_per_epoch": c_rates}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = run(args.n, args.epochs, args.workers, args.batch_size)
    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    command = [f"{k}={v}" for k, v in env.items() if v is not None] + ["python", "bench/bench_ffcv.py"]
    out = {
        "benchmark": "ffcv loader throughput, fastsel Order vs FFCV RANDOM (same .beton, 32x32 RGB raw)",
        "command": " ".join(command + (argv if argv is not None else sys.argv[1:])),
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} cores)",
        # ffcv 1.0.2's own __version__ says 0.0.3rc1: ask the installed distribution.
        "versions": {"torch": torch.__version__, "ffcv": importlib.metadata.version("ffcv"),
                     "python": platform.python_version()},
        "env": env,
        "n": args.n, "epochs_timed": args.epochs, "workers": args.workers, "batch_size": args.batch_size,
        **res,
    }
    path = args.out or os.path.join(HERE, "results", "ffcv_throughput_cpu.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"FFCV RANDOM   {res['ffcv_random_images_per_s']:>10.0f} images/s")
    print(f"fastsel Order {res['fastsel_order_images_per_s']:>10.0f} images/s   ratio {res['ratio']:.3f}")
    print(f"  + loss call {res['fastsel_order_with_loss_call_images_per_s']:>10.0f} images/s   ratio "
          f"{res['ratio_with_loss_call']:.3f}")
    print(f"RANDOM + F.cross_entropy {res['ffcv_random_with_cross_entropy_images_per_s']:>10.0f} images/s   "
          f"loss call vs it {res['ratio_loss_call_vs_cross_entropy']:.3f}  -> {path}")
    return out


if __name__ == "__main__":
    main()
