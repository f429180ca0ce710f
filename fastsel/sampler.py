"""The drop-in sampler: speaks the DataLoader's and FFCV's protocol and takes the loss call.

Data path: ``__iter__`` draws the epoch's selection (fastsel.selection: one pass on the
device over all N samples) → the DataLoader yields this rank's share of it
(fastsel.sharding) → ``loss()`` computes the per-sample loss, folds the epoch's rows
(fastsel.rows) into the per-sample state and returns the scalar to backprop → the next
epoch's selection reads that state. The budget's accounting is fastsel.budget's.
"""
from __future__ import annotations

import dataclasses
import numbers
import sys
import types
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sized, Union

import numpy as np
import torch

from .backends import check_backend_name, get_backend
from .backends.base import state_args
from . import checkpoint, ops
from .budget import Budget
from .validation.tensors import check_observe_args, check_step_args
from .validation.values import is_int
from .config import REDUCTIONS, LossConfig
from .distributed import StateSync, world
from .policies import Policy, make_policy
from .rows import EpochRows
from .selection import SelectionPass
from .sharding import Shard
from .state import STAT_NONFINITE, SampleState
from .summary import Summary, selection_entropy

_CHUNK = 4096   # indices converted to Python ints at a time while iterating


class _EpochIterator(Iterator[int]):
    """Iterates one epoch's shard from the trained position, a chunk of Python ints at a
    time; stateful for torchdata's StatefulDataLoader, which saves and restores it instead
    of fast-forwarding."""

    def __init__(self, sampler: "Sampler") -> None:
        self.sampler = sampler
        self._reset()

    def _reset(self) -> None:
        self.shard = self.sampler._shard_tensor()
        self.i = self.sampler._position
        self._chunk: List[int] = []
        self._chunk_start = self.i

    def __iter__(self) -> "_EpochIterator":
        return self

    def __next__(self) -> int:
        s = self.sampler
        if self.i >= len(self.shard) or not s._may_hand_out(self.i):
            s._exhausted = True
            raise StopIteration
        j = self.i - self._chunk_start
        if j >= len(self._chunk):
            self._chunk_start, j = self.i, 0
            self._chunk = self.shard[self.i:self.i + _CHUNK].tolist()
        self.i += 1
        s.budget.yielded += 1
        return self._chunk[j]

    # torchdata's StatefulDataLoader snapshots this when it fetches the batch it hands to
    # the user, restores the sampler first and then this: the position it carries is then
    # exactly what the user received.
    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.sampler.epoch, "yielded": self.i}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("epoch") != self.sampler.epoch:
            raise ValueError(f"iterator state is for epoch {sd.get('epoch')}, "
                             f"the sampler is at epoch {self.sampler.epoch}")
        y = sd.get("yielded")
        if not is_int(y) or not 0 <= y <= len(self.shard):
            raise ValueError(f"iterator state 'yielded' must be an int in [0, {len(self.shard)}], got {y!r}")
        self.sampler._resume_at(y)
        self._reset()


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
        if isinstance(data, bool) or not (isinstance(data, int) or hasattr(data, "__len__")):
            raise TypeError(f"data must be a dataset with len() or an int, got {type(data).__name__}")
        n = int(data) if isinstance(data, int) else len(data)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError(f"the dataset must have at least one sample, got N={n}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got seed={seed!r} ({type(seed).__name__}): "
                            "pass e.g. seed=0")
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
        self._rows = EpochRows(n, self.state.device)
        # The ops' state arguments, made outside loss calls (again when the state moves).
        self._op_state = state_args(self.state, self._rows.epoch, self._rows)
        self._backend: Optional[Any] = None
        self._backend_device: Optional[torch.device] = None
        self._strict_on: Optional[bool] = None   # strict mode on the bound device
        self.epoch = 0
        self._position = 0           # rows of this epoch's shard the host counted through loss()
        self._epoch_calls = 0        # update calls of this epoch the host counted
        self._exhausted = False      # the epoch's iterator ran out (or its time did)
        self._selection: Optional[torch.Tensor] = None   # global, shuffled, this epoch
        self._selection_epoch: Optional[int] = None
        self._shard_cpu: Optional[torch.Tensor] = None
        self._shard_len = -1         # its length (-1: none drawn)
        self._warned_spent = False
        self._warned: set = set()    # the counting warnings already given (each warns once)

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
        self._settle()
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
        self._settle(cheap_only=True)
        return self.budget.may_hand_out(handed_out - self._position)

    @property
    def position(self) -> int:
        """Rows of this epoch's shard trained through ``loss``/``observe``/``skip`` (compiled
        calls included: read from the device's count once one was traced)."""
        self._settle()
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._position = value

    def _resume_at(self, position: int) -> None:
        """Continue the drawn epoch from ``position`` (a restored iterator): the host's count
        and the device's."""
        self._position = position
        if self._drawn():
            self._rows.open(self._selection, self.epoch, self._shard_len, position)
            self._epoch_calls = 0

    # ---- epochs and iteration -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (DistributedSampler's convention)."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got epoch={epoch!r}")
        if epoch != self.epoch:
            self._close_epoch()
            self.epoch = epoch
            self._position = 0
            self._epoch_calls = 0
        self._exhausted = False

    def _drawn(self) -> bool:
        return self._selection_epoch == self.epoch

    def _epoch_trained(self) -> bool:
        self._settle()
        return self._drawn() and self._position >= self._shard_len

    def _epoch_done(self) -> bool:
        return self._drawn() and (self._exhausted or self._epoch_trained())

    # ---- what counts: rows trained -------------------------------------------------------
    def _settle(self, cheap_only: bool = False) -> None:
        """Bring the host's count of the epoch's trained rows up to the device's, which also
        counts the calls the host did not run (compiled ones): a no-op until one was traced."""
        if not self._drawn():
            return
        got = self._rows.settle(cheap_only)
        if got is None:
            return
        trained, calls = got
        if trained > self._position:
            self.budget.consumed(trained - self._position, max(0, calls - self._epoch_calls))
            self._position = trained
        self._epoch_calls = max(self._epoch_calls, calls)

    def _close_epoch(self) -> None:
        """Before the sampler moves past a drawn epoch: warn (once each) when it was handed
        out but not trained (a reused sampler), or only partly trained (drop_last, a break)."""
        if not self._drawn() or self.time_mode:
            return
        self._settle()
        shard = self._shard_len
        if self._position >= shard or not self.budget.loss_calls:
            return
        if self._position == 0 and self._exhausted:
            self._warn_once("untrained", f"fastsel: epoch {self.epoch} was handed out but none of its "
                            f"{shard} rows were trained, so the budget skips it: was the sampler "
                            "iterated twice in one epoch (an evaluation DataLoader given the training "
                            "sampler, or list(sampler) called again inside the loop)? Give evaluation "
                            "its own sampler (e.g. torch.utils.data.SequentialSampler)")
        elif self._position > 0:
            self._warn_once("partial", f"fastsel: epoch {self.epoch} trained {self._position} of its "
                            f"{shard} rows: DataLoader(drop_last=True) drops the last partial batch, "
                            "or the loop left the epoch early (a break); the budget will end unspent. "
                            "Pass drop_last=False to the DataLoader (the sampler already fixes each "
                            "epoch's length)")

    def _warn_unspent(self) -> None:
        """At the end of a fraction budget: warn once if rows of it were never trained."""
        if self.time_mode or not self.budget.loss_calls or self.num_epochs is None:
            return
        self._settle()
        total = self.num_epochs * self.shard.length(self.budget.epoch_count(self.n))
        short = total - self.budget.trained
        if short > 0:
            self._warn_once("unspent", f"fastsel: the run ended with {short} of the budget's {total} "
                            f"rows untrained on this rank (progress {self.progress():.3f}, so BudgetLR "
                            "did not reach 0): DataLoader(drop_last=True) or a break out of an epoch? "
                            "Pass drop_last=False and let every epoch run to its end")

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(text, stacklevel=4)

    def _next_epoch(self) -> int:
        """The epoch the next iteration draws: the current one, or the one after it once
        its iterator ran out."""
        return self.epoch + 1 if self._epoch_done() and self._exhausted else self.epoch

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
        e = self.epoch + 1 if self._epoch_done() else self.epoch
        while not self.budget.past_end(e):
            if self._time_up():
                return
            self.set_epoch(e)
            yield e
            e = self.epoch + 1
        self._close_epoch()
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
        if self._epoch_done() and (self._exhausted or trained_is_done):
            self.set_epoch(self.epoch + 1)
        if self._spent():
            self._exhausted = True
            return False
        self._ensure_selection()
        return True

    def __iter__(self) -> Iterator[int]:
        _refuse_wrappers(sys._getframe(1))
        return _EpochIterator(self) if self._start_iteration() else iter(())

    def __len__(self) -> int:
        """This rank's whole epoch length (also after a mid-epoch resume); 0 past the budget.
        Pure: no selection pass, no collective. Under a time budget, before the epoch is
        drawn, it is the policy's share; the pass may fit it to the time left."""
        e = self._next_epoch()
        if self.budget.past_end(e) or self.budget.time_up():   # this process's clock: no collective
            return 0
        k = self._selection.numel() if e == self._selection_epoch else self.budget.epoch_count(self.n)  # type: ignore[union-attr]
        return self.shard.length(k)

    def epoch_indices(self) -> List[int]:
        """This rank's indices still to train in the current epoch, drawing its selection
        if needed; the same list however often it is asked."""
        return self.epoch_array().tolist()

    def epoch_array(self) -> "np.ndarray":
        """This rank's indices still to train in the current epoch, as an int64 numpy array
        (for FFCV), drawing its selection if needed."""
        return self._shard_tensor()[self.position:].numpy()

    def _shard_tensor(self) -> torch.Tensor:
        """This rank's shard of the epoch's selection, on the host."""
        self._ensure_selection()
        if self._shard_cpu is None:
            self._shard_cpu = self.shard.take(self._selection)  # type: ignore[arg-type]
        return self._shard_cpu

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
        if self._selection_epoch == self.epoch:
            return
        progress = self.progress() if self.time_mode else self.epoch / max(1, self.num_epochs)  # type: ignore[arg-type]
        order = self._passes(self.epoch, self._get_backend, self._rows.take_faults(), progress)
        self._set_selection(order, self.epoch)

    def _set_selection(self, order: Optional[torch.Tensor], epoch: Optional[int]) -> None:
        """The epoch's selection (None: none), and its rows opened on the device for the ops."""
        self._selection, self._selection_epoch = order, epoch
        self._shard_cpu = None
        shard = len(self._shard_tensor()) if order is not None else -1  # the one device→host copy
        self._shard_len = shard
        self._rows.open(order, self.epoch if epoch is None else epoch, shard, self._position)
        self._epoch_calls = 0

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
            _refuse_call_settings("loss", unknown)
        cfg = self._call_config(reduction)
        check_step_args(logits, target, indices, cfg)
        host = update and not torch.compiler.is_compiling()
        if host:
            self._check_room(logits.shape[0])
        backend = self._follow(logits.device, cfg)
        out = ops.ce_step(backend.step_impl(logits, target), logits, target, indices,
                          self._op_state, cfg, update)  # type: ignore[arg-type]
        if host:
            self._consumed(logits.shape[0])
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
            _refuse_call_settings("observe", unknown)
        check_observe_args(losses, indices, p_true)
        cfg = self._call_config(reduction)
        host = update and not torch.compiler.is_compiling()
        if host:
            self._check_room(losses.shape[0])
        backend = self._follow(losses.device, cfg)
        out = ops.observe(backend.observe_impl(losses), losses, p_true, indices,
                          self._op_state, cfg, update)  # type: ignore[arg-type]
        if host:
            self._consumed(losses.shape[0])
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
        self._check_room(int(indices.shape[0]))
        if indices.device != self._rows.device:
            raise ValueError(f"indices is on {indices.device} but the sampler's state is on "
                             f"{self._rows.device}: move it with .to({str(self._rows.device)!r})")
        self._rows.skip(indices, strict)
        self._consumed(int(indices.shape[0]))

    def _check_room(self, b: int) -> None:
        """Refuse ``b`` rows outside an epoch in progress or past its shard (fastsel.rows),
        before the call moves or writes anything."""
        self._rows.check_room(b, epoch=self.epoch, drawn=self._drawn(), position=self._position,
                              shard_len=self._shard_len)

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
            if self._selection is not None:
                self._selection = self._selection.to(dev)
            self._rows.to(dev)
            self._op_state = state_args(self.state, self._rows.epoch, self._rows)
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

    def _consumed(self, b: int) -> None:
        """A batch of b rows went through (the host saw it): the epoch position and the
        budget advance, as the ops advanced the device's count."""
        self._position += b
        self._epoch_calls += 1
        self.budget.consumed(b)

    # ---- observability ----------------------------------------------------------------
    def summary(self) -> Summary:
        """Selected fraction, samples seen/skipped, passes saved, selection time, entropy,
        and the mean observed loss per epoch (the last entry is the current epoch so far;
        under DDP that one is this rank's until the next selection pass merges them)."""
        self._settle()
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
        self._settle()
        return checkpoint.state_dict(self)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a ``state_dict``. Every field is checked before anything is written (a
        bad one is refused, naming it, and nothing changes); no tensor is shared with ``sd``."""
        checkpoint.load(self, sd)


#: Loss settings a user may pass to the call, where they belong on the Sampler.
_SAMPLER_SETTINGS = ("ignore_index", "label_smoothing", "class_weight", "weight", "ema")


def _refuse_call_settings(call: str, unknown: Dict[str, Any]) -> None:
    """Refuse keyword arguments ``loss``/``observe`` do not take, naming where they go."""
    name, value = next(iter(unknown.items()))
    if name in _SAMPLER_SETTINGS:
        arg = "class_weight" if name == "weight" else name
        raise TypeError(f"Sampler.{call}() takes no {name}={value!r}: the loss settings belong on the "
                        f"Sampler, set once for every call: fastsel.Sampler(..., {arg}={value!r})")
    raise TypeError(f"Sampler.{call}() got an unexpected keyword argument {name!r} (it takes "
                    "reduction= and update=; the loss settings go on the Sampler)")


def _refuse_wrappers(frame: Optional[types.FrameType]) -> None:
    """Refuse iteration by a distributed wrapper (Lightning's DistributedSamplerWrapper, a
    torch DistributedSampler over the sampler): fastsel shards itself, so a wrapper would
    shard its shard and read lengths of epochs it does not know."""
    for _ in range(3):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.utils.data.DistributedSampler) or type(owner).__name__ == "_DatasetSamplerWrapper":
            raise TypeError(f"fastsel.Sampler is being iterated by {type(owner).__name__}, a distributed "
                            "wrapper: fastsel shards itself (num_replicas and rank default to the process "
                            "group). Give the DataLoader the Sampler itself: in Lightning pass "
                            "Trainer(use_distributed_sampler=False); elsewhere drop the "
                            "DistributedSampler/DistributedSamplerWrapper")
        frame = frame.f_back
