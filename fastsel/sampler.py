"""The drop-in sampler: speaks the DataLoader's and FFCV's protocol and takes the loss call.

Data path: ``__iter__`` draws the epoch's selection (fastsel.selection: one pass on the
device over all N samples) → the DataLoader yields this rank's share of it
(fastsel.sharding) → ``loss()`` computes the per-sample loss, folds the epoch's rows
(fastsel.rows) into the per-sample state and returns the scalar to backprop → the next
epoch's selection reads that state. The budget's accounting is fastsel.budget's.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sized, Union

import numpy as np
import torch

from .backends import check_backend_name, get_backend
from .backends.base import state_args
from . import checkpoint, ops
from .budget import Budget
from .cursor import EpochCursor, EpochIterator
from .validation.tensors import check_observe_args, check_step_args
from .validation.usage import refuse_call_settings, refuse_wrappers
from .validation.values import check_int, is_int
from .config import REDUCTIONS, LossConfig
from .distributed import StateSync, world
from .policies import Policy, make_policy
from .selection import SelectionPass
from .sharding import Shard
from .state import STAT_NONFINITE, SampleState
from .summary import Summary, selection_entropy

class Sampler(torch.utils.data.Sampler[int]):
    """A DataLoader sampler that trains on the samples that matter under a budget.

    Args:
        data: the dataset (anything with ``len``) or the number of samples N.
        policy: ``"uniform"``, ``"scan"``, ``"p-sgd"``, ``"c-sgd"``, ``"tftb"``,
            ``"infobatch"``, ``"rho"`` or a :class:`fastsel.policies.Policy`; its parameters go in
            ``**policy_kwargs``.
        budget: fraction B in (0, 1] of full training's forward/backward passes: exactly
            round(N·B) samples per epoch for ``epochs`` epochs (scan: N per epoch,
            round(epochs·B) epochs).
        time_budget: seconds of wall clock instead; epochs end early when it is spent.
        epochs: epochs of full training (required with ``budget``; a cap with ``time_budget``).
        seed: an int; the same seed gives the same stream of indices.
        backend: ``"auto"`` or a name from :func:`fastsel.list_backends`.
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
        if not (is_int(data) or hasattr(data, "__len__")):
            raise TypeError(f"data must be a dataset with len() or an int, got {type(data).__name__}")
        n = int(data) if is_int(data) else len(data)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError(f"the dataset must have at least one sample, got N={n}")
        check_int("seed", seed, exc=TypeError, fix="pass e.g. seed=0")
        check_backend_name(backend)
        self.n = n
        self.policy = make_policy(policy, **policy_kwargs)
        self.budget = Budget(self.policy, budget, time_budget, epochs)
        self.seed = int(seed)
        self.backend_name = backend
        self.cfg = LossConfig(ignore_index=ignore_index, label_smoothing=label_smoothing,
                              class_weight=class_weight, reduction=reduction, ema=ema)
        self._strict = strict
        self._fixed_device = None if device is None else torch.device(device)
        world_size, rank = world(num_replicas, rank)
        self.shard = Shard(world_size, rank, drop_last)
        self.state = SampleState(n, self._fixed_device or "cpu")
        self._sync = StateSync(self.state, world_size, rank) if world_size > 1 else None
        self._passes = SelectionPass(self.state, self.policy, self.budget, self._sync, self.seed)
        self.cursor = EpochCursor(n, self.shard, self.budget, self.state.device)
        # The ops' state arguments, made outside loss calls (again when the state moves).
        self._op_state = state_args(self.state, self.cursor.rows.epoch, self.cursor.rows)
        self._backend: Optional[Any] = None
        self._backend_device: Optional[torch.device] = None
        self._strict_on: Optional[bool] = None   # strict mode on the bound device
        self._warned_spent = False

    # ---- what the parts know ------------------------------------------------------------
    world_size = property(lambda self: self.shard.world_size)
    rank = property(lambda self: self.shard.rank)
    drop_last = property(lambda self: self.shard.drop_last)
    time_mode = property(lambda self: self.budget.time_mode)
    num_epochs = property(lambda self: self.budget.num_epochs,
                          doc="Epochs the budget allows (None: a time budget without an epoch cap).")

    def elapsed(self) -> float:
        """Wall-clock seconds of the budget spent so far (across resumes)."""
        return self.budget.elapsed()

    def progress(self) -> float:
        """Share of the budget spent, in [0, 1]: by trained samples or by wall clock."""
        self.cursor.settle()
        return self.budget.progress(self.shard.length(self.budget.epoch_count(self.n)))

    def _time_up(self) -> bool:
        """Whether a time budget is spent; the ranks agree on it (one all-reduce under DDP)."""
        if not self.time_mode:
            return False
        e = self.budget.elapsed()
        if self.world_size > 1:
            t = torch.tensor([e], dtype=torch.float64, device=self.state.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            e = float(t)
        return self.budget.time_up(e)

    def _may_hand_out(self, handed_out: int) -> bool:
        """Whether the epoch's iterator may hand out one more row, ``handed_out`` so far."""
        # Under DDP the ranks must yield equal counts: the epoch's count is fitted to the
        # remaining time at the selection pass instead of by each rank's clock.
        if self.world_size > 1 or not self.time_mode:
            return True
        self.cursor.settle(cheap_only=True)
        return self.budget.may_hand_out(handed_out - self.cursor.position)

    @property
    def epoch(self) -> int:
        """The epoch the sampler is in (move with ``set_epoch``)."""
        return self.cursor.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.cursor.epoch = value

    @property
    def position(self) -> int:
        """Rows of this epoch's shard trained through ``loss``/``observe``/``skip`` (compiled
        calls included: read from the device's count once one was traced)."""
        self.cursor.settle()
        return self.cursor.position

    @position.setter
    def position(self, value: int) -> None:
        self.cursor.position = value

    # ---- epochs and iteration -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (DistributedSampler's convention)."""
        self.cursor.move_to(check_int("epoch", epoch, lo=0), self.time_mode)

    def _warn_unspent(self) -> None:
        """At the end of a fraction budget: warn once if rows of it were never trained."""
        if self.time_mode or not self.budget.loss_calls or self.num_epochs is None:
            return
        self.cursor.settle()
        total = self.num_epochs * self.shard.length(self.budget.epoch_count(self.n))
        short = total - self.budget.trained
        if short > 0:
            self.cursor.warn_once("unspent", 4, f"fastsel: the run ended with {short} of the budget's {total} "
                            f"rows untrained on this rank (progress {self.progress():.3f}, so BudgetLR "
                            "did not reach 0): DataLoader(drop_last=True) or a break out of an epoch? "
                            "Pass drop_last=False and let every epoch run to its end")

    def _next_epoch(self) -> int:
        """The epoch the next iteration draws: the current one, or the one after it once
        its iterator ran out."""
        return self.epoch + 1 if self.cursor.done() and self.cursor.exhausted else self.epoch

    def _spent(self) -> bool:
        """Whether the budget allows no more epochs (warns once when asked to iterate past)."""
        spent = self.budget.past_end(self.epoch) or self._time_up()
        if spent and not self._warned_spent:
            self._warned_spent = True
            self._warn_unspent()
            warnings.warn(f"fastsel: the budget is spent ({self._budget_text()}); iterating "
                          f"epoch {self.epoch} yields nothing", stacklevel=3)
        return spent

    def _budget_text(self) -> str:
        b = self.budget
        return f"{b.seconds:g} s" if b.time_mode else f"{b.num_epochs} epochs at budget={b.fraction}"

    def epochs(self) -> Iterator[int]:
        """Yield epoch numbers until the budget is spent, calling ``set_epoch`` for each;
        after a resume it starts with the interrupted epoch."""
        self.budget.start_clock()
        e = self.epoch + 1 if self.cursor.done() else self.epoch
        while not self.budget.past_end(e):
            if self._time_up():
                return
            self.set_epoch(e)
            yield e
            e = self.epoch + 1
        self.cursor.close(self.time_mode)
        self._warn_unspent()

    def _start_iteration(self, trained_is_done: bool = False) -> bool:
        """What starting to iterate means (DataLoader's ``iter`` and FFCV's order alike): the
        clock runs, an epoch whose iterator ran out (or, with ``trained_is_done``, whose rows
        were all trained) moves on to the next, and its selection is drawn; False, drawing
        nothing, once the budget is spent."""
        if self.world_size > 1 and not (torch.distributed.is_available()
                                        and torch.distributed.is_initialized()):
            raise RuntimeError(f"Sampler(num_replicas={self.world_size}, rank={self.rank}) needs an "
                               "initialised process group to draw an epoch: call "
                               "torch.distributed.init_process_group(...) before iterating, or leave "
                               "num_replicas and rank unset for one process")
        self.budget.start_clock()
        if self.cursor.done() and (self.cursor.exhausted or trained_is_done):
            self.set_epoch(self.epoch + 1)
        if self._spent():
            self.cursor.exhausted = True
            return False
        self._ensure_selection()
        return True

    def __iter__(self) -> Iterator[int]:
        refuse_wrappers(sys._getframe(1))
        return EpochIterator(self.cursor, self._may_hand_out) if self._start_iteration() else iter(())

    def __len__(self) -> int:
        """This rank's whole epoch length (also after a mid-epoch resume); 0 past the budget.
        Pure: no selection pass, no collective. Under a time budget, before the epoch is
        drawn, it is the policy's share; the pass may fit it to the time left."""
        e = self._next_epoch()
        if self.budget.past_end(e) or self.budget.time_up():   # this process's clock: no collective
            return 0
        c = self.cursor
        k = c.selection.numel() if e == c.selection_epoch else self.budget.epoch_count(self.n)  # type: ignore[union-attr]
        return self.shard.length(k)

    def epoch_indices(self) -> List[int]:
        """This rank's indices still to train in the current epoch, drawing its selection
        if needed; the same list however often it is asked."""
        return self.epoch_array().tolist()

    def epoch_array(self) -> "np.ndarray":
        """This rank's indices still to train in the current epoch, as an int64 numpy array
        (for FFCV), drawing its selection if needed."""
        self._ensure_selection()
        return self.cursor.shard_tensor()[self.position:].numpy()

    # ---- the selection pass ---------------------------------------------------------------
    def _get_backend(self, device: torch.device) -> Any:
        """The backend for ``device``; the state's tensors are checked once when it binds."""
        if self._backend is None or self._backend_device != device:
            backend = get_backend(self.backend_name, device)
            if self.state.device == device:
                backend.check_state(self.state)
            self._backend, self._backend_device = backend, device
            # Strict mode defaults to on on the CPU, off elsewhere; set here, where the
            # selection pass binds the state's device, so a compiled loss call finds it set.
            self._strict_on = (device.type == "cpu") if self._strict is None else bool(self._strict)
            self.cfg.strict = self._strict_on
        return self._backend

    def _ensure_selection(self) -> None:
        c = self.cursor
        if c.drawn():
            return
        progress = self.progress() if self.time_mode else self.epoch / max(1, self.num_epochs)  # type: ignore[arg-type]
        c.set_selection(self._passes(self.epoch, self._get_backend, c.rows.take_faults(), progress),
                        self.epoch)

    # ---- the loss call ------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor, *,
             reduction: Optional[str] = None, update: bool = True, **unknown: Any) -> torch.Tensor:
        """Cross-entropy as ``F.cross_entropy`` computes it, folded into the per-sample state;
        returns the loss to backprop (policy weights applied). No host sync off the CPU.

        ``logits`` [B, C] or [B, C, d1, ..., dk]; ``target`` class indices [B] or
        [B, d1, ..., dk] (``ignore_index`` allowed), or class probabilities of the logits'
        shape (mixup, CutMix). ``indices`` [B]: each row's sample, rows of the epoch being
        iterated (see docs/contract.md). A sample's observation is the mean loss of its
        non-ignored elements. ``reduction`` overrides the sampler's for this call.
        ``update=False`` computes the same loss and changes nothing: for any forward whose
        rows must not count (a sanity check, an evaluation pass, a second pass).

        One op forward and one backward (``fastsel.ops``), which also check and count the
        rows; under ``torch.compile`` the call reads no host int of the sampler, so a compiled
        step compiles once across epochs.
        """
        if unknown:
            refuse_call_settings("loss", unknown)
        cfg = self._call_config(reduction)
        check_step_args(logits, target, indices, cfg)
        host = update and not torch.compiler.is_compiling()
        if host:
            self.cursor.check_room(logits.shape[0])
        backend = self._follow(logits.device, cfg)
        out = ops.ce_step(backend.step_impl(logits, target), logits, target, indices,
                          self._op_state, cfg, update)  # type: ignore[arg-type]
        if host:
            self.cursor.consumed(logits.shape[0])
        return out

    def observe(self, losses: torch.Tensor, indices: torch.Tensor, *,
                p_true: Optional[torch.Tensor] = None, reduction: Optional[str] = None,
                update: bool = True, **unknown: Any) -> torch.Tensor:
        """Per-sample losses of any loss function (focal, detection, contrastive, ...) folded
        into the per-sample state as ``loss()`` folds its cross-entropy; returns their
        policy-weighted reduction, with the gradient flowing into ``losses``.

        ``losses`` [B] (a floating dtype, with or without a graph); ``p_true`` [B], the
        probability the model gave each sample's target (read by ``p-sgd``/``c-sgd``),
        defaults to exp(-loss), exact for hard-label cross-entropy. ``indices``,
        ``reduction`` and ``update`` as in ``loss()``; ``"mean"`` divides by the rows.
        """
        if unknown:
            refuse_call_settings("observe", unknown)
        check_observe_args(losses, indices, p_true)
        cfg = self._call_config(reduction)
        host = update and not torch.compiler.is_compiling()
        if host:
            self.cursor.check_room(losses.shape[0])
        backend = self._follow(losses.device, cfg)
        out = ops.observe(backend.observe_impl(losses), losses, p_true, indices,
                          self._op_state, cfg, update)  # type: ignore[arg-type]
        if host:
            self.cursor.consumed(losses.shape[0])
        return out

    def skip(self, indices: torch.Tensor) -> None:
        """Count a batch as consumed without observing it, for a batch-level policy that
        chose its rows on stale losses (StaleSB): the epoch position and the budget's
        progress advance as ``loss()`` would advance them; the per-sample state does not."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise ValueError("indices must be a 1-D tensor of the batch's sample indices")
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be int64 or int32, got {indices.dtype}")
        strict = (indices.device.type == "cpu") if self._strict is None else bool(self._strict)
        c = self.cursor
        c.check_room(int(indices.shape[0]))
        if indices.device != c.rows.device:
            raise ValueError(f"indices is on {indices.device} but the sampler's state is on "
                             f"{c.rows.device}: move it with .to({str(c.rows.device)!r})")
        c.rows.skip(indices, strict)
        c.consumed(int(indices.shape[0]))

    def _call_config(self, reduction: Optional[str]) -> LossConfig:
        """The loss settings of one call: the sampler's, with ``reduction`` overridden."""
        if reduction is None or reduction == self.cfg.reduction:
            return self.cfg
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got reduction={reduction!r}")
        return dataclasses.replace(self.cfg, reduction=reduction)

    def _follow(self, dev: torch.device, cfg: LossConfig) -> Any:
        """Move the state (and class weights) to the device of the call once, after the
        backend for that device is found (a device none runs on changes nothing); returns
        it, with ``cfg.strict`` set for that device."""
        if dev == self._backend_device and cfg.strict == self._strict_on:
            return self._backend    # bound to this device already: nothing to move or set
        if self.state.device != dev:
            if self._fixed_device is not None:
                raise ValueError(f"the loss is on {dev} but the sampler's state is on "
                                 f"device={self._fixed_device}: pass device= or move the model")
            get_backend(self.backend_name, dev)
            self.state.to(dev)
            if self._sync is not None:
                self._sync.to(dev)
            c = self.cursor
            if c.selection is not None:
                c.selection = c.selection.to(dev)
            c.rows.to(dev)
            self._op_state = state_args(self.state, c.rows.epoch, c.rows)
            self._backend = None
        w = self.cfg.class_weight
        if w is not None and w.device != dev:
            self.cfg.weight_for(dev)
            if cfg is not self.cfg:
                cfg.class_weight = self.cfg.class_weight
        backend = self._get_backend(dev)
        if cfg.strict != self._strict_on:
            cfg.strict = self._strict_on
        return backend

    # ---- observability ----------------------------------------------------------------
    def summary(self) -> Summary:
        """Selected fraction, samples seen/skipped, passes saved, selection time, entropy,
        and the mean observed loss per epoch (the last entry is the current epoch so far;
        under DDP that one is this rank's until the next selection pass merges them)."""
        self.cursor.settle()
        st, b = self.state, self.budget
        epochs_run = len(b.epoch_counts)
        # Full training: every sample in every epoch the recipe (or the time budget) ran.
        full = self.n * (epochs_run if self.time_mode else int(b.epochs_total))  # type: ignore[arg-type]
        passes = b.trained * self.world_size
        sel_counts = st.selected
        current = self._passes.epoch_loss()
        return Summary({
            "policy": self.policy.name,
            "backend": getattr(self._backend, "name", self.backend_name),
            "budget": b.fraction if not self.time_mode else f"{b.seconds:g} s",
            "epochs_run": epochs_run,
            "selected_fraction": (sum(b.epoch_counts) / (epochs_run * self.n)) if epochs_run else 0.0,
            "samples_seen": int((st.seen > 0).sum()),
            "samples_never_selected": int((sel_counts == 0).sum()),
            "passes": passes,
            "passes_full_training": full,
            "passes_saved": 1.0 - passes / full if full else 0.0,
            "selection_time_s": self._passes.seconds,
            "selection_entropy": selection_entropy(sel_counts),
            "nonfinite_losses": int(st.stats[STAT_NONFINITE]),
            "epoch_mean_losses": self._passes.epoch_losses + ([] if current is None else [current]),
            "elapsed_s": self.elapsed(),
        })

    # ---- checkpoint and resume (fastsel.checkpoint) ------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resume needs to yield exactly the stream an uninterrupted run would;
        tensors, numbers and strings only (loads with ``torch.load(weights_only=True)``).

        ``position`` counts what went through ``loss()``, not what the DataLoader prefetched.
        Under DDP it holds this rank's updates since the last selection pass: save one per
        rank, or save at an epoch boundary.
        """
        self.cursor.settle()   # before any part is read: compiled rows move position and budget
        return checkpoint.state_dict(self._parts())

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a ``state_dict``. Every field is checked before anything is written (a
        bad one is refused, naming it, and nothing changes); no tensor is shared with ``sd``."""
        checkpoint.load(self._parts(), sd)

    def _parts(self) -> checkpoint.Parts:
        b = self.budget
        config = {"n": self.n, "policy": self.policy.config(), "budget": b.fraction,
                  "time_budget": b.seconds, "epochs": b.epochs_total,
                  "world_size": self.world_size, "drop_last": self.drop_last}
        return checkpoint.Parts(config, self.seed, self.time_mode, self.cursor, self.state,
                                self.policy, self._passes, self._sync, b)
