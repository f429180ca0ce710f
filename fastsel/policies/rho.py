"""RHO-LOSS: Mindermann et al., "Prioritized Training on Points that are Learnable, Worth
Learning, and Not Yet Learnt" (ICML 2022), as an epoch-level policy; and the helper that
computes its irreducible losses from a holdout split."""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import rng
from ..validation.values import check_int, check_real, round_half_up
from .base import Policy, Selection, SelectionContext


def check_irreducible(irreducible: Any, n: Optional[int] = None) -> torch.Tensor:
    """``irreducible`` as a float32 CPU copy (never the caller's tensor), or a clear error
    naming the argument: a 1-D floating tensor of finite losses, with ``n`` entries if ``n``
    is given."""
    if not isinstance(irreducible, torch.Tensor):
        raise TypeError("irreducible must be a torch.Tensor of N per-sample losses (one per training "
                        f"sample, e.g. from fastsel.policies.rho.irreducible_losses), got "
                        f"{type(irreducible).__name__}")
    if not irreducible.is_floating_point() or irreducible.is_complex():
        raise ValueError(f"irreducible must be a floating tensor of losses, got dtype {irreducible.dtype}")
    if irreducible.dim() != 1 or irreducible.numel() < 1:
        raise ValueError(f"irreducible must be a 1-D tensor of N per-sample losses, got shape "
                         f"{tuple(irreducible.shape)}")
    if n is not None and irreducible.numel() != n:
        raise ValueError(f"irreducible has {irreducible.numel()} losses but the sampler has N={n} samples: "
                         "pass one irreducible loss per training sample, in the dataset's order")
    t = irreducible.detach().to("cpu", torch.float32, copy=True).contiguous()
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        what = "non-finite" if not math.isfinite(float(irreducible[i])) else "beyond float32's range"
        raise ValueError(f"irreducible must hold finite losses: {int(bad.sum())} entries are {what} "
                         f"(first: index {i} = {float(irreducible[i])})")
    return t


class RHO(Policy):
    """RHO-LOSS (Mindermann et al., ICML 2022): train on the samples whose *reducible* loss is
    highest — the training loss minus the loss of a model trained on holdout data (the
    "irreducible" loss). A mislabelled or ambiguous sample has a high loss under both
    models, so a low reducible loss; an easy or redundant one has a low training loss once
    learnt; what is left is learnable, worth learning and not yet learnt.

    Key per sample: its loss EMA (the sampler's state) − ``irreducible[i]``; the k largest
    are kept (ties to the lower index). The choices the paper leaves open, made here:

    * **epoch level with stale losses.** The paper scores a large candidate batch with a
      fresh forward pass at every step; here the key uses each sample's loss EMA from the
      last time it was trained, at no extra forward pass. Samples not selected keep a stale
      loss, so a share ``explore`` of each epoch's slots (after the unseen samples) is
      drawn uniformly from the seen samples outside the top (as ``tftb`` does), which
      refreshes them; ``explore=0`` is a pure top-k.
    * **samples never trained come first, uniformly at random among them.** A sample never
      trained has no training loss, so no reducible loss. Giving it +inf would rank the
      unseen by index; giving it a prior (say the mean loss EMA of trained samples, minus
      its irreducible loss) ranks the easiest first, and with stale losses that keeps
      retraining near-duplicates (measured: on the redundant synthetic set such a prior
      spent 63–72% of the picks on the 50% near-copies and lost accuracy). The paper
      draws each step's candidates uniformly; so here, while unseen samples remain, they
      take the epoch's slots first, drawn uniformly (the epoch's counter-based uniforms),
      and only the slots left over go to seen samples by key. At budget B the first
      ⌈1/B⌉ epochs thus cover the data once, in random order, and every key is a
      measured loss.

    ``irreducible``: N per-sample losses (a 1-D floating tensor, finite; e.g.
    :func:`irreducible_losses`), in the units of the loss the sampler observes (the
    cross-entropy of ``Sampler.loss``). Without it (None) every irreducible loss is 0 and
    the key is the training loss alone — the paper's "train loss" baseline, not RHO-LOSS;
    that warns. The tensor is configuration, not state: copied at construction (later
    changes to the caller's tensor do not reach the policy), and ``config()`` holds its
    length and a SHA-256 of its float32 bytes, so a checkpoint resumes only under the same
    irreducible losses; the tensor itself is not in the checkpoint (the Sampler is built
    with it again). The policy has no adaptive state:
    ``state_dict()`` is ``{}``. Its length is checked against N at the first selection.
    ``explore``: share of the non-unseen slots drawn uniformly from outside the top.
    ``keep``: share of samples per epoch under a time budget.
    """

    name = "rho"
    uses_mean_loss = False

    def __init__(self, irreducible: Optional[torch.Tensor] = None, explore: float = 0.1,
                 keep: float = 1.0) -> None:
        super().__init__(keep)
        self.explore = check_real("explore", explore, 0.0, 1.0, what="a number")
        if irreducible is None:
            warnings.warn("fastsel: policy='rho' without irreducible=: every irreducible loss is 0, so the key "
                          "is the training loss alone (no holdout model); pass irreducible="
                          "fastsel.policies.rho.irreducible_losses(...)", UserWarning, stacklevel=5)
            self.irreducible: Optional[torch.Tensor] = None
            self._digest = None
        else:
            self.irreducible = check_irreducible(irreducible)
            self._digest = hashlib.sha256(self.irreducible.numpy().tobytes()).hexdigest()
        self._on: Dict[tuple, torch.Tensor] = {}

    def _irreducible_on(self, device: torch.device, n: int) -> torch.Tensor:
        """The irreducible losses on ``device`` (copied there once)."""
        t = self._on.get((device, n))
        if t is None:
            src = torch.zeros(n) if self.irreducible is None else self.irreducible
            t = self._on[(device, n)] = src.to(device)
        return t

    def keys(self, ctx: SelectionContext) -> torch.Tensor:
        """Reducible loss per sample (loss EMA − irreducible loss), on the state's device;
        -inf for samples never trained (they are drawn separately, see ``select``)."""
        if self.irreducible is not None and self.irreducible.numel() != ctx.n:
            raise ValueError(f"irreducible has {self.irreducible.numel()} losses but the sampler has "
                             f"N={ctx.n} samples: pass one irreducible loss per training sample, in the "
                             "dataset's order")
        st = ctx.state
        reducible = st.loss - self._irreducible_on(st.device, ctx.n)
        return torch.where(ctx.seen_mask(), reducible, torch.full_like(reducible, float("-inf")))

    def select(self, ctx: SelectionContext) -> Selection:
        keys = self.keys(ctx)      # checks N first, also in the epochs that only explore
        seen = ctx.seen_mask()
        k = ctx.k
        unseen = ctx.n - int(seen.sum())
        parts = []
        if unseen:
            m = min(unseen, k)
            u = ctx.uniform()
            parts.append(ctx.top(torch.where(seen, torch.full_like(u, float("-inf")), u), m))
            k -= m
        if k > 0:
            n_top = k - round_half_up(self.explore * k)
            top = ctx.top(keys, n_top) if n_top > 0 else keys.new_empty(0, dtype=torch.int64)
            parts.append(top)
            if n_top < k:
                e = ctx.uniform(rng.STREAM_EXPLORE)
                e = torch.where(seen, e, torch.full_like(e, float("-inf")))
                e[top] = float("-inf")
                parts.append(ctx.top(e, k - n_top))
        return Selection(torch.cat(parts) if len(parts) > 1 else parts[0])

    def config(self) -> Dict[str, Any]:
        n = None if self.irreducible is None else int(self.irreducible.numel())
        return {**super().config(), "explore": self.explore, "irreducible_n": n,
                "irreducible_sha256": self._digest}


# ---- the irreducible losses: a model trained on holdout data --------------------------------
@dataclass
class IrreducibleFit:
    """What :func:`fit_irreducible` returns: the losses and what computing them cost.

    ``losses``: [len(train)] float32 on the CPU. ``train_passes``: forward+backward passes
    of the holdout model's training (epochs × len(holdout)). ``eval_passes``: forward-only
    passes of its evaluation (len(train)). ``seconds``: wall time of both.
    ``train_accuracy``: how often the holdout model predicts the training labels (read off
    the evaluation pass, at no extra cost; label noise caps it).
    """

    losses: torch.Tensor
    train_passes: int
    eval_passes: int
    seconds: float
    train_accuracy: float


def _xy(batch: Any) -> tuple:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("holdout and train items must start with (input, class index), got "
                        f"{type(batch).__name__}")
    return batch[0], batch[1]


def fit_irreducible(model_fn: Callable[[], nn.Module], holdout: Any, train: Any, epochs: int = 10,
                    batch_size: int = 64, lr: float = 0.05, momentum: float = 0.9,
                    weight_decay: float = 5e-4, device: str = "cpu", seed: int = 0,
                    eval_batch_size: int = 1024) -> IrreducibleFit:
    """Train ``model_fn()`` on ``holdout`` (SGD with momentum, linear LR decay to 0 over
    ``epochs`` shuffled epochs), then evaluate it (eval mode, no gradient) on ``train``:
    each training sample's cross-entropy is its irreducible loss.

    ``holdout``, ``train``: map-style datasets whose items start with (input, class index)
    (``TensorDataset(x, y)``, or ``with_indices`` of one); the holdout must not overlap the
    training set. ``model_fn``: builds a fresh model (e.g. ``lambda: SmallCNN(3, 10, 32)``);
    a small one is enough (the paper's irreducible-loss models are often smaller than the
    target model).

    Cost: ``epochs × len(holdout)`` forward+backward passes, plus ``len(train)`` forward
    passes without backward (about a third of a training pass each). With a 10% holdout
    trained for E epochs that is 0.1·E/T of a T-epoch full training's passes, plus one
    forward sweep over the data; the model can be reused by every run on the same data.
    """
    if isinstance(model_fn, nn.Module) or not callable(model_fn):
        raise TypeError("model_fn must be a function that builds a fresh model (e.g. lambda: "
                        f"SmallCNN()), got {type(model_fn).__name__}")
    check_int("epochs", epochs, lo=1)
    if len(holdout) < 1 or len(train) < 1:
        raise ValueError(f"holdout and train must be non-empty, got {len(holdout)} and {len(train)} samples")
    dev = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = model_fn().to(dev)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(holdout, batch_size=batch_size, shuffle=True, generator=g)
    steps = epochs * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            x, y = _xy(batch)
            loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for batch in DataLoader(train, batch_size=eval_batch_size, shuffle=False):
            x, y = _xy(batch)
            logits, y = model(x.to(dev)), y.to(dev)
            losses.append(F.cross_entropy(logits, y, reduction="none").float().cpu())
            correct += int((logits.argmax(1) == y).sum())
    seconds = time.perf_counter() - t0
    return IrreducibleFit(losses=torch.cat(losses), train_passes=epochs * len(holdout),
                          eval_passes=len(train), seconds=seconds,
                          train_accuracy=correct / len(train))


def irreducible_losses(model_fn: Callable[[], nn.Module], holdout: Any, train: Any,
                       **kwargs: Any) -> torch.Tensor:
    """The N irreducible losses of ``train`` (``fit_irreducible(...).losses``), ready for
    ``Sampler(train, policy="rho", irreducible=...)``. Cost: see :func:`fit_irreducible`."""
    return fit_irreducible(model_fn, holdout, train, **kwargs).losses
