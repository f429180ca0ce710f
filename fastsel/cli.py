"""The ``fastsel`` command line (also ``python -m fastsel``): run, compare, bench, report,
backends.

Every argument is checked before any work starts: by its argparse ``type`` (a value on its
own) or, for what depends on other arguments or on this machine (a backend on the device,
a dataset's files, a results folder's contents), right after parsing. Any such error is
argparse's: the subcommand's usage, then one ``fastsel <command>: error: argument ...`` line,
exit status 2, and no traceback. Errors raised later, while training or timing, are bugs
and keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, Callable, List, NoReturn, Optional

from .experiments.compare import DEFAULT_BUDGETS, baselines, default_baseline, default_policies


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
_redundancy = _number(float, lambda v: 0.0 <= v < 1.0,
                      "redundancy is the share of near-copies in the training set, a number in [0, 1)")
_lr = _number(float, lambda v: v > 0 and math.isfinite(v), "the learning rate must be a finite number > 0")
#: The small CNN pools twice: a side of 1 pixel leaves nothing to pool.
_image_size = _number(int, lambda v: v >= 2, "expected an image side of at least 2 pixels")
#: ``datasets.synthetic`` draws this many classes: each needs a training image.
SYNTHETIC_CLASSES = 10


def _budgets(text: str) -> List[float]:
    return [_budget(t) for t in text.split(",") if t.strip()] or [_budget(text)]


def _policies(text: str) -> List[str]:
    """Epoch-level policies (the Sampler's) and batch-level ones (SelectiveStep's)."""
    from .batch_policies import BATCH_POLICIES
    from .policies import POLICIES
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES and p not in BATCH_POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {bad or text!r}; choose from {sorted(POLICIES)} "
                                         f"(epoch level) or {sorted(BATCH_POLICIES)} (batch level)")
    return names


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _backend(text: str) -> str:
    """A backend name fastsel knows, or ``auto`` (whether it runs here is checked after parsing)."""
    from .backends import check_backend_name
    try:
        check_backend_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(_one_line(e)) from None
    return text


def _backend_list(text: str) -> List[str]:
    """``bench --backends``: comma-separated backend names (not ``auto``: leave the option
    out to time every available one)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated backend names, got {text!r}")
    for name in names:
        if name == "auto":
            raise argparse.ArgumentTypeError("name backends (leave --backends out to time every available "
                                             "one), got 'auto'")
        _backend(name)
    return names


def _device(text: str) -> str:
    """``cpu``, or ``cuda``/``cuda:N`` where torch sees that GPU."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"no CUDA device is visible here (torch {torch.__version__}, "
                                             f"CUDA build: {torch.version.cuda or 'no'}), got {text!r}")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"torch sees {count} CUDA device(s) here, got {text!r}")
    return text


def _existing_parent(path: str) -> str:
    """The nearest folder at or above ``path`` that exists."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def _writable_from(path: str, text: str) -> None:
    """``path`` is created under its nearest existing ancestor: that must be a writable folder."""
    base = _existing_parent(path)
    if not os.path.isdir(base):
        raise argparse.ArgumentTypeError(f"{base!r} is a file, so {text!r} cannot be created under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write under {base!r} (no permission), got {text!r}")


def _out_dir(text: str) -> str:
    """A results folder: an existing folder, or one that can be created."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    _writable_from(text, text)
    return text


def _out_file(text: str) -> str:
    """A JSON file to write: not a folder, and its folder exists or can be created."""
    if not text or text.endswith(os.sep):
        raise argparse.ArgumentTypeError(f"expected a file name, got {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file in it")
    _writable_from(os.path.dirname(os.path.abspath(text)), text)
    return text


def _results_dir(text: str) -> str:
    """A folder written by ``fastsel compare``/``run`` (its contents are read after parsing)."""
    if not os.path.isdir(text):
        what = "is a file, not a folder" if os.path.exists(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}")
    if not os.path.isfile(os.path.join(text, "results.json")):
        raise argparse.ArgumentTypeError(f"no results.json in {text!r}: run `fastsel compare --out {text}` first")
    return text


def _dataset(text: str) -> str:
    if text in ("digits", "synthetic"):
        return text
    if text.startswith("folder:"):
        root = text[len("folder:"):]
        if not root:
            raise argparse.ArgumentTypeError("folder: needs a path, e.g. folder:data/images")
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise argparse.ArgumentTypeError(f"image folder {root!r} {what}")
        return text
    if text.startswith("beton:"):
        paths = text[len("beton:"):].split(",")
        if len(paths) > 2 or not all(paths):
            raise argparse.ArgumentTypeError(f"expected beton:PATH or beton:PATH,TEST_PATH, got {text!r}")
        for path in paths:
            if not os.path.isfile(path):
                what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
                raise argparse.ArgumentTypeError(f".beton {path!r} {what}")
        import importlib.util
        if importlib.util.find_spec("ffcv") is None:
            raise argparse.ArgumentTypeError("beton: datasets are read with FFCV, which is not installed "
                                             "(see the README's install commands)")
        return text
    raise argparse.ArgumentTypeError(
        f"dataset must be digits, synthetic, folder:PATH or beton:PATH[,TEST_PATH], got {text!r}")


def _training_args(p: argparse.ArgumentParser, epochs: int, seeds: int) -> None:
    p.add_argument("--policies", type=_policies, default=default_policies(),
                   help=f"comma-separated (default {','.join(default_policies())}); epoch-level, or "
                        "batch-level sb, osgd, sift (SelectiveStep, at the same backward passes)")
    p.add_argument("--baseline", choices=baselines(), default=default_baseline(),
                   help=f"the policy every gap and verdict is measured against, always run "
                        f"(default {default_baseline()})")
    p.add_argument("--epochs", type=_positive, default=epochs, help=f"epochs of full training (default {epochs})")
    p.add_argument("--seeds", type=_positive, default=seeds, help=f"seeds per setting (default {seeds})")
    p.add_argument("--batch-size", type=_positive, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=_lr, default=0.05, help="initial learning rate (default 0.05)")
    p.add_argument("--backend", type=_backend, default="auto",
                   help="fastsel backend that runs on --device (default auto)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="where the models, batches and per-sample state live: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="fastsel", description="Budgeted training by data-loader-level sample selection.")
    p.add_argument("--version", action="version", version=f"fastsel {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the main job: full training vs policies at one budget on digits",
                         description="Train a small CNN on scikit-learn's real digits images with full data "
                                     "and with each policy at the same budget (SGD + BudgetLR, same recipe), "
                                     "and print test accuracy, wall time and passes saved.")
    run.add_argument("--budget", type=_budget, default=0.3, help="fraction of full training (default 0.3)")
    run.add_argument("--out", type=_out_dir, default="results/run", help="results folder (default results/run)")
    _training_args(run, epochs=30, seeds=3)

    cmp_ = sub.add_parser("compare", help="policies x budgets x seeds, with full training and uniform",
                          description="Compare policies at several budgets (or at one time budget) over "
                                      "several seeds, always with full training and the uniform + linear-LR "
                                      "baseline; writes results.json, results.md and PNG plots.")
    cmp_.add_argument("--dataset", type=_dataset, default="digits",
                      help="digits (default), synthetic, folder:PATH, or beton:PATH[,TEST_PATH]")
    cmp_.add_argument("--budgets", type=_budgets, default=None,
                      help="comma-separated fractions (default 0.2,0.3,0.5); not with --time-budget")
    cmp_.add_argument("--time-budget", type=_seconds, default=None,
                      help="compare at this many wall-clock seconds per run instead of fraction budgets")
    cmp_.add_argument("--n-train", type=_positive, default=None,
                      help=f"synthetic: training images drawn, at least {SYNTHETIC_CLASSES} (default 5000); "
                           "other data: a seeded subset of this many training images (default all)")
    cmp_.add_argument("--n-test", type=_positive, default=None,
                      help="synthetic: test images drawn (default 1000); other data: a seeded subset (default all)")
    cmp_.add_argument("--label-noise", type=_share, default=None, help="synthetic: share of flipped training labels")
    cmp_.add_argument("--redundancy", type=_redundancy, default=None,
                      help="synthetic: share of training images that are near-copies of a few easy ones (default 0)")
    cmp_.add_argument("--imbalance", type=_imbalance, default=None,
                      help="synthetic: rarest/most frequent class ratio (default 1.0, balanced)")
    cmp_.add_argument("--image-size", type=_image_size, default=None,
                      help="folder: resize images to this size (default 32)")
    cmp_.add_argument("--out", type=_out_dir, default="results/compare",
                      help="results folder (default results/compare)")
    _training_args(cmp_, epochs=20, seeds=3)

    bench = sub.add_parser("bench", help="micro-benchmarks of the fused step, the selection and the loss call",
                           description="Time the fused step and the selection of every available backend "
                                       "against plain PyTorch in the same run, and what a user pays per "
                                       "loss call: sampler.loss + backward against bare F.cross_entropy + "
                                       "backward (host and device time); print the ratios.")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    bench.add_argument("--backends", type=_backend_list, default=None,
                       help="comma-separated backend names (default: every available one)")
    bench.add_argument("--full", action="store_true", help="the full size grid (default: a quick one)")
    bench.add_argument("--loss-only", action="store_true", help="only the loss-call table")
    bench.add_argument("--min-run-time", type=_seconds, default=0.3,
                       help="seconds of timing per measured side (default 0.3)")
    bench.add_argument("--out", type=_out_file, default=None, help="also write the results as JSON here")

    rep = sub.add_parser("report", help="markdown report and plots from a saved results folder",
                         description="Re-render results.md and the PNG plots from RESULTS_DIR/results.json.")
    rep.add_argument("results_dir", type=_results_dir, help="a folder written by fastsel compare or fastsel run")

    back = sub.add_parser("backends", help="list the backends and why any is unavailable")
    for name, sp in (("run", run), ("compare", cmp_), ("bench", bench), ("report", rep), ("backends", back)):
        sp.set_defaults(_parser=sp)
    return p


def _fail(args: argparse.Namespace, argument: str, message: object) -> NoReturn:
    """An argument error found after parsing, reported as argparse reports its own: the
    subcommand's usage, then ``fastsel <command>: error: argument <argument>: ...`` on one
    line, exit status 2."""
    args._parser.error(f"argument {argument}: {_one_line(message)}")


def _check_backend(args: argparse.Namespace, argument: str, name: str, device: str) -> None:
    """``name`` loads here and runs on ``device`` (``auto`` always finds the reference one)."""
    if name == "auto":
        return
    from .backends import get_backend
    try:
        get_backend(name, device)
    except (RuntimeError, ValueError) as e:  # not available here / not on this device
        _fail(args, argument, e)


def _check_training_args(args: argparse.Namespace) -> None:
    """``run``/``compare``: what depends on more than one argument or on this machine."""
    _check_backend(args, "--backend", args.backend, args.device)
    if args.command != "compare":
        return
    if args.time_budget is not None and args.budgets is not None:
        _fail(args, "--budgets", "fraction budgets and --time-budget exclude each other: give one")
    if args.dataset == "synthetic" and args.n_train is not None and args.n_train < SYNTHETIC_CLASSES:
        _fail(args, "--n-train", f"synthetic data has {SYNTHETIC_CLASSES} classes, so it needs at least "
                                 f"{SYNTHETIC_CLASSES} training images, got {args.n_train}")


def _devices_here() -> List[str]:
    """The device types this machine can run on now."""
    import torch
    here = ["cpu"]
    if torch.cuda.is_available():
        here.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        here.append("mps")
    return here


def backend_lines() -> Dict[str, str]:
    """One plain line per backend: whether it runs on this machine, and if not, what it
    needs that the machine lacks (a GPU first, since that is what a user can act on)."""
    from .backends import _load, list_backends
    here = _devices_here()
    out = {}
    for name, status in list_backends().items():
        b = _load(name)
        if b is not None:
            usable = [d for d in b.devices if d in here]
            others = [d for d in b.devices if d not in here]
            if usable:
                more = f"; also {', '.join(others)} where present" if others else ""
                out[name] = f"usable here on {', '.join(usable)}{more}"
            else:
                out[name] = (f"not usable here: it needs a GPU ({', '.join(b.devices)}) and this machine has "
                             f"none visible" + ("; on the CPU it runs only under TRITON_INTERPRET=1, for tests"
                                                if name == "triton" else ""))
        elif name == "cuda" and "cuda" not in here:
            out[name] = f"not usable here: it needs an NVIDIA GPU and this machine has none visible ({status})"
        else:
            out[name] = f"not usable here: {status}"
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns 0. An argument error exits with status 2 (``SystemExit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # argparse would name the top-level parser: name the subcommand instead
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .experiments import jobs

    def fail(argument: str, message: object) -> NoReturn:
        _fail(args, argument, message)
    if args.command == "backends":
        for name, line in backend_lines().items():
            print(f"{name:<10} {line}")
        return 0
    if args.command == "run":
        _check_training_args(args)
        return jobs.compare(args, argv, [args.budget], None, "digits", fail)
    if args.command == "compare":
        _check_training_args(args)
        budgets = list(DEFAULT_BUDGETS) if args.budgets is None else args.budgets
        return jobs.compare(args, argv, budgets, args.time_budget, args.dataset, fail)
    if args.command == "report":
        from .experiments.report import load_results, write_report
        try:  # what results.json holds is part of the argument
            load_results(args.results_dir)
        except json.JSONDecodeError as e:
            _fail(args, "results_dir", f"{os.path.join(args.results_dir, 'results.json')!r} is not JSON: {e}")
        except (FileNotFoundError, ValueError) as e:
            _fail(args, "results_dir", e)
        path = write_report(args.results_dir)
        print(open(path).read())
        return 0
    return jobs.bench(args, argv, lambda name: _check_backend(args, "--backends", name, args.device), fail)


if __name__ == "__main__":
    sys.exit(main())
