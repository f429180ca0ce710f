"""The ``fastsel`` command line (also ``python -m fastsel``): run, compare, bench, report,
backends."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, List, Optional

from .compare import DEFAULT_BUDGETS, DEFAULT_POLICIES


def _number(cast: type, ok: Callable[[float], bool], expect: str) -> Callable[[str], float]:
    """An argparse type: ``cast(text)`` that must satisfy ``ok``; the error says ``expect``."""
    def parse(text: str) -> float:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expect}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{expect}, got {text}")
        return v
    return parse


_budget = _number(float, lambda v: 0.0 < v <= 1.0, "budget must be a number in (0, 1]")
_positive = _number(int, lambda v: v >= 1, "expected a positive integer")
_seconds = _number(float, lambda v: v > 0 and v != float("inf"), "a time budget must be a number of seconds > 0")
_share = _number(float, lambda v: 0.0 <= v < 1.0, "expected a share in [0, 1)")
_imbalance = _number(float, lambda v: 0.0 < v <= 1.0,
                     "imbalance is the rarest/most frequent class ratio, a number in (0, 1]")


def _budgets(text: str) -> List[float]:
    return [_budget(t) for t in text.split(",") if t.strip()] or [_budget(text)]


def _policies(text: str) -> List[str]:
    from .policies import POLICIES
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {bad or text!r}; choose from {sorted(POLICIES)}")
    return names


def _dataset(text: str) -> str:
    if text in ("digits", "synthetic") or text.startswith(("folder:", "beton:")):
        return text
    raise argparse.ArgumentTypeError(
        f"dataset must be digits, synthetic, folder:PATH or beton:PATH[,TEST_PATH], got {text!r}")


def _training_args(p: argparse.ArgumentParser, epochs: int, seeds: int) -> None:
    p.add_argument("--epochs", type=_positive, default=epochs, help=f"epochs of full training (default {epochs})")
    p.add_argument("--seeds", type=_positive, default=seeds, help=f"seeds per setting (default {seeds})")
    p.add_argument("--batch-size", type=_positive, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate (default 0.05)")
    p.add_argument("--backend", default="auto", help="fastsel backend (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsel", description="Budgeted training by data-loader-level sample selection.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the main job: full training vs policies at one budget on digits",
                         description="Train a small CNN on scikit-learn's real digits images with full data "
                                     "and with each policy at the same budget (SGD + BudgetLR, same recipe), "
                                     "and print test accuracy, wall time and passes saved.")
    run.add_argument("--budget", type=_budget, default=0.3, help="fraction of full training (default 0.3)")
    run.add_argument("--policies", type=_policies, default=list(DEFAULT_POLICIES),
                     help="comma-separated (default uniform,p-sgd,tftb,infobatch)")
    run.add_argument("--out", default="results/run", help="results folder (default results/run)")
    _training_args(run, epochs=30, seeds=3)

    cmp_ = sub.add_parser("compare", help="policies x budgets x seeds, with full training and uniform",
                          description="Compare policies at several budgets (or at one time budget) over "
                                      "several seeds, always with full training and the uniform + linear-LR "
                                      "baseline; writes results.json, results.md and PNG plots.")
    cmp_.add_argument("--dataset", type=_dataset, default="digits",
                      help="digits (default), synthetic, folder:PATH, or beton:PATH[,TEST_PATH]")
    cmp_.add_argument("--policies", type=_policies, default=list(DEFAULT_POLICIES),
                      help="comma-separated (uniform and full training are always included)")
    cmp_.add_argument("--budgets", type=_budgets, default=list(DEFAULT_BUDGETS),
                      help="comma-separated fractions (default 0.2,0.3,0.5)")
    cmp_.add_argument("--time-budget", type=_seconds, default=None,
                      help="compare at this many wall-clock seconds per run instead of fraction budgets")
    cmp_.add_argument("--n-train", type=_positive, default=5000, help="synthetic: training images (default 5000)")
    cmp_.add_argument("--n-test", type=_positive, default=1000, help="synthetic: test images (default 1000)")
    cmp_.add_argument("--label-noise", type=_share, default=0.0, help="synthetic: share of flipped training labels")
    cmp_.add_argument("--imbalance", type=_imbalance, default=1.0,
                      help="synthetic: rarest/most frequent class ratio (default 1.0, balanced)")
    cmp_.add_argument("--image-size", type=_positive, default=32, help="folder: resize images to this size")
    cmp_.add_argument("--out", default="results/compare", help="results folder (default results/compare)")
    _training_args(cmp_, epochs=20, seeds=3)

    bench = sub.add_parser("bench", help="micro-benchmarks of the fused step, the selection and the loss call",
                           description="Time the fused step and the selection of every available backend "
                                       "against plain PyTorch in the same run, and what a user pays per "
                                       "loss call: sampler.loss + backward against bare F.cross_entropy + "
                                       "backward (host and device time); print the ratios.")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bench.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    bench.add_argument("--full", action="store_true", help="the full size grid (default: a quick one)")
    bench.add_argument("--loss-only", action="store_true", help="only the loss-call table")
    bench.add_argument("--min-run-time", type=_seconds, default=0.3,
                       help="seconds of timing per measured side (default 0.3)")
    bench.add_argument("--out", default=None, help="also write the results as JSON here")

    rep = sub.add_parser("report", help="markdown report and plots from a saved results folder",
                         description="Re-render results.md and the PNG plots from RESULTS_DIR/results.json.")
    rep.add_argument("results_dir", help="a folder written by fastsel compare or fastsel run")

    sub.add_parser("backends", help="list the backends and why any is unavailable")
    return p


def _compare(args: argparse.Namespace, argv: List[str], policies: List[str], budgets: List[float],
             time_budget: Optional[float], dataset: str) -> int:
    from . import compare, datasets
    kwargs = {}
    if dataset == "synthetic":
        kwargs = dict(n_train=args.n_train, n_test=args.n_test, label_noise=args.label_noise,
                      imbalance=args.imbalance)
    elif dataset.startswith("folder:"):
        kwargs = dict(size=args.image_size)
    try:
        data = datasets.load(dataset, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastsel: error: {e}", file=sys.stderr)
        return 2
    specs = compare.plan(policies, budgets, range(args.seeds), args.epochs, time_budget,
                         batch_size=args.batch_size, lr=args.lr, backend=args.backend)
    results = compare.run(data, specs, show_progress=not args.no_progress)
    meta = {"command": "fastsel " + " ".join(shlex.quote(a) for a in argv),
            "dataset": f"{data.name} {data.info}" if data.info else data.name}
    compare.save(results, args.out, meta)
    runs = [r.to_dict() for r in results]
    rows = compare.aggregate(runs)
    from .machine import machine
    m = machine()
    print(f"\n{data.name}: {len(data.train)} train / {len(data.test)} test images, small CNN, "
          f"{args.epochs} epochs of full training, {args.seeds} seed(s); {m['cpu']}, torch {m['torch']}, "
          f"{m['threads']} threads")
    print(compare.format_table(rows))
    print(compare.verdict(rows, runs))
    print(f"results, report and plots in {args.out}/")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        from .backends import list_backends
        for name, status in list_backends().items():
            print(f"{name:<10} {status}")
        return 0
    if args.command == "run":
        return _compare(args, argv, args.policies, [args.budget], None, "digits")
    if args.command == "compare":
        return _compare(args, argv, args.policies, args.budgets, args.time_budget, args.dataset)
    if args.command == "report":
        from .report import write_report
        try:
            path = write_report(args.results_dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"fastsel: error: {e}", file=sys.stderr)
            return 2
        print(open(path).read())
        return 0
    return _bench(args, argv)


def _bench(args: argparse.Namespace, argv: List[str]) -> int:
    """``fastsel bench``: the step and selection table, then the loss-call table."""
    from . import bench
    names = args.backends.split(",") if args.backends else None
    t = args.min_run_time
    try:
        rows = [] if args.loss_only else bench.run_all(args.device, names, quick=not args.full, min_run_time=t)
        loss_rows = bench.run_loss_cost(args.device, names, min_run_time=t)
    except (ValueError, RuntimeError) as e:
        print(f"fastsel: error: {e}", file=sys.stderr)
        return 2
    if rows:
        print(bench.format_results(rows) + "\n")
    print(bench.format_loss_cost(loss_rows))
    if args.out:
        bench.save(rows + loss_rows, args.out, "fastsel " + " ".join(shlex.quote(a) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
