"""Batch-level selection: one training step that backpropagates only some rows of each batch.

``SelectiveStep`` wraps a step of a classification model: the policy scores the batch
(a forward pass without gradients, an early exit, or stale losses), picks the rows for the
backward pass, and the step runs forward + backward on those rows and, if it owns the
optimizer, the optimizer step (with GradScaler, gradient accumulation and a per-step LR
scheduler). An epoch-level :class:`fastsel.Sampler` can run underneath: it chooses the
epoch's samples, sees each sample once through ``sampler.loss(..., update=True)`` in the
selection pass, and weights the backward batch through ``sampler.loss(..., update=False)``.
The passes live in :mod:`fastsel.step_passes`, the checkpoint's fields in
:mod:`fastsel.selective_state` and the on/off schedule in :mod:`fastsel.step_schedule`.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .batch_policies import BatchPolicy, batch_topk, make_batch_policy
from .batch_policies.base import TopK
from .batch_policies.last_losses import LastLosses
from .sampler import Sampler
from .selective_state import check_state, write_state
from .step_passes import StepPasses
from .step_schedule import OnOffSchedule
from .summary import Summary
from .validation.values import check_int


class SelectiveStep(StepPasses):
    """One training step that backpropagates only the rows a batch-level policy picks.

    Args:
        model: the classifier (``model(x)`` → logits [B, C]).
        policy: "sb" (Selective Backprop), "osgd" (Ordered SGD), "sift" or a
            :class:`fastsel.batch_policies.BatchPolicy`; its parameters go in
            ``**policy_kwargs`` (e.g. ``b=``, ``history=``, ``stale=``, ``leftover=``, ``share=``,
            ``scale_factor=`` for SB;
            ``schedule=`` for OSGD; ``module=``, ``exit_lr=``, ``probe_every=`` for SIFT).
        keep: the kept share in (0, 1]. SB: the share (b = 1/keep − 1, default 0.5), kept
            exactly over an epoch by default (``share="exact"``: each batch keeps
            round(carry + keep·B) rows, the remainder carried to the next; see
            :class:`fastsel.batch_policies.SelectiveBackprop`); SB's ``scale_factor=``
            (in (0, 1]) downsamples images for its selection forward. OSGD: the share before
            the accuracy schedule shrinks it (default 1.0); SIFT: the share of each batch
            (default 0.5).
        optimizer: if given, the step owns it: it zeroes the gradients, steps it every
            ``accumulate`` backward batches (through ``scaler`` if given) and then steps
            ``scheduler``. If None, the step only accumulates gradients in ``.grad`` and
            you step the optimizer yourself (check ``last["backward_batches"]``: under SB
            a call runs zero, one or more backward batches).
        scheduler: a per-step LR scheduler (e.g. ``fastsel.BudgetLR``), stepped after each
            optimizer step. Needs ``optimizer``.
        scaler: a ``torch.amp.GradScaler`` for fp16. Needs ``optimizer``.
        autocast: a dtype (``torch.bfloat16``/``torch.float16``): every forward pass runs
            under ``torch.autocast`` on the batch's device; backward runs outside it.
        accumulate: backward batches per optimizer step; each loss is divided by it, so the
            gradient is the mean over all of them.
        sampler: an epoch-level :class:`fastsel.Sampler` running underneath (optional).
            Without one the loss is ``F.cross_entropy`` (or ``loss_fn``).
        batch_size: SB's backward batch size (default: the first input batch's size).
        num_samples: N, for StaleSB's per-sample last loss (default: the sampler's N).
        loss_fn: ``loss_fn(logits, y)`` → per-sample losses [B] (default cross-entropy
            with ``ignore_index``); with a sampler they reach it through ``sampler.observe``.
        ignore_index: label to ignore (the sampler's, when there is one).
        topk: ``(values, k) → positions`` of the k largest (default: a stable sort, ties to
            the lower position); a GPU kernel can be plugged in here.
        seed: seeds SB's random decisions (counter-based, the same on every device).
        profile: synchronise CUDA around timed sections so times are device times.
        start, end: the on/off schedule over training (Composer's): the policy selects
            while start <= progress < end (end = 1.0 includes the very end); before
            ``start`` and from ``end`` on, every row of each batch is trained. Progress is
            the sampler's ``progress()`` when there is a sampler, else the steps so far
            (calls of ``step``) / ``total_steps``. Defaults 0.0 and 1.0: always on.
        interrupt: n >= 2: every n-th step (steps n, 2n, ... counted from 1 over the whole
            run) trains on all rows; 0 (default): never.
        total_steps: the run's number of ``step`` calls (e.g. epochs × batches per epoch),
            for ``start``/``end`` without a sampler.

    Call ``step(x, y, idx)`` (or the object itself) once per batch; it returns the mean
    loss of the backward batches it ran (detached), or None when it ran none (SB still
    filling a batch). Call ``end_epoch()`` at each epoch's end unless a sampler is
    attached (its epoch changes are followed automatically), and ``flush()`` once at the
    end of training to train SB's pending samples.

    Notes: selection forward passes run in the model's current mode, so BatchNorm running
    statistics see them as they see any forward pass. ``summary()`` counts forward and
    backward passes in samples: SB and SIFT pay forward passes the budget does not count.
    Under DDP, OSGD and SIFT run one backward per step on every rank. SB's ranks pool
    different numbers of rows, so each step they agree (one all-reduce of a count) to run
    as many full backward batches as the rank with the fewest can; ``flush()`` and
    ``leftover="flush"`` train the number of rows every rank has, and keep the rest
    pending. Every rank thus runs the same forward and backward passes, as DDP needs.

    A step the schedule turns off (before ``start``, from ``end`` on, an ``interrupt``
    step) does not consult the policy: it runs one forward and backward pass on the whole
    batch, as a plain training step would (not pooled into SB's backward batches; SB's
    pending rows stay pending, its history and quota are left as they are). The sampler,
    if any, observes each row once in that forward (``sampler.loss(update=True)`` on its
    detached logits), and its accuracy counts towards the epoch's.
    """

    def __init__(self, model: nn.Module, policy: Union[str, BatchPolicy] = "sb",
                 keep: Optional[float] = None, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Optional[Any] = None, scaler: Optional[Any] = None,
                 autocast: Optional[torch.dtype] = None, accumulate: int = 1,
                 sampler: Optional[Sampler] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 ignore_index: int = -100, topk: Optional[TopK] = None, seed: int = 0,
                 profile: bool = False, start: float = 0.0, end: float = 1.0,
                 interrupt: int = 0, total_steps: Optional[int] = None,
                 **policy_kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if keep is not None:
            if isinstance(policy, BatchPolicy):
                raise ValueError("keep= given with a BatchPolicy instance: set it on the policy")
            policy_kwargs["keep"] = keep
        pol = make_batch_policy(policy, **policy_kwargs)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if (scheduler is not None or scaler is not None) and optimizer is None:
            raise ValueError("scheduler= and scaler= need optimizer=: the step can only step "
                             "them when it owns the optimizer")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        check_int("accumulate", accumulate, lo=1)
        batch_size = check_int("batch_size", batch_size, lo=1, allow_none=True)
        num_samples = check_int("num_samples", num_samples, lo=1, allow_none=True)
        if sampler is not None:
            if not isinstance(sampler, Sampler):
                raise TypeError(f"sampler must be a fastsel.Sampler, got {type(sampler).__name__}")
            if num_samples is not None and num_samples != sampler.n:
                raise ValueError(f"num_samples={num_samples} but the sampler has N={sampler.n}")
            num_samples = sampler.n
            ignore_index = sampler.cfg.ignore_index
        if topk is not None and not callable(topk):
            raise TypeError("topk must be a callable (values, k) -> positions")
        self.on_off = OnOffSchedule(start, end, interrupt, total_steps, sampler is not None)
        self.start, self.end, self.interrupt = self.on_off.start, self.on_off.end, self.on_off.interrupt
        super().__init__(model, pol, optimizer, scheduler, scaler, autocast, accumulate, sampler,
                         loss_fn, ignore_index, topk or batch_topk, profile)
        self.total_steps = self.on_off.total_steps
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.seed = int(seed)
        self._own_epoch = 0
        self._stats_epoch: Optional[int] = None
        self._closed = False
        self.last: Dict[str, Any] = {}
        self.last_accuracy: Optional[float] = None   # the last closed epoch's, from selection forwards
        self.policy.attach(self)

    @property
    def epoch(self) -> int:
        """The current epoch: the sampler's, or the count of ``end_epoch()`` calls."""
        return self.sampler.epoch if self.sampler is not None else self._own_epoch

    def last_losses(self, idx: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deprecated: StaleSB's last losses are its policy's, ``policy.last_loss.lookup(idx)``."""
        warnings.warn("SelectiveStep.last_losses is deprecated: StaleSB's last losses are kept by "
                      "its policy; use step.policy.last_loss.lookup(idx)", DeprecationWarning,
                      stacklevel=2)
        store = getattr(self.policy, "last_loss", None)
        return (store if isinstance(store, LastLosses) else LastLosses(0)).lookup(idx)

    def _check_batch(self, x: Any, y: Any, idx: Any) -> int:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a tensor with a batch dimension, got {type(x).__name__}")
        b = int(x.shape[0])
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != b \
                or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be a 1-D int64/int32 tensor of {b} labels, got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if idx is None:
            if self.sampler is not None:
                raise ValueError("with a sampler, call step(x, y, idx): the sampler needs the "
                                 "sample indices (fastsel.with_indices gives them)")
        elif not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.shape[0] != b \
                or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be None or a 1-D int64/int32 tensor of {b} indices, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        return b

    def _follow_epoch(self) -> None:
        if self.sampler is not None:
            e = self.sampler.epoch
            if self._stats_epoch is not None and e != self._stats_epoch and not self._closed:
                self.end_epoch()
            if e != self._stats_epoch:
                self._stats_epoch = e
                self._closed = False
        else:
            self._closed = False

    def step(self, x: torch.Tensor, y: torch.Tensor,
             idx: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Select inside the batch, train on the selection; returns the mean loss of the
        backward batches run (detached), or None if none ran."""
        t_start = time.perf_counter()
        b = self._check_batch(x, y, idx)
        self._follow_epoch()
        if self.batch_size is None:
            self.batch_size = b
        selecting = self.selecting()
        if selecting:
            pos = torch.sort(self.policy.choose(self, x, y, idx)).values
        else:
            pos = torch.arange(b, device=x.device)
        self.counts["steps"] += 1
        self.counts["samples_in"] += b
        if selecting:
            self.counts["chosen"] += int(pos.numel())
            ran = self.policy.train_chosen(self, x, y, idx, pos)
        else:   # the schedule is off: a plain step on every row, the policy not consulted
            self.counts["full_steps"] += 1
            self.counts["full_rows"] += b
            ran = [(self.train_rows(x, y, idx, observe=True)[0], idx)]
        self.last = {"chosen": pos, "backward_batches": len(ran),
                     "trained_indices": [i for _, i in ran], "pending": self.policy.pending,
                     "selecting": selecting}
        self.times["total"] += time.perf_counter() - t_start
        if not selecting:
            return ran[0][0]
        return torch.stack([loss for loss, _ in ran]).float().mean() if ran else None

    __call__ = step

    # ---- the on/off schedule ------------------------------------------------------------
    def progress(self) -> float:
        """The share of training done, for ``start``/``end``: the sampler's ``progress()``,
        else the steps so far / ``total_steps`` (0.0 when neither is known)."""
        if self.sampler is not None:
            return float(self.sampler.progress())
        return self.on_off.progress(self.counts["steps"])

    def selecting(self) -> bool:
        """Whether the next ``step`` lets the policy select (the schedule is on), or trains
        every row: off before ``start``, from ``end`` on (end = 1.0 never turns it off) and
        on every ``interrupt``-th step. Under DDP the ranks agree on it (one all-reduce of
        a flag, only when ``start``/``end`` are set: a time budget's progress differs)."""
        return self.on_off.on(self.counts["steps"], self.progress)

    def flush(self) -> Optional[torch.Tensor]:
        """Train SB's pending rows now as one (smaller) backward batch; steps the optimizer
        if it owns one and gradients are pending. Returns the loss, or None if nothing was
        pending. Call it once at the end of training (on every rank under DDP, where it
        trains as many rows as every rank has)."""
        t0 = time.perf_counter()
        loss = self.policy.flush(self)
        self.step_optimizer_if_pending()
        self.times["total"] += time.perf_counter() - t0
        return loss

    def end_epoch(self) -> None:
        """Close the epoch: OSGD's schedule reads its training accuracy, SB's leftovers are
        carried over (or flushed with ``leftover="flush"``). Automatic with a sampler."""
        if self._closed:
            return
        acc = self.take_accuracy()
        t0 = time.perf_counter()
        self.policy.end_epoch(self, acc)   # SB's leftover="flush" trains its pending rows
        self.times["total"] += time.perf_counter() - t0
        self.last_accuracy = acc
        self.counts["epochs_ended"] += 1
        if self.sampler is None:
            self._own_epoch += 1
        self._closed = True

    @property
    def pending(self) -> int:
        """SB's kept rows waiting for a full backward batch."""
        return self.policy.pending

    # ---- observability ----------------------------------------------------------------------
    def summary(self) -> Summary:
        """Forward and backward passes counted separately (in samples), kept share, times."""
        c, t = self.counts, self.times
        forward = c["selection_forward"] + c["train_forward"] + c["probe_forward"]
        out = {
            "policy": self.policy.name,
            "steps": c["steps"],
            "samples_in": c["samples_in"],
            "forward_passes": forward,
            "selection_forward": c["selection_forward"],
            "exit_forward": c["exit_forward"],
            "train_forward": c["train_forward"],
            "probe_forward": c["probe_forward"],
            "backward_passes": c["backward"],
            "backward_batches": c["backward_batches"],
            "optimizer_steps": c["optimizer_steps"],
            "kept_share": c["backward"] / c["samples_in"] if c["samples_in"] else 0.0,
            # rows the policy chose / rows of the steps where it selected (SB's exact share)
            "chosen_share": (c["chosen"] / (c["samples_in"] - c["full_rows"])
                             if c["samples_in"] > c["full_rows"] else None),
            "full_steps": c["full_steps"],
            "pending": self.policy.pending,
            "selection_time_s": t["selection"],
            "selection_forward_time_s": t["selection_forward"],
            "train_time_s": t["train"],
            "total_time_s": t["total"],
        }
        pol = self.policy.summary()
        if "exit_time_s" in pol:
            pol["exit_time_share"] = pol["exit_time_s"] / t["total"] if t["total"] > 0 else 0.0
        out.update(pol)
        return Summary({k: v for k, v in out.items() if v is not None})

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Counters, the policy's state (SB's history, OSGD's share, SIFT's exit head) and
        SB's pending rows (on the CPU). Save it at an optimizer-step boundary: gradients
        accumulated towards the next step are the model's, not saved here."""
        return write_state(self.policy, self._own_epoch, self.counts, self.times, self.batch_size)

    def check_state_dict(self, sd: Any) -> None:
        """Raise a ValueError naming the field unless ``sd`` is a ``state_dict()`` of a step
        with this policy: every field present, of the right type and shape, counters >= 0,
        times finite, StaleSB's last losses finite; the policy's own state checked too.
        Changes nothing."""
        check_state(sd, self.policy)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Check every field first (``check_state_dict``: a bad one raises and nothing
        changes), then restore copies: the step never shares a tensor with ``sd``."""
        self.check_state_dict(sd)
        param = next(self.model.parameters(), None)   # the model's device, if it has one
        self.policy.load_step_fields(sd, None if param is None else param.device)
        self.policy.load_state_dict(sd["policy"])
        self._own_epoch = int(sd["own_epoch"])
        self.counts.update({k: int(v) for k, v in sd["counts"].items()})
        self.times.update({k: float(v) for k, v in sd["times"].items()})
        self.batch_size = None if sd["batch_size"] is None else int(sd["batch_size"])

    def close(self) -> None:
        """Remove the policy's hooks from the model (SIFT's exit hook)."""
        self.policy.detach()
