"""What ``fastsel run``, ``compare`` and ``bench`` do once their arguments are parsed: load
the data, check every run's plan, train, print and save. ``fail(argument, message)`` reports
an argument error found on the way as the command line reports its own (it does not return)."""
from __future__ import annotations

import argparse
import shlex
from typing import Any, Callable, List, NoReturn, Optional

Fail = Callable[[str, object], NoReturn]
#: Options that only the synthetic set reads, by their argparse destination.
SYNTHETIC_ONLY = ("label_noise", "redundancy", "imbalance")


def load_data(args: argparse.Namespace, dataset: str, fail: Fail) -> Any:
    """The dataset: synthetic generates ``--n-train``/``--n-test`` images; any other is cut to
    a seeded subset of that many (``datasets.subset``); an option the dataset does not read
    is refused, never ignored."""
    from . import datasets
    n_train, n_test = getattr(args, "n_train", None), getattr(args, "n_test", None)
    kwargs: dict = {}
    if dataset == "synthetic":
        kwargs = dict(n_train=5000 if n_train is None else n_train, n_test=1000 if n_test is None else n_test,
                      label_noise=args.label_noise or 0.0, redundancy=args.redundancy or 0.0,
                      imbalance=1.0 if args.imbalance is None else args.imbalance)
    else:
        kind = dataset.split(":")[0]
        for name in SYNTHETIC_ONLY:
            if getattr(args, name, None) is not None:
                fail("--" + name.replace("_", "-"), f"only the synthetic set has {name.replace('_', ' ')}; "
                     f"{kind} data have what they have")
        size = getattr(args, "image_size", None)
        if dataset.startswith("folder:"):
            kwargs = dict(size=size or 32)
        elif size is not None:
            fail("--image-size", f"only folder: images are resized; {kind} images keep their size")
    if dataset.startswith(("folder:", "beton:")):
        try:  # what the files hold is part of the argument
            data = datasets.load(dataset, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            fail("--dataset", e)
    else:
        data = datasets.load(dataset, **kwargs)  # every option was checked: an error here is a bug
    if dataset != "synthetic" and (n_train is not None or n_test is not None):
        try:
            data = datasets.subset(data, n_train, n_test)
        except ValueError as e:
            fail("--n-train" if "n_train" in str(e) else "--n-test", e)
    return data


def check_plan(command: str, specs: list, n: int, fail: Fail) -> None:
    """Build every run's sampler once before training starts, so a combination the Sampler
    refuses (its ``ValueError``) is an argument error now, not a traceback hours later."""
    from .train import make_sampler
    seen = set()
    for spec in specs:
        key = (spec.policy, spec.budget, spec.time_budget)
        if key in seen:
            continue
        seen.add(key)
        try:
            make_sampler(spec, n)
        except ValueError as e:
            what = "--time-budget" if spec.time_budget is not None else (
                "--budget" if command == "run" else "--budgets")
            fail(f"--policies/{what}", f"policy {spec.policy} at {spec.label}: {e}")


def compare(args: argparse.Namespace, argv: List[str], budgets: List[float], time_budget: Optional[float],
            dataset: str, fail: Fail) -> int:
    """``fastsel run``/``compare``: train every run, print the table and verdict, save."""
    from . import compare as cmp
    data = load_data(args, dataset, fail)
    specs = cmp.plan(args.policies, budgets, range(args.seeds), args.epochs, time_budget,
                     baseline=args.baseline, batch_size=args.batch_size, lr=args.lr, backend=args.backend,
                     device=args.device)
    check_plan(args.command, specs, len(data.train), fail)
    results = cmp.run(data, specs, show_progress=not args.no_progress)
    meta = {"command": "fastsel " + " ".join(shlex.quote(a) for a in argv),
            "dataset": f"{data.name} {data.info}" if data.info else data.name, "baseline": args.baseline,
            "warm_up": True}
    cmp.save(results, args.out, meta)
    runs = [r.to_dict() for r in results]
    rows = cmp.aggregate(runs, args.baseline)
    from ..machine import machine
    m = machine()
    print(f"\n{data.name}: {len(data.train)} train / {len(data.test)} test images, small CNN, "
          f"{args.epochs} epochs of full training, {args.seeds} seed(s); {m['cpu']}, torch {m['torch']}, "
          f"{m['threads']} threads")
    print(cmp.format_table(rows))
    print(cmp.verdict(rows, runs))
    print(f"results, report and plots in {args.out}/")
    return 0


def bench(args: argparse.Namespace, argv: List[str], check_backend: Callable[[str], None], fail: Fail) -> int:
    """``fastsel bench``: the step and selection table, then the loss-call table."""
    from . import bench as b
    if args.full and args.loss_only:
        fail("--full", "--full sizes the step and selection grid, which --loss-only skips: give one")
    names = args.backends
    for name in names or ():
        check_backend(name)
    t = args.min_run_time
    rows = [] if args.loss_only else b.run_all(args.device, names, quick=not args.full, min_run_time=t)
    loss_rows = b.run_loss_cost(args.device, names, min_run_time=t)
    if rows:
        print(b.format_results(rows) + "\n")
    print(b.format_loss_cost(loss_rows))
    if args.out:
        b.save(rows + loss_rows, args.out, "fastsel " + " ".join(shlex.quote(a) for a in argv))
    return 0
