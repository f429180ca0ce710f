"""One budgeted training run with a fixed recipe: the unit every comparison is made of.

The recipe (SGD with momentum, ``BudgetLR``'s linear decay, the same model and batch size)
is the same for full training and for every policy, so a table compares policies only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ..indexed import with_indices
from ..policies.rho import IrreducibleFit, fit_irreducible
from ..sampler import Sampler
from ..selective import SelectiveStep
from ..schedule import BudgetLR
from ..validation.values import check_int
from .stats import FORWARD_SHARE, passes_saved
from .tables import BATCH_LEVEL


def conv_bn(cin: int, cout: int) -> List[nn.Module]:
    """3×3 conv, BatchNorm, ReLU: BatchNorm keeps every seed out of the chance-level plateau
    plain SGD can sit on with un-normalised inputs."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Conv blocks halving the resolution down to 4×4, then a linear head: small enough for a
    CPU, big enough to separate digits or CIFAR-shaped classes."""

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 8, width: int = 16) -> None:
        super().__init__()
        layers: List[nn.Module] = conv_bn(channels, width) + conv_bn(width, 2 * width) + [nn.MaxPool2d(2)]
        s = size // 2
        while s > 4:
            layers += conv_bn(2 * width, 2 * width) + [nn.MaxPool2d(2)]
            s //= 2
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(2 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 1024,
             device: Union[str, torch.device] = "cpu") -> float:
    model.eval()
    x, y = data.tensors
    correct = sum(int((model(x[i:i + batch_size].to(device)).argmax(1) == y[i:i + batch_size].to(device)).sum())
                  for i in range(0, len(y), batch_size))
    model.train()
    return correct / len(y)


@dataclass
class RunSpec:
    """One run: ``policy="full"`` is full training (uniform at budget 1.0, or all data each
    epoch under a time budget).

    ``device``: where the model, its batches and the sampler's state live ("cpu",
    "cuda", "cuda:1"). ``holdout``, ``holdout_epochs``: ``rho`` only, see :func:`rho_plan`.
    """

    policy: str
    budget: Optional[float] = None
    time_budget: Optional[float] = None
    epochs: int = 30
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backend: str = "auto"
    policy_kwargs: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    holdout: float = 0.1
    holdout_epochs: Optional[int] = None

    @property
    def label(self) -> str:
        return f"{self.time_budget:g}s" if self.time_budget is not None else f"{self.budget:g}"


@dataclass
class RunResult:
    spec: Dict[str, Any]
    policy: str
    budget: str
    seed: int
    accuracy: float
    wall_s: float
    selection_s: float
    forward: int
    backward: int
    passes_full: int
    epochs_run: int
    selection_counts: List[int]
    entropy: float
    test_size: int = 0
    #: ``rho``: the irreducible-loss model's cost, already included in wall_s, forward and
    #: backward (see :func:`rho_plan`); 0 for every other policy.
    holdout_s: float = 0.0
    holdout_forward: int = 0
    holdout_backward: int = 0

    @property
    def passes_saved(self) -> float:
        """``stats.passes_saved``: every pass counted, a forward-only one at 1/3."""
        return passes_saved(self.to_dict())

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RhoPlan:
    """How a ``rho`` run spends its budget (from :func:`rho_plan`)."""

    n_holdout: int           # samples split off the training set for the irreducible model
    n_train: int             # samples rho selects from and trains on (the rest)
    holdout_epochs: int      # epochs the irreducible model trains on the holdout
    holdout_passes: int      # its forward+backward passes: holdout_epochs · n_holdout
    eval_passes: int         # its forward-only passes over rho's training samples: n_train
    budget: Optional[float]  # the fraction budget left to rho's sampler over n_train samples


def holdout_split(n: int, share: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, holdout indices): a seeded random ``share`` of ``n`` samples held out
    (at least 1, leaving at least 1), each part in increasing order."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"holdout must be a share in (0, 1), got holdout={share}")
    if n < 2:
        raise ValueError(f"rho needs at least 2 training samples to hold one out, got {n}")
    n_hold = min(n - 1, max(1, int(share * n + 0.5)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def rho_plan(spec: RunSpec, n: int) -> RhoPlan:
    """What a ``rho`` run of ``spec`` on a training set of ``n`` samples trains, and what it
    is charged. The rules, all fixed before training starts:

    * a seeded share ``spec.holdout`` (default 10%) of the training set is held out: rho
      trains on the rest only (so its data are 90% of everyone else's);
    * the irreducible-loss model (the same SmallCNN and recipe: SGD with momentum, linear
      decay to 0) trains on the holdout for ``spec.holdout_epochs`` epochs, by default T,
      the epochs of full training — full training of the holdout, the paper's converged
      model, which costs the holdout's share of full training (10%) — then evaluates once
      on rho's training samples (forward only);
    * under a fraction budget B, rho's total is the same as every other policy's,
      B·N·T passes over the whole training set: the holdout model's forward+backward
      passes count in full and its forward-only passes as ``FORWARD_SHARE`` (1/3) of a
      pass each, and what is left is rho's sampler budget over its n_train samples,
      B' = (B·N·T − holdout passes − eval passes/3) / (n_train·T). A ValueError if
      nothing is left. Under a time budget the holdout model's wall time is taken off
      rho's seconds instead (``train_one``).
    """
    if spec.policy != "rho":
        raise ValueError(f"rho_plan is for policy='rho', got {spec.policy!r}")
    train_idx, hold_idx = holdout_split(n, spec.holdout, spec.seed)
    n_hold, n_train = len(hold_idx), len(train_idx)
    if spec.holdout_epochs is not None:
        epochs = check_int("holdout_epochs", spec.holdout_epochs, lo=1)
    else:
        epochs = spec.epochs
    hold_passes, eval_passes = epochs * n_hold, n_train
    budget = None
    if spec.time_budget is None:
        total = spec.budget * n * spec.epochs
        left = total - hold_passes - FORWARD_SHARE * eval_passes
        if left <= 0:
            raise ValueError(f"rho's irreducible-loss model costs {hold_passes + FORWARD_SHARE * eval_passes:g} "
                             f"of the budget's {total:g} passes: nothing is left to train on (lower "
                             "holdout or holdout_epochs, or raise the budget)")
        budget = min(1.0, left / (n_train * spec.epochs))
    return RhoPlan(n_holdout=n_hold, n_train=n_train, holdout_epochs=epochs, holdout_passes=hold_passes,
                   eval_passes=eval_passes, budget=budget)


def make_sampler(spec: RunSpec, data: Any, irreducible: Optional[torch.Tensor] = None,
                 spent_s: float = 0.0) -> Sampler:
    """The run's sampler over ``data`` (a dataset or its size N). A batch-level policy's
    (``make_step``) is uniform at budget 1.0: every sample every epoch.

    ``rho``: ``data`` is the whole training set (or N) and the sampler covers the
    ``rho_plan(spec, N).n_train`` samples left after the holdout, at the plan's budget (a
    time budget less ``spent_s``, the seconds the irreducible model took). ``irreducible``:
    their irreducible losses; a size N alone (no data) gets a zero stand-in, so that a plan
    can be checked before any model is trained.
    """
    batch_level = spec.policy in BATCH_LEVEL
    name = "uniform" if spec.policy == "full" or batch_level else spec.policy
    kw = {} if batch_level else dict(spec.policy_kwargs)
    n = data if isinstance(data, int) else len(data)
    budget = 1.0 if spec.policy == "full" or batch_level else spec.budget
    if batch_level and spec.time_budget is not None:
        raise ValueError(f"{spec.policy} is batch-level: its budget is the share of each batch that gets "
                         "the backward pass, so it runs at fraction budgets only")
    time_budget = spec.time_budget
    if spec.policy == "rho" and "irreducible" not in kw:
        plan = rho_plan(spec, n)
        if irreducible is None:
            if not isinstance(data, int):
                raise ValueError("rho needs the irreducible losses of its training samples (train_one "
                                 "computes them from the holdout): pass irreducible=")
            irreducible = torch.zeros(plan.n_train)
        kw["irreducible"] = irreducible
        data = plan.n_train
        budget = plan.budget
        if time_budget is not None:
            time_budget = max(1e-9, time_budget - spent_s)
    dev = None if spec.device == "cpu" else spec.device  # on the CPU the state follows the logits, as before
    if time_budget is not None:
        return Sampler(data, policy=name, time_budget=time_budget, seed=spec.seed,
                       backend=spec.backend, device=dev, **kw)
    return Sampler(data, policy=name, budget=budget, epochs=spec.epochs, seed=spec.seed,
                   backend=spec.backend, device=dev, **kw)


def fit_rho_holdout(spec: RunSpec, train: TensorDataset, channels: int, size: int,
                    classes: int) -> Tuple[TensorDataset, IrreducibleFit]:
    """``rho``'s holdout step: split ``rho_plan``'s holdout off ``train``, train the
    irreducible-loss model on it (SmallCNN, the run's recipe) and evaluate it on the rest.
    Returns (the rest, the fit)."""
    plan = rho_plan(spec, len(train))
    train_idx, hold_idx = holdout_split(len(train), spec.holdout, spec.seed)
    x, y = train.tensors[0], train.tensors[1]
    rest, hold = TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[hold_idx], y[hold_idx])
    fit = fit_irreducible(lambda: SmallCNN(channels, classes, size), hold, rest, epochs=plan.holdout_epochs,
                          batch_size=spec.batch_size, lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay, device=spec.device, seed=spec.seed)
    return rest, fit


def make_step(spec: RunSpec, model: nn.Module, opt: torch.optim.Optimizer, sched: BudgetLR,
              sampler: Sampler) -> SelectiveStep:
    """A batch-level run's step at a matched backward budget: ``keep`` = the budget, so a
    share B of each batch gets the backward pass (B·N·T backward passes, as an epoch-level
    policy at budget B), the selection forward running on every sample. OSGD keeps that
    share all run (``schedule=None``: its accuracy schedule would shrink it), SIFT's exit
    sits after the first pooling (``sift_exit``) and probes nothing (``probe_every=0``)."""
    kw: Dict[str, Any] = {"osgd": {"schedule": None},
                          "sift": {"module": sift_exit(model), "probe_every": 0}}.get(spec.policy, {})
    kw.update(spec.policy_kwargs)
    return SelectiveStep(model, spec.policy, keep=spec.budget, optimizer=opt, scheduler=sched,
                         sampler=sampler, seed=spec.seed, **kw)


def sift_exit(model: nn.Module) -> str:
    """SIFT's exit module in a SmallCNN: the first MaxPool2d (after two conv blocks)."""
    return next(name for name, m in model.named_modules() if isinstance(m, nn.MaxPool2d))


def train_one(spec: RunSpec, train: TensorDataset, test: TensorDataset, channels: int, size: int,
              classes: int, progress: Optional[Any] = None) -> RunResult:
    """Train a fresh SmallCNN under ``spec`` and measure it.

    ``rho`` first fits its irreducible-loss model on a holdout split off ``train``
    (``fit_rho_holdout``, ``rho_plan``); the result's wall_s, forward and backward include
    that model's time and passes (also given alone in holdout_s, holdout_forward,
    holdout_backward), and passes_full is full training on the whole of ``train``, as for
    every other policy. A batch-level policy (sb, osgd, sift) trains through ``make_step``:
    forward and backward are the step's counts (selection forwards included, and SIFT's
    forwards to its exit counted as whole ones), selection_counts the backward passes per
    sample, and wall_s includes the selection forwards.
    """
    dev = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    model = SmallCNN(channels, classes, size).to(dev)
    n_full = len(train)
    fit = None
    if spec.policy == "rho" and "irreducible" not in spec.policy_kwargs:
        train, fit = fit_rho_holdout(spec, train, channels, size, classes)
        data = with_indices(train)
        sampler = make_sampler(spec, n_full, irreducible=fit.losses, spent_s=fit.seconds)
    else:
        data = with_indices(train)
        sampler = make_sampler(spec, data)
    loader = DataLoader(data, batch_size=spec.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay)
    sched = BudgetLR(opt, sampler)
    step = make_step(spec, model, opt, sched, sampler) if spec.policy in BATCH_LEVEL else None
    trained = torch.zeros(n_full, dtype=torch.long)
    t0 = time.perf_counter()
    for epoch in sampler.epochs():
        if progress is not None:
            left = (f", {max(0.0, sampler.budget.seconds - sampler.elapsed()):.0f}s left"
                    if spec.time_budget is not None else "")
            progress.set_postfix_str(f"{spec.policy} b={spec.label} seed={spec.seed} "
                                     f"epoch={epoch} kept={len(sampler) / sampler.n:.2f}{left}")
        for x, y, idx in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if step is not None:
                step(x, y, idx.to(dev, non_blocking=True))
                for ids in step.last["trained_indices"]:
                    trained += torch.bincount(ids.long().cpu(), minlength=n_full)
                continue
            loss = sampler.loss(model(x), y, idx.to(dev, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress.update(1)
    if step is not None:
        pending = step.state_dict().get("pending")
        if pending is not None and pending["idx"] is not None:
            trained += torch.bincount(pending["idx"].long(), minlength=n_full)
        step.flush()
    wall = time.perf_counter() - t0
    s = sampler.summary()
    h_s, h_fwd, h_bwd = (fit.seconds, fit.train_passes + fit.eval_passes, fit.train_passes) if fit else (0.0, 0, 0)
    full = s["passes_full_training"] if fit is None else n_full * (
        s["epochs_run"] if spec.time_budget is not None else spec.epochs)
    fwd, bwd, sel_s = s["passes"] + h_fwd, s["passes"] + h_bwd, s["selection_time_s"]
    per_sample = sampler.state.selected.long().cpu()
    if step is not None:
        t = step.summary()
        fwd, bwd = t["forward_passes"] + t["exit_forward"], t["backward_passes"]
        sel_s += t["selection_time_s"]
        per_sample = trained
    return RunResult(spec=asdict(spec), policy=spec.policy, budget=spec.label, seed=spec.seed,
                     accuracy=accuracy(model, test, device=dev), wall_s=wall + h_s,
                     selection_s=sel_s, forward=fwd, backward=bwd, passes_full=full,
                     epochs_run=s["epochs_run"], selection_counts=torch.bincount(per_sample).tolist(),
                     entropy=s["selection_entropy"]["normalized"], test_size=len(test),
                     holdout_s=h_s, holdout_forward=h_fwd, holdout_backward=h_bwd)
