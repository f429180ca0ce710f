"""The passes a :class:`fastsel.SelectiveStep` runs for its batch policy — the selection
forward, the probe forward, the training forward + backward and the optimizer step — each
counted and timed: the step's side of :class:`fastsel.batch_policies.StepView`."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch_policies import BatchPolicy
from .batch_policies.base import TopK, downsample
from .sampler import Sampler

#: Counters of ``StepPasses.counts`` (in samples, but for the steps, batches and epochs).
COUNTS = ("steps", "samples_in", "selection_forward", "exit_forward", "train_forward",
          "backward", "probe_forward", "backward_batches", "optimizer_steps", "epochs_ended",
          "chosen", "full_steps", "full_rows")
#: Timers of ``StepPasses.times`` (seconds).
TIMES = ("total", "selection", "selection_forward", "train")


class StepPasses:
    """Forward and backward passes of ``model`` for ``policy``: the loss (the sampler's,
    ``loss_fn`` or cross-entropy), autocast, gradient accumulation, the optimizer (through
    ``scaler``) and ``scheduler``; every pass counted in ``counts`` and timed in ``times``.
    The arguments are checked by :class:`fastsel.SelectiveStep`, which subclasses it."""

    def __init__(self, model: nn.Module, policy: BatchPolicy, optimizer: Optional[torch.optim.Optimizer],
                 scheduler: Optional[Any], scaler: Optional[Any], autocast: Optional[torch.dtype],
                 accumulate: int, sampler: Optional[Sampler],
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                 ignore_index: int, topk: TopK, profile: bool) -> None:
        self.model = model
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.autocast = autocast
        self.accumulate = int(accumulate)
        self.sampler = sampler
        self.loss_fn = loss_fn
        self.ignore_index = int(ignore_index)
        self._topk = topk
        self.profile = bool(profile)
        self._micro = 0                  # backward batches since the last optimizer step
        self._correct: Optional[torch.Tensor] = None
        self._counted: Optional[torch.Tensor] = None
        self.counts = dict.fromkeys(COUNTS, 0)
        self.times = dict.fromkeys(TIMES, 0.0)

    # ---- timing and counting -----------------------------------------------------------------
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

    def take_accuracy(self) -> Optional[float]:
        """The accuracy counted since the last call (None if no row was counted); restarts
        the count."""
        if self._counted is None or self._correct is None:
            return None
        cnt = int(self._counted)
        acc = int(self._correct) / cnt if cnt else None
        self._correct.zero_()
        self._counted.zero_()
        return acc

    # ---- the sampler ---------------------------------------------------------------------------
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

    # ---- forward passes without gradients ------------------------------------------------------
    def selection_forward(self, x: torch.Tensor, y: torch.Tensor,
                          idx: Optional[torch.Tensor], scale_factor: float = 1.0) -> torch.Tensor:
        """A forward pass without gradients on every row: per-sample losses (float32).

        ``scale_factor`` < 1: the forward sees the images [B, C, H, W] downsampled by it
        (bilinear; refused for other inputs). The sampler (if any) observes each row here,
        once; the epoch's accuracy is counted and the policy records the losses."""
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
            self.policy.record_losses(idx, losses)
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

    # ---- training --------------------------------------------------------------------------------
    def train_rows(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor],
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
        self.policy.record_losses(idx, per)
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

    def step_optimizer_if_pending(self) -> None:
        """Step the optimizer (if the step owns one) on gradients accumulated so far."""
        if self.optimizer is not None and self._micro:
            self._optimizer_step()
