"""Batch-level selection: one training step that backpropagates only some rows of each batch.

``SelectiveStep`` wraps a step of a classification model: the policy scores the batch
(a forward pass without gradients, an early exit, or stale losses), picks the rows for the
backward pass, and the step runs forward + backward on those rows and, if it owns the
optimizer, the optimizer step (with GradScaler, gradient accumulation and a per-step LR
scheduler). An epoch-level :class:`fastsel.Sampler` can run underneath: it chooses the
epoch's samples, sees each sample once through ``sampler.loss(..., update=True)`` in the
selection pass, and weights the backward batch through ``sampler.loss(..., update=False)``.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch_policies import BatchPolicy, batch_topk, make_batch_policy
from .batch_policies.base import TopK, downsample
from .distributed import agree_min
from .sampler import Sampler
from .validation.fields import check_int, check_keys, check_real, check_tensor, check_values, refuse, require
from .summary import Summary

_FORMAT = 1


def _check_positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={v!r}")


def _check_schedule(start: Any, end: Any, interrupt: Any) -> Tuple[float, float, int]:
    """The on/off schedule's (start, end, interrupt), or an error naming the bad one."""
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a share of training in [0, 1], got {name}={v!r}")
    if not start < end:
        raise ValueError(f"start must be below end (the policy selects while start <= progress "
                         f"< end), got start={start!r}, end={end!r}")
    if isinstance(interrupt, bool) or not isinstance(interrupt, int) or interrupt < 0 \
            or interrupt == 1:
        raise ValueError(f"interrupt must be 0 (never) or an int n >= 2 (every n-th step trains "
                         f"on all rows), got interrupt={interrupt!r}")
    return float(start), float(end), int(interrupt)


class SelectiveStep:
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
        self.policy = make_batch_policy(policy, **policy_kwargs)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if (scheduler is not None or scaler is not None) and optimizer is None:
            raise ValueError("scheduler= and scaler= need optimizer=: the step can only step "
                             "them when it owns the optimizer")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        _check_positive_int("accumulate", accumulate)
        _check_positive_int("batch_size", batch_size, allow_none=True)
        _check_positive_int("num_samples", num_samples, allow_none=True)
        if sampler is not None:
            if not isinstance(sampler, Sampler):
                raise TypeError(f"sampler must be a fastsel.Sampler, got {type(sampler).__name__}")
            if num_samples is not None and num_samples != sampler.n:
                raise ValueError(f"num_samples={num_samples} but the sampler has N={sampler.n}")
            num_samples = sampler.n
            ignore_index = sampler.cfg.ignore_index
        if topk is not None and not callable(topk):
            raise TypeError("topk must be a callable (values, k) -> positions")
        self.start, self.end, self.interrupt = _check_schedule(start, end, interrupt)
        _check_positive_int("total_steps", total_steps, allow_none=True)
        if total_steps is not None and sampler is not None:
            raise ValueError(f"total_steps={total_steps} given with a sampler: the schedule's "
                             f"progress is the sampler's progress(); drop total_steps")
        if (self.start > 0.0 or self.end < 1.0) and sampler is None and total_steps is None:
            raise ValueError(f"start={start!r}, end={end!r} need the training's progress: pass "
                             f"total_steps= (the run's number of step calls) or a sampler")
        self.total_steps = total_steps
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.autocast = autocast
        self.accumulate = int(accumulate)
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.loss_fn = loss_fn
        self.ignore_index = int(ignore_index)
        self._topk = topk or batch_topk
        self.seed = int(seed)
        self.profile = bool(profile)
        # Pending rows of SB (inputs, labels, indices), kept until a full backward batch.
        self._pend: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        self._pending = 0
        self._micro = 0                  # backward batches since the last optimizer step
        self._own_epoch = 0
        self._stats_epoch: Optional[int] = None
        self._closed = False
        self._correct: Optional[torch.Tensor] = None
        self._counted: Optional[torch.Tensor] = None
        self._last_loss: Optional[torch.Tensor] = None
        self._known: Optional[torch.Tensor] = None
        self.counts = {"steps": 0, "samples_in": 0, "selection_forward": 0, "exit_forward": 0,
                       "train_forward": 0, "backward": 0, "probe_forward": 0,
                       "backward_batches": 0, "optimizer_steps": 0, "epochs_ended": 0,
                       "chosen": 0, "full_steps": 0, "full_rows": 0}
        self.times = {"total": 0.0, "selection": 0.0, "selection_forward": 0.0, "train": 0.0}
        self.last: Dict[str, Any] = {}
        self.last_accuracy: Optional[float] = None   # the last closed epoch's, from selection forwards
        self.policy.attach(self)

    # ---- helpers the policies call -------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch: the sampler's, or the count of ``end_epoch()`` calls."""
        return self.sampler.epoch if self.sampler is not None else self._own_epoch

    def clock(self) -> float:
        self.sync_for_timing()
        return time.perf_counter()

    def sync_for_timing(self) -> None:
        if self.profile and torch.cuda.is_available():
            torch.cuda.synchronize()

    def add_selection_time(self, t0: float) -> None:
        self.times["selection"] += self.clock() - t0

    def topk(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the k largest values (ties to the lower position)."""
        return self._topk(values, int(k))

    def autocast_ctx(self, x: torch.Tensor) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast)

    def count_selection_forward(self, n: int) -> None:
        self.counts["selection_forward"] += n

    def count_exit_forward(self, n: int) -> None:
        self.counts["exit_forward"] += n

    def _per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            per = self.loss_fn(logits, y)
            if not isinstance(per, torch.Tensor) or per.shape != (logits.shape[0],):
                raise ValueError(f"loss_fn must return per-sample losses of shape "
                                 f"[{logits.shape[0]}], got {getattr(per, 'shape', type(per))}")
            return per
        return F.cross_entropy(logits.float(), y.to(torch.int64), reduction="none",
                               ignore_index=self.ignore_index)

    def observe(self, logits: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
        """Feed every row once to the sampler's state: ``sampler.loss(update=True)``, or with
        ``loss_fn`` its per-sample losses through ``sampler.observe``."""
        if self.sampler is not None:
            with torch.no_grad():
                if self.loss_fn is not None:
                    self.sampler.observe(self._per_sample(logits.detach(), y), idx,  # type: ignore[arg-type]
                                         reduction="none")
                else:
                    self.sampler.loss(logits.detach(), y, idx, reduction="none")  # type: ignore[arg-type]

    def skip_observation(self, idx: Optional[torch.Tensor]) -> None:
        """A batch chosen on stale losses: the sampler (if any) counts it as consumed."""
        if self.sampler is not None:
            self.sampler.skip(idx)  # type: ignore[arg-type]

    def _record_last(self, idx: Optional[torch.Tensor], losses: torch.Tensor) -> None:
        if not self.policy.needs_last_loss or idx is None:
            return
        if self._last_loss is None:
            n = int(self.num_samples)  # type: ignore[arg-type]
            self._last_loss = torch.zeros(n, dtype=torch.float32, device=losses.device)
            self._known = torch.zeros(n, dtype=torch.bool, device=losses.device)
        elif self._last_loss.device != losses.device:   # e.g. loaded on another device
            self._last_loss = self._last_loss.to(losses.device)
            self._known = self._known.to(losses.device)  # type: ignore[union-attr]
        i = idx.to(device=losses.device, dtype=torch.int64)
        loss = losses.detach().float()
        # A NaN/inf loss is no usable last loss: the sample counts as unknown, so always kept
        # (as the CDF of 1 of a NaN or +inf loss kept it) and the saved last losses are finite.
        finite = torch.isfinite(loss)
        self._last_loss.index_copy_(0, i, torch.where(finite, loss, torch.zeros_like(loss)))
        self._known.index_copy_(0, i, finite)  # type: ignore[union-attr]

    def last_losses(self, idx: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(each sample's last recorded loss, whether it has one) for StaleSB."""
        if idx is None:
            raise ValueError("stale Selective Backprop needs the sample indices: call step(x, y, idx)")
        i = idx.to(torch.int64)
        if self._last_loss is None:
            return (torch.zeros(i.shape[0], dtype=torch.float32, device=i.device),
                    torch.zeros(i.shape[0], dtype=torch.bool, device=i.device))
        i = i.to(self._last_loss.device)
        return self._last_loss[i], self._known[i]  # type: ignore[index]

    def _count_accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a forward's correct predictions to the epoch's (read by OSGD's schedule)."""
        with torch.no_grad():
            active = y != self.ignore_index
            correct = ((logits.detach().argmax(1) == y) & active).sum()
            if self._correct is None:
                self._correct = torch.zeros((), dtype=torch.int64, device=correct.device)
                self._counted = torch.zeros((), dtype=torch.int64, device=correct.device)
            self._correct += correct
            self._counted += active.sum()  # type: ignore[operator]

    def selection_forward(self, x: torch.Tensor, y: torch.Tensor,
                          idx: Optional[torch.Tensor], scale_factor: float = 1.0) -> torch.Tensor:
        """A forward pass without gradients on every row: per-sample losses (float32).

        ``scale_factor`` < 1: the forward sees the images [B, C, H, W] downsampled by it
        (bilinear; refused for other inputs). The sampler (if any) observes each row here,
        once; the epoch's accuracy and StaleSB's last losses are recorded from it."""
        t0 = self.clock()
        xs = downsample(x, scale_factor)
        with torch.no_grad():
            with self.autocast_ctx(xs):
                if xs is x:
                    logits = self.model(xs)
                else:
                    try:
                        logits = self.model(xs)
                    except RuntimeError as e:
                        raise RuntimeError(
                            f"the model failed on the downsampled selection input "
                            f"{tuple(xs.shape)} (scale_factor={scale_factor}, from "
                            f"{tuple(x.shape)}): with scale_factor < 1 it must accept smaller "
                            f"images (e.g. global average pooling before the classifier): {e}"
                        ) from e
            losses = self._per_sample(logits, y).detach().float()
            self.observe(logits, y, idx)
            self._count_accuracy(logits, y)
            self._record_last(idx, losses)
        self.counts["selection_forward"] += int(x.shape[0])
        self.times["selection_forward"] += self.clock() - t0
        return losses

    def probe_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """True per-sample losses without gradients, counted as probe forward passes."""
        with torch.no_grad():
            with self.autocast_ctx(x):
                logits = self.model(x)
            out = self._per_sample(logits, y).detach().float()
        self.counts["probe_forward"] += int(x.shape[0])
        return out

    # ---- training -----------------------------------------------------------------------
    def _train(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor],
               observe: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward on one backward batch, optimizer step when due.
        ``observe``: this forward is the rows' only one (a step the schedule turned off):
        the sampler observes them in it and it counts towards the epoch's accuracy.
        Returns (the batch's loss, its per-sample losses), both detached."""
        t0 = self.clock()
        opt = self.optimizer
        if opt is not None and self._micro == 0:
            opt.zero_grad(set_to_none=True)
        with self.autocast_ctx(x):
            logits = self.model(x)
            if observe:
                self.observe(logits, y, idx)
                self._count_accuracy(logits, y)
            if self.sampler is not None:
                red = None if self.sampler.cfg.reduction != "none" else "mean"
                if self.loss_fn is not None:
                    per_g = self._per_sample(logits, y)
                    loss = self.sampler.observe(per_g, idx, reduction=red, update=False)  # type: ignore[arg-type]
                    per = per_g.detach().float()
                else:
                    loss = self.sampler.loss(logits, y, idx, reduction=red, update=False)  # type: ignore[arg-type]
                    per = F.cross_entropy(logits.detach().float(), y.to(torch.int64), reduction="none",
                                          ignore_index=self.ignore_index)
            else:
                per_g = self._per_sample(logits, y)
                if self.loss_fn is None:
                    loss = F.cross_entropy(logits, y.to(torch.int64), ignore_index=self.ignore_index)
                else:
                    loss = per_g.mean()
                per = per_g.detach().float()
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        self._micro += 1
        n = int(x.shape[0])
        self.counts["train_forward"] += n
        self.counts["backward"] += n
        self.counts["backward_batches"] += 1
        if opt is not None and self._micro >= self.accumulate:
            self._optimizer_step()
        self._record_last(idx, per)
        self.times["train"] += self.clock() - t0
        return loss.detach(), per

    def _optimizer_step(self) -> None:
        opt = self.optimizer
        assert opt is not None
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self._micro = 0
        self.counts["optimizer_steps"] += 1

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
        losses: List[torch.Tensor] = []
        trained: List[Optional[torch.Tensor]] = []
        if not self.selecting():
            # The schedule is off: a plain step on every row, the policy not consulted.
            self.counts["steps"] += 1
            self.counts["samples_in"] += b
            self.counts["full_steps"] += 1
            self.counts["full_rows"] += b
            losses.append(self._train(x, y, idx, observe=True)[0])
            trained.append(idx)
            self.last = {"chosen": torch.arange(b, device=x.device), "backward_batches": 1,
                         "trained_indices": trained, "pending": self._pending, "selecting": False}
            self.times["total"] += time.perf_counter() - t_start
            return losses[0]
        pos = self.policy.choose(self, x, y, idx)
        pos = torch.sort(pos).values
        self.counts["steps"] += 1
        self.counts["samples_in"] += b
        self.counts["chosen"] += int(pos.numel())
        if self.policy.fixed_batch:
            if pos.numel():
                self._pend.append((x[pos], y[pos], None if idx is None else idx[pos]))
                self._pending += int(pos.numel())
            for _ in range(agree_min(self._pending // self.batch_size)):
                xb, yb, ib = self._take(self.batch_size)
                losses.append(self._train(xb, yb, ib)[0])
                trained.append(ib)
        elif pos.numel():
            ib = None if idx is None else idx[pos]
            loss, per = self._train(x[pos], y[pos], ib)
            losses.append(loss)
            trained.append(ib)
            self.policy.after_train(self, x, y, idx, pos, per)
        self.last = {"chosen": pos, "backward_batches": len(losses), "trained_indices": trained,
                     "pending": self._pending, "selecting": True}
        self.times["total"] += time.perf_counter() - t_start
        if not losses:
            return None
        return torch.stack(losses).float().mean()

    __call__ = step

    # ---- the on/off schedule ------------------------------------------------------------
    def progress(self) -> float:
        """The share of training done, for ``start``/``end``: the sampler's ``progress()``,
        else the steps so far / ``total_steps`` (0.0 when neither is known)."""
        if self.sampler is not None:
            return float(self.sampler.progress())
        if self.total_steps is None:
            return 0.0
        return min(1.0, self.counts["steps"] / self.total_steps)

    def selecting(self) -> bool:
        """Whether the next ``step`` lets the policy select (the schedule is on), or trains
        every row: off before ``start``, from ``end`` on (end = 1.0 never turns it off) and
        on every ``interrupt``-th step. Under DDP the ranks agree on it (one all-reduce of
        a flag, only when ``start``/``end`` are set: a time budget's progress differs)."""
        if self.interrupt and (self.counts["steps"] + 1) % self.interrupt == 0:
            return False
        if self.start == 0.0 and self.end == 1.0:
            return True
        p = self.progress()
        on = self.start <= p and (p < self.end or self.end == 1.0)
        return bool(agree_min(int(on)))

    def _pooled(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The pending rows as one (inputs, labels, indices), kept as the only pending entry."""
        xs = torch.cat([p[0] for p in self._pend])
        ys = torch.cat([p[1] for p in self._pend])
        has_idx = all(p[2] is not None for p in self._pend)
        ids = torch.cat([p[2] for p in self._pend]) if has_idx else None  # type: ignore[misc]
        self._pend = [(xs, ys, ids)]
        return xs, ys, ids

    def _take(self, n: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        xs, ys, ids = self._pooled()
        out = (xs[:n], ys[:n], None if ids is None else ids[:n])
        rest = xs.shape[0] - n
        self._pend = [(xs[n:], ys[n:], None if ids is None else ids[n:])] if rest > 0 else []
        self._pending = rest
        return out

    def _train_pending(self) -> Optional[torch.Tensor]:
        """Train the pending rows that every rank has (all of them without DDP) as one
        batch; its loss, or None if there were none."""
        rows = agree_min(self._pending)
        if not rows:
            return None
        xb, yb, ib = self._take(rows)
        return self._train(xb, yb, ib)[0]

    def flush(self) -> Optional[torch.Tensor]:
        """Train SB's pending rows now as one (smaller) backward batch; steps the optimizer
        if it owns one and gradients are pending. Returns the loss, or None if nothing was
        pending. Call it once at the end of training (on every rank under DDP, where it
        trains as many rows as every rank has)."""
        t0 = time.perf_counter()
        loss = self._train_pending()
        if self.optimizer is not None and self._micro:
            self._optimizer_step()
        self.times["total"] += time.perf_counter() - t0
        return loss

    def end_epoch(self) -> None:
        """Close the epoch: OSGD's schedule reads its training accuracy, SB's leftovers are
        carried over (or flushed with ``leftover="flush"``). Automatic with a sampler."""
        if self._closed:
            return
        acc = None
        if self._counted is not None:
            cnt = int(self._counted)
            acc = int(self._correct) / cnt if cnt else None  # type: ignore[arg-type]
            self._correct.zero_()  # type: ignore[union-attr]
            self._counted.zero_()
        self.policy.end_epoch(self, acc)
        self.last_accuracy = acc
        if getattr(self.policy, "leftover", "carry") == "flush":
            t0 = time.perf_counter()
            self._train_pending()
            self.times["total"] += time.perf_counter() - t0
        self.counts["epochs_ended"] += 1
        if self.sampler is None:
            self._own_epoch += 1
        self._closed = True

    @property
    def pending(self) -> int:
        """SB's kept rows waiting for a full backward batch."""
        return self._pending

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
            "pending": self._pending,
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
        pend = None
        if self._pending:
            xs, ys, ids = self._pooled()
            pend = {"x": xs.detach().cpu().clone(), "y": ys.detach().cpu().clone(),
                    "idx": None if ids is None else ids.detach().cpu().clone()}
        return {"format": _FORMAT, "config": self.policy.config(), "own_epoch": self._own_epoch,
                "counts": dict(self.counts), "times": dict(self.times),
                "policy": self.policy.state_dict(), "batch_size": self.batch_size,
                "last_loss": None if self._last_loss is None else self._last_loss.cpu().clone(),
                "known": None if self._known is None else self._known.cpu().clone(),
                "pending": pend}

    def _device(self) -> Optional[torch.device]:
        """The model's device (None for a model without parameters)."""
        param = next(self.model.parameters(), None)
        return None if param is None else param.device

    def _pending_rows(self, pend: Any, load: bool = True
                      ) -> List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """Saved pending rows, checked, then (``load``) copied onto the model's device."""
        if pend is None:
            return []
        if not isinstance(pend, dict):
            raise refuse("pending", f"must be None or a dict of x, y, idx, got {type(pend).__name__}")
        for key in ("x", "y", "idx"):
            require(pend, key, "pending")
        check_keys(pend, ("x", "y", "idx"), "pending")
        x, y, ids = pend["x"], pend["y"], pend["idx"]
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise refuse("pending.x", f"must be a tensor of rows, got {type(x).__name__}")
        for name, t in (("y", y), ("idx", ids)):
            if t is None and name == "idx":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
                raise refuse(f"pending.{name}", f"must be a 1-D int64/int32 tensor, got "
                                                f"{getattr(t, 'dtype', type(t).__name__)} "
                                                f"{tuple(getattr(t, 'shape', ()))}")
        rows = int(x.shape[0])
        if int(y.shape[0]) != rows or (ids is not None and int(ids.shape[0]) != rows):
            raise ValueError(f"pending rows disagree: {rows} inputs, {int(y.shape[0])} labels, "
                             f"{None if ids is None else int(ids.shape[0])} indices")
        if rows == 0:
            raise refuse("pending", "holds no rows: it must be None when nothing is pending")
        if ids is not None and self.num_samples is not None:
            check_values("pending.idx", ids, lo=0, hi=self.num_samples - 1)
        if not load:
            return []
        dev = self._device() or x.device
        return [(x.detach().to(dev, copy=True), y.detach().to(dev, copy=True),
                 None if ids is None else ids.detach().to(dev, copy=True))]

    def _last_loss_state(self, sd: Dict[str, Any], load: bool = True
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """StaleSB's saved (last loss, known), checked, then (``load``) copied onto the
        model's device."""
        last, known = sd["last_loss"], sd["known"]
        if (last is None) != (known is None):
            raise refuse("last_loss" if last is None else "known",
                         "is None but " + ("known" if last is None else "last_loss") + " is not: "
                         "both are saved together")
        if last is None:
            return None, None
        if self.num_samples is None:
            raise refuse("last_loss", "is saved, but this step has no num_samples= to hold it")
        n = int(self.num_samples)
        check_tensor("last_loss", last, torch.float32, (n,))
        check_values("last_loss", last, finite=True)
        check_tensor("known", known, torch.bool, (n,))
        if not load:
            return None, None
        dev = self._device() or last.device
        return last.detach().to(dev, copy=True), known.detach().to(dev, copy=True)

    _KEYS = ("format", "config", "own_epoch", "counts", "times", "policy", "batch_size",
             "last_loss", "known", "pending")

    def check_state_dict(self, sd: Any) -> None:
        """Raise a ValueError naming the field unless ``sd`` is a ``state_dict()`` of a step
        with this policy: every field present, of the right type and shape, counters >= 0,
        times finite, StaleSB's last losses finite; the policy's own state checked too.
        Changes nothing."""
        if not isinstance(sd, dict) or sd.get("format") != _FORMAT:
            raise ValueError(f"not a fastsel SelectiveStep state_dict of format {_FORMAT}")
        for key in self._KEYS:
            if key != "pending":   # older checkpoints had none
                require(sd, key)
        check_keys(sd, self._KEYS, "")
        if sd["config"] != self.policy.config():
            raise ValueError(f"state_dict is for policy {sd['config']}, this step has "
                             f"{self.policy.config()}")
        check_int("own_epoch", sd["own_epoch"], lo=0)
        for field, table in (("counts", self.counts), ("times", self.times)):
            d = sd[field]
            if not isinstance(d, dict):
                raise refuse(field, f"must be a dict, got {type(d).__name__}")
            check_keys(d, tuple(table), field)
            for k, v in d.items():
                if field == "counts":
                    check_int(f"counts.{k}", v, lo=0)
                else:
                    check_real(f"times.{k}", v, lo=0.0)
        if sd["batch_size"] is not None:
            check_int("batch_size", sd["batch_size"], lo=1)
        self._last_loss_state(sd, load=False)
        self._pending_rows(sd.get("pending"), load=False)
        self.policy.check_state_dict(sd["policy"])

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Check every field first (``check_state_dict``: a bad one raises and nothing
        changes), then restore copies: the step never shares a tensor with ``sd``."""
        self.check_state_dict(sd)
        pend = self._pending_rows(sd.get("pending"))
        last, known = self._last_loss_state(sd)
        self.policy.load_state_dict(sd["policy"])
        self._pend, self._pending = pend, sum(int(p[0].shape[0]) for p in pend)
        self._own_epoch = int(sd["own_epoch"])
        self.counts.update({k: int(v) for k, v in sd["counts"].items()})
        self.times.update({k: float(v) for k, v in sd["times"].items()})
        self.batch_size = None if sd["batch_size"] is None else int(sd["batch_size"])
        self._last_loss, self._known = last, known

    def close(self) -> None:
        """Remove the policy's hooks from the model (SIFT's exit hook)."""
        self.policy.detach()
