"""The ``fastsel`` command line (also ``python -m fastsel``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _budget(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < b <= 1.0:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return b


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _policies(text: str) -> List[str]:
    from .policies import POLICIES
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {bad or text!r}; choose from {sorted(POLICIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsel", description="Budgeted training by sample selection.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job: full training vs policies at one budget on digits",
                         description="Train a small CNN on scikit-learn's digits with full data and "
                                     "with each policy at the same budget (SGD + BudgetLR), and "
                                     "print test accuracy, wall time and passes saved.")
    run.add_argument("--budget", type=_budget, default=0.3, help="fraction of full training (default 0.3)")
    run.add_argument("--epochs", type=_positive, default=30, help="epochs of full training (default 30)")
    run.add_argument("--policies", type=_policies, default=None,
                     help="comma-separated (default uniform,p-sgd,tftb,infobatch)")
    run.add_argument("--seeds", type=_positive, default=3, help="seeds per run (default 3)")
    run.add_argument("--batch-size", type=_positive, default=32)
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("backends", help="list the backends and why any is unavailable")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        from . import backends
        for name, status in backends().items():
            print(f"{name:<10} {status}")
        return 0
    from .job import DEFAULT_POLICIES, format_table, run_job
    import torch
    results = run_job(policies=args.policies or DEFAULT_POLICIES, budget=args.budget,
                      epochs=args.epochs, seeds=range(args.seeds), batch_size=args.batch_size,
                      show_progress=not args.no_progress)
    print(f"\nsmall CNN on scikit-learn digits, {args.epochs} epochs of full training, "
          f"budget {args.budget}, {args.seeds} seed(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
