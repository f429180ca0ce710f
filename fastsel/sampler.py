"""The drop-in sampler: picks each epoch's samples under a budget and takes the loss call.

Data path: ``__iter__`` draws the epoch's selection (one pass on the device over all N
samples) → the DataLoader yields those indices → ``loss()`` computes the per-sample loss,
folds it into the per-sample state and returns the scalar to backprop → the next epoch's
selection reads that state.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, Iterator, List, Optional, Sized, Union

import numpy as np
import torch

from . import rng
from .backends import check_backend_name, get_backend
from .checks import check_observe_args, check_step_args, raise_for_errors
from .config import REDUCTIONS, LossConfig
from .distributed import StateSync, world
from .policies import Policy, SelectionContext, make_policy
from .state import STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE, SampleState
from .summary import Summary, selection_entropy
from .threads import calling_thread_only

_FORMAT = 1


def _check_budget(budget: Any, time_budget: Any, epochs: Any) -> None:
    if (budget is None) == (time_budget is None):
        raise ValueError("give exactly one of budget= (a fraction in (0, 1]) and time_budget= "
                         f"(seconds); got budget={budget!r}, time_budget={time_budget!r}")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1], got budget={budget!r}")
        if epochs is None:
            raise ValueError("a fraction budget needs epochs= (the epochs of full training), got epochs=None")
    if time_budget is not None:
        if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) \
                or not math.isfinite(time_budget) or time_budget <= 0:
            raise ValueError(f"time_budget must be a positive number of seconds, got time_budget={time_budget!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive int, got epochs={epochs!r}")


class _EpochIterator(Iterator[int]):
    """Iterates one epoch's shard from the trained position; stateful for torchdata's
    StatefulDataLoader, which saves and restores it instead of fast-forwarding."""

    def __init__(self, sampler: "Sampler") -> None:
        self.sampler = sampler
        self._reset()

    def _reset(self) -> None:
        self.shard = self.sampler._shard_list()
        self.i = self.sampler.position

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> int:
        s = self.sampler
        if self.i >= len(self.shard) or (self.i % 8 == 0 and s._time_up_local()):
            s._exhausted = True
            raise StopIteration
        v = self.shard[self.i]
        self.i += 1
        s._yielded += 1
        return v

    # torchdata's StatefulDataLoader snapshots this when it fetches the batch it hands to
    # the user, restores the sampler first and then this: the position it carries is then
    # exactly what the user received.
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.sampler.epoch, "yielded": self.i}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("epoch") != self.sampler.epoch:
            raise ValueError(f"iterator state is for epoch {sd.get('epoch')}, "
                             f"the sampler is at epoch {self.sampler.epoch}")
        self.sampler.position = int(sd["yielded"])
        self._reset()


class Sampler(torch.utils.data.Sampler[int]):
    """A DataLoader sampler that trains on the samples that matter under a budget.

    Args:
        data: the dataset (anything with ``len``) or the number of samples N.
        policy: ``"uniform"``, ``"scan"``, ``"p-sgd"``, ``"c-sgd"``, ``"tftb"``,
            ``"infobatch"`` or a :class:`fastsel.policies.Policy`; its parameters go in
            ``**policy_kwargs``.
        budget: fraction B in (0, 1] of full training's forward/backward passes: exactly
            round(N·B) samples per epoch for ``epochs`` epochs (scan: N per epoch,
            round(epochs·B) epochs).
        time_budget: seconds of wall clock instead; epochs end early when it is spent.
        epochs: epochs of full training (required with ``budget``; a cap with ``time_budget``).
        seed: seeds the selection: the same seed gives the same stream of indices.
        backend: ``"auto"`` or a name from :func:`fastsel.backends`.
        device: where the per-sample state lives; by default it follows the logits.
        num_replicas, rank: distributed shards (default: from the process group).
        drop_last: drop the tail to equal shards instead of padding (DistributedSampler's rule).
        strict: refuse a bad index/label at once (a host sync); default: on CPU only. On
            other devices it is masked, counted and raised at the next selection pass.
        ignore_index, label_smoothing, class_weight, reduction: as in ``F.cross_entropy``.
        ema: weight of a new observation in each sample's loss EMA and variance.
    """

    def __init__(self, data: Union[int, Sized], policy: Union[str, Policy] = "uniform",
                 budget: Optional[float] = None, time_budget: Optional[float] = None,
                 epochs: Optional[int] = None, seed: int = 0, *, backend: str = "auto",
                 device: Optional[Union[str, torch.device]] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 drop_last: bool = False, strict: Optional[bool] = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0,
                 class_weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                 ema: float = 0.3, **policy_kwargs: Any) -> None:
        if isinstance(data, bool) or not (isinstance(data, int) or hasattr(data, "__len__")):
            raise TypeError(f"data must be a dataset with len() or an int, got {type(data).__name__}")
        n = int(data) if isinstance(data, int) else len(data)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError(f"the dataset must have at least one sample, got N={n}")
        _check_budget(budget, time_budget, epochs)
        self.n = n
        self.policy = make_policy(policy, **policy_kwargs)
        if budget is not None and self.policy.keep != 1.0:
            raise ValueError(f"keep={self.policy.keep} sets the share per epoch under a time budget; "
                             f"with budget={budget} the share is the budget")
        self.budget = None if budget is None else float(budget)
        self.time_budget = None if time_budget is None else float(time_budget)
        self.epochs_total = epochs
        self.seed = int(seed)
        self.backend_name = backend
        check_backend_name(backend)
        self.cfg = LossConfig(ignore_index=ignore_index, label_smoothing=label_smoothing,
                              class_weight=class_weight, reduction=reduction, ema=ema)
        self._strict = strict
        self._fixed_device = None if device is None else torch.device(device)
        self.world_size, self.rank = world(num_replicas, rank)
        self.drop_last = bool(drop_last)
        self.state = SampleState(n, self._fixed_device or "cpu")
        self._sync = StateSync(self.state, self.world_size, self.rank) if self.world_size > 1 else None
        self._backend: Optional[Any] = None
        self._backend_device: Optional[torch.device] = None
        self._generator = torch.Generator()
        self.epoch = 0
        self.position = 0            # samples of this epoch's shard that went through loss()
        self._exhausted = False      # the epoch's iterator ran out (or its time did)
        self._selection: Optional[torch.Tensor] = None   # global, shuffled, this epoch
        self._selection_epoch: Optional[int] = None
        self._shard_cache: Optional[List[int]] = None
        self._shard_cpu: Optional[torch.Tensor] = None
        self._yielded = 0            # indices handed out in all epochs, this rank
        self._trained = 0            # rows that went through loss() in all epochs, this rank
        self._loss_calls = 0
        self._elapsed0 = 0.0         # seconds spent before this process (resume)
        self._clock: Optional[float] = None
        self._selection_time = 0.0
        self._epoch_counts: List[int] = []
        self._epoch_losses: List[float] = []  # mean observed loss of each trained epoch

    # ---- budget ---------------------------------------------------------------------
    @property
    def time_mode(self) -> bool:
        return self.time_budget is not None

    @property
    def num_epochs(self) -> Optional[int]:
        """Epochs the budget allows (None: a time budget without an epoch cap)."""
        if self.time_mode:
            return self.epochs_total
        return self.policy.num_epochs(self.epochs_total, self.budget)  # type: ignore[arg-type]

    def elapsed(self) -> float:
        """Wall-clock seconds of the budget spent so far (across resumes)."""
        return self._elapsed0 + (0.0 if self._clock is None else time.monotonic() - self._clock)

    def _start_clock(self) -> None:
        if self._clock is None:
            self._clock = time.monotonic()

    def _time_up_local(self) -> bool:
        # Under DDP the ranks must yield equal counts: the epoch's count is fitted to the
        # remaining time at the selection pass instead of checking each rank's clock.
        return self.time_mode and self.world_size == 1 and self.elapsed() >= self.time_budget  # type: ignore[operator]

    def _time_up(self) -> bool:
        if not self.time_mode:
            return False
        e = self.elapsed()
        if self.world_size > 1:
            t = torch.tensor([e], dtype=torch.float64, device=self.state.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            e = float(t)
        return e >= self.time_budget  # type: ignore[operator]

    def _global_count(self) -> int:
        """Samples the current epoch selects before sharding (fraction budgets: known ahead)."""
        if not self.time_mode and self._selection_epoch != self.epoch:
            return self.policy.count(self.n, self.budget)  # type: ignore[arg-type]
        self._ensure_selection()
        return int(self._selection.numel())  # type: ignore[union-attr]

    def _shard_len(self, k: int) -> int:
        w = self.world_size
        return k // w if self.drop_last else -(-k // w)

    def progress(self) -> float:
        """Share of the budget spent, in [0, 1]: by trained samples or by wall clock."""
        if self.time_mode:
            return min(1.0, self.elapsed() / self.time_budget)  # type: ignore[operator]
        total = self.num_epochs * self._shard_len(self.policy.count(self.n, self.budget))  # type: ignore[arg-type, operator]
        done = self._trained if self._loss_calls else self._yielded
        return min(1.0, done / max(1, total))

    # ---- epochs and iteration -------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (DistributedSampler's convention)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got epoch={epoch!r}")
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
        self._exhausted = False

    def _epoch_trained(self) -> bool:
        return self._selection_epoch == self.epoch and self.position >= len(self._shard_tensor())

    def _epoch_done(self) -> bool:
        if self._selection_epoch != self.epoch:
            return False
        return self._exhausted or self.position >= len(self._shard_tensor())

    def epochs(self) -> Iterator[int]:
        """Yield epoch numbers until the budget is spent, calling ``set_epoch`` for each;
        after a resume it starts with the interrupted epoch."""
        self._start_clock()
        e = self.epoch + 1 if self._epoch_done() else self.epoch
        while True:
            if self.num_epochs is not None and e >= self.num_epochs:
                return
            if self._time_up():
                return
            self.set_epoch(e)
            yield e
            e = self.epoch + 1

    def __iter__(self) -> Iterator[int]:
        self._start_clock()
        if self._epoch_done() and self._exhausted:
            self.set_epoch(self.epoch + 1)
        self._ensure_selection()
        return _EpochIterator(self)

    def epoch_indices(self) -> List[int]:
        """This rank's indices still to train in the current epoch, drawing its selection
        if needed; the same list however often it is asked (FFCV asks twice)."""
        return self._shard_list()[self.position:]

    def __len__(self) -> int:
        """Indices this rank yields in the current epoch (what is left of it after a resume)."""
        return max(0, self._shard_len(self._global_count()) - self.position)

    def epoch_array(self) -> "np.ndarray":
        """``epoch_indices`` as an int64 numpy array, without a Python list (for FFCV)."""
        return self._shard_tensor()[self.position:].numpy()

    def _shard_tensor(self) -> torch.Tensor:
        """This rank's shard of the epoch's selection, on the host (padded or dropped to
        equal shards as DistributedSampler does)."""
        self._ensure_selection()
        if self._shard_cpu is None:
            sel = self._selection
            k, w = sel.numel(), self.world_size  # type: ignore[union-attr]
            per = self._shard_len(k)
            total = per * w
            if total > k:
                reps = -(-total // max(k, 1))
                sel = sel.repeat(reps)[:total] if k else sel  # type: ignore[union-attr]
            sel = sel[:total]  # type: ignore[index]
            self._shard_cpu = sel[self.rank:total:w].cpu()
        return self._shard_cpu

    def _shard_list(self) -> List[int]:
        shard = self._shard_tensor()  # first: a new epoch's selection pass resets the caches
        if self._shard_cache is None:
            self._shard_cache = shard.tolist()
        return self._shard_cache

    # ---- the selection pass -----------------------------------------------------------
    def _get_backend(self, device: torch.device) -> Any:
        """The backend for ``device``; the state's tensors are checked once when it binds."""
        if self._backend is None or self._backend_device != device:
            backend = get_backend(self.backend_name, device)
            if self.state.device == device:
                backend.check_state(self.state)
            self._backend, self._backend_device = backend, device
        return self._backend

    def _ensure_selection(self) -> None:
        if self._selection_epoch != self.epoch:
            self._selection_pass()

    def _selection_pass(self) -> None:
        """Draw the epoch's selection, timed; a CPU pass over a moderate N stays on this
        thread (see fastsel.threads)."""
        t0 = time.perf_counter()
        with calling_thread_only(self.state.device, self.n):
            self._draw_selection()
        self._selection_time += time.perf_counter() - t0

    def _mean_loss(self) -> Optional[float]:
        """Mean loss EMA over trained samples (None before any), if the policy reads it."""
        if not self.policy.uses_mean_loss:
            return None
        st = self.state
        seen = st.seen > 0
        n_seen = int(seen.sum())
        if not n_seen:
            return None
        return float(torch.where(seen, st.loss, torch.zeros_like(st.loss)).sum()) / n_seen

    def _epoch_loss(self) -> Optional[float]:
        """Mean loss observed since the last selection pass (all ranks once merged), or None."""
        total, count = self.state.stats[[STAT_EPOCH_LOSS, STAT_EPOCH_COUNT]].tolist()
        return total / count if count else None

    def _close_epoch_loss(self) -> None:
        """Record the finished epoch's mean observed loss and start the next one's sums."""
        mean = self._epoch_loss()
        if mean is not None:
            self._epoch_losses.append(mean)
        self.state.stats[STAT_EPOCH_LOSS] = 0.0
        self.state.stats[STAT_EPOCH_COUNT] = 0.0

    def _draw_selection(self) -> None:
        """Merge the ranks' state, let the policy pick k samples, record them, shuffle."""
        st = self.state
        budget_left = None
        if self._sync is not None:
            tot = self._sync(st, [self.elapsed(), float(self._trained)])
            elapsed, trained = tot[0] / self.world_size, tot[1]
            if self.time_mode and elapsed > 0:
                budget_left = (self.time_budget - elapsed) * trained / elapsed  # type: ignore[operator]
        errs = st.take_errors()
        if self._sync is not None:
            self._sync.rebase(st, mark=self.epoch)
        if bool(errs.any()):
            raise_for_errors(errs, self.n)
        self.policy.observe(st, self._mean_loss(), self.time_mode)
        if self.time_mode:
            k = max(1, min(self.n, int(self.n * self.policy.time_share() + 0.5)))
            if budget_left is not None:
                k = max(0, min(k, int(budget_left)))
        else:
            k = self.policy.count(self.n, self.budget)  # type: ignore[arg-type]
        key = rng.epoch_key(self._generator, self.seed, self.epoch)
        backend = self._get_backend(st.device)
        progress = self.progress() if self.time_mode else self.epoch / max(1, self.num_epochs)  # type: ignore[arg-type]
        ctx = SelectionContext(state=st, backend=backend, epoch=self.epoch, k=k, key=key,
                               progress=progress, time_mode=self.time_mode)
        if k > 0:
            sel = self.policy.select(ctx)
            chosen = sel.indices
            with torch.no_grad():
                if sel.weights is not None:
                    st.weight.copy_(sel.weights)
                else:
                    st.weight.fill_(1.0)
                st.selected.index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.int32))
            order = backend.shuffle(chosen, key)
        else:
            order = torch.empty(0, dtype=torch.int64, device=st.device)
        self._close_epoch_loss()
        if self._sync is not None:
            self._sync.stats0.copy_(st.stats)
        self._selection = order.to(torch.int64)
        self._selection_epoch = self.epoch
        self._shard_cache = self._shard_cpu = None
        self._shard_tensor()  # the one device→host copy of the epoch
        self._epoch_counts.append(int(k))

    # ---- the loss call ----------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor, *,
             reduction: Optional[str] = None, update: bool = True) -> torch.Tensor:
        """Cross-entropy as ``F.cross_entropy`` computes it, folded into the per-sample state;
        returns the loss to backprop (policy weights applied). No host sync.

        ``logits`` [B, C] or [B, C, d1, ..., dk]; ``target`` class indices [B] or
        [B, d1, ..., dk] (``ignore_index`` allowed), or class probabilities of the logits'
        shape (mixup, CutMix). ``indices`` [B]: each row's sample. A sample's observation is
        the mean loss of its non-ignored elements. ``reduction`` overrides the sampler's for
        this call. ``update=False`` computes the same loss without touching the state or the
        epoch position (e.g. for a second pass over samples already observed).
        """
        cfg = self._call_config(reduction)
        check_step_args(logits, target, indices, cfg)
        backend = self._follow(logits.device, cfg)
        out = backend.step(logits, target, indices, self.state, cfg, self.epoch, update)
        if update:
            self._consumed(int(logits.shape[0]))
        return out

    def observe(self, losses: torch.Tensor, indices: torch.Tensor, *,
                p_true: Optional[torch.Tensor] = None, reduction: Optional[str] = None,
                update: bool = True) -> torch.Tensor:
        """Per-sample losses of any loss function (focal, detection, contrastive, ...) folded
        into the per-sample state as ``loss()`` folds its cross-entropy; returns their
        policy-weighted reduction, with the gradient flowing into ``losses``. No host sync.

        ``losses`` [B] (a floating dtype, with or without a graph); ``p_true`` [B], the
        probability the model gave each sample's target (read by ``p-sgd``/``c-sgd``),
        defaults to exp(-loss), exact for hard-label cross-entropy. ``reduction`` and
        ``update`` as in ``loss()``; ``"mean"`` divides by the number of rows.
        """
        check_observe_args(losses, indices, p_true)
        cfg = self._call_config(reduction)
        backend = self._follow(losses.device, cfg)
        out = backend.observe(losses, indices, self.state, cfg, self.epoch, p_true, update)
        if update:
            self._consumed(int(losses.shape[0]))
        return out

    def _call_config(self, reduction: Optional[str]) -> LossConfig:
        """The loss settings of one call: the sampler's, with ``reduction`` overridden."""
        if reduction is None or reduction == self.cfg.reduction:
            return self.cfg
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got reduction={reduction!r}")
        return dataclasses.replace(self.cfg, reduction=reduction)

    def _follow(self, dev: torch.device, cfg: LossConfig) -> Any:
        """Move the state (and class weights) to the device of the call once; the backend
        for that device. Strict mode defaults to on on the CPU, off elsewhere."""
        if self.state.device != dev:
            if self._fixed_device is not None:
                raise ValueError(f"the loss is on {dev} but the sampler's state is on "
                                 f"device={self._fixed_device}: pass device= or move the model")
            self.state.to(dev)
            if self._sync is not None:
                self._sync.to(dev)
            if self._selection is not None:
                self._selection = self._selection.to(dev)
            self._backend = None
        w = self.cfg.class_weight
        if w is not None and w.device != dev:
            self.cfg.class_weight = w.to(dev)
            if cfg is not self.cfg:
                cfg.class_weight = self.cfg.class_weight
        strict = (dev.type == "cpu") if self._strict is None else bool(self._strict)
        if cfg.strict != strict:
            cfg.strict = strict
        return self._get_backend(dev)

    def _consumed(self, b: int) -> None:
        """A batch of b rows went through: the epoch position and the budget advance."""
        self.position += b
        self._trained += b
        self._loss_calls += 1

    def skip(self, indices: torch.Tensor) -> None:
        """Count a batch as consumed without observing it, for a batch-level policy that
        chose its rows on stale losses (StaleSB): the epoch position and the budget's
        progress advance as ``loss()`` would advance them; the per-sample state does not."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise ValueError("indices must be a 1-D tensor of the batch's sample indices")
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be int64 or int32, got {indices.dtype}")
        self._consumed(int(indices.shape[0]))

    # ---- observability ----------------------------------------------------------------
    def summary(self) -> Summary:
        """Selected fraction, samples seen/skipped, passes saved, selection time, entropy,
        and the mean observed loss per epoch (the last entry is the current epoch so far;
        under DDP that one is this rank's until the next selection pass merges them)."""
        st = self.state
        epochs_run = len(self._epoch_counts)
        # Full training: every sample in every epoch the recipe (or the time budget) ran.
        full = self.n * (epochs_run if self.time_mode else int(self.epochs_total))  # type: ignore[arg-type]
        passes = self._trained * self.world_size
        sel_counts = st.selected
        current = self._epoch_loss()
        return Summary({
            "policy": self.policy.name,
            "backend": getattr(self._backend, "name", self.backend_name),
            "budget": self.budget if not self.time_mode else f"{self.time_budget:g} s",
            "epochs_run": epochs_run,
            "selected_fraction": (sum(self._epoch_counts) / (epochs_run * self.n)) if epochs_run else 0.0,
            "samples_seen": int((st.seen > 0).sum()),
            "samples_never_selected": int((sel_counts == 0).sum()),
            "passes": passes,
            "passes_full_training": full,
            "passes_saved": 1.0 - passes / full if full else 0.0,
            "selection_time_s": self._selection_time,
            "selection_entropy": selection_entropy(sel_counts),
            "nonfinite_losses": int(st.stats[STAT_NONFINITE]),
            "epoch_mean_losses": self._epoch_losses + ([] if current is None else [current]),
            "elapsed_s": self.elapsed(),
        })

    # ---- checkpoint and resume --------------------------------------------------------
    def _config(self) -> Dict[str, Any]:
        return {"n": self.n, "policy": self.policy.config(), "budget": self.budget,
                "time_budget": self.time_budget, "epochs": self.epochs_total,
                "world_size": self.world_size, "drop_last": self.drop_last}

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resume needs to yield exactly the stream an uninterrupted run would.

        ``position`` counts what went through ``loss()``, not what the DataLoader prefetched.
        Under DDP it holds this rank's updates since the last selection pass: save one per
        rank, or save at an epoch boundary.
        """
        return {
            "format": _FORMAT, "config": self._config(), "seed": self.seed,
            "epoch": self.epoch, "position": self.position,
            # An iterator that ran out with batches still in flight is not a finished epoch.
            "exhausted": self._exhausted and (self.time_mode or self._epoch_trained()),
            "selection": None if self._selection is None else self._selection.cpu().clone(),
            "selection_epoch": self._selection_epoch,
            "state": self.state.state_dict(), "policy_state": self.policy.state_dict(),
            "generator": self._generator.get_state(),
            "sync": None if self._sync is None else self._sync.state_dict(),
            "counters": {"yielded": self._yielded, "trained": self._trained,
                         "loss_calls": self._loss_calls, "elapsed": self.elapsed(),
                         "selection_time": self._selection_time,
                         "epoch_counts": list(self._epoch_counts),
                         "epoch_losses": list(self._epoch_losses)},
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a ``state_dict``; a state for another N, policy or budget is refused
        with a clear error and nothing here changes."""
        if not isinstance(sd, dict) or sd.get("format") != _FORMAT:
            raise ValueError(f"not a fastsel Sampler state_dict of format {_FORMAT}")
        mine, theirs = self._config(), sd["config"]
        for key in mine:
            if mine[key] != theirs.get(key):
                raise ValueError(f"state_dict is for {key}={theirs.get(key)!r}, "
                                 f"this sampler has {key}={mine[key]!r}")
        if sd["seed"] != self.seed:
            raise ValueError(f"state_dict is for seed={sd['seed']!r}, this sampler has seed={self.seed!r}")
        self.state.check_state_dict(sd["state"])
        sel = sd["selection"]
        if sel is not None and (not isinstance(sel, torch.Tensor) or sel.dim() != 1
                                or (sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= self.n))):
            raise ValueError(f"state_dict selection must be a 1-D tensor of indices in [0, {self.n})")
        self.state.load_state_dict(sd["state"])
        self.policy.load_state_dict(sd["policy_state"])
        self._generator.set_state(sd["generator"])
        if self._sync is not None and sd["sync"] is not None:
            self._sync.load_state_dict(sd["sync"], self.state.device)
        self.epoch = int(sd["epoch"])
        self.position = int(sd["position"])
        self._exhausted = bool(sd["exhausted"])
        self._selection = None if sel is None else sel.to(self.state.device)
        self._selection_epoch = sd["selection_epoch"]
        self._shard_cache = self._shard_cpu = None
        c = sd["counters"]
        self._yielded, self._trained, self._loss_calls = c["yielded"], c["trained"], c["loss_calls"]
        self._elapsed0, self._clock = float(c["elapsed"]), None
        self._selection_time = float(c["selection_time"])
        self._epoch_counts = list(c["epoch_counts"])
        self._epoch_losses = list(c.get("epoch_losses", []))
