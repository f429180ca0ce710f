"""The selection pass that starts each epoch: merge the ranks' state → raise the errors
deferred since the last pass → the policy's keys → top-k → weights → shuffle.

It runs once per epoch on the state's device, over all N samples; under DDP its one
all-reduce leaves every rank with the same state, so every rank draws the same selection.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import rng
from .budget import Budget
from .distributed import StateSync
from .policies import Policy, SelectionContext
from .rows import raise_for_faults
from .state import STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, SampleState
from .validation.fields import check_real, refuse, require
from .validation.tensors import raise_for_errors
from .validation.values import is_real
from .threads import calling_thread_only


class SelectionPass:
    """Draws epochs' selections for one sampler; keeps the seed's generator, the time the
    passes took and each finished epoch's mean observed loss."""

    def __init__(self, state: SampleState, policy: Policy, budget: Budget,
                 sync: Optional[StateSync], seed: int) -> None:
        self.state, self.policy, self.budget, self.sync = state, policy, budget, sync
        self.seed = seed
        self.generator = torch.Generator()
        self.seconds = 0.0
        self.epoch_losses: List[float] = []

    def __call__(self, epoch: int, backend_for: Callable[[torch.device], Any],
                 faults: Tuple[int, int, int, int, int], progress: float) -> torch.Tensor:
        """The epoch's selection in training order (int64, on the state's device); timed.
        ``faults``: ``EpochRows.take_faults()``, the rows the ops left out since the last pass."""
        t0 = time.perf_counter()
        with calling_thread_only(self.state.device, self.state.n):
            order = self._draw(epoch, backend_for, faults, progress)
        self.seconds += time.perf_counter() - t0
        return order

    def _draw(self, epoch: int, backend_for: Callable[[torch.device], Any],
              faults: Tuple[int, int, int, int, int], progress: float) -> torch.Tensor:
        st, budget = self.state, self.budget
        n_stray, first_stray, n_over, over_at, over_epoch = faults
        budget_left = None
        if self.sync is not None:
            w = self.sync.world_size
            tot = self.sync(st, [budget.elapsed(), float(budget.trained), float(n_stray), float(n_over)])
            elapsed, trained = tot[0] / w, tot[1]
            n_stray, n_over = int(round(tot[2])), int(round(tot[3]))
            if budget.time_mode and elapsed > 0:
                budget_left = (budget.seconds - elapsed) * trained / elapsed  # type: ignore[operator]
        errs = st.take_errors()
        if self.sync is not None:
            self.sync.rebase(st, mark=epoch)
        raise_for_faults((n_stray, first_stray, n_over, over_at, over_epoch), epoch - 1)
        if bool(errs.any()):
            raise_for_errors(errs, st.n)
        self.policy.observe(st, self._mean_loss(), budget.time_mode)
        k = budget.epoch_count(st.n)
        if budget_left is not None:
            k = max(0, min(k, int(budget_left)))
        key = rng.epoch_key(self.generator, self.seed, epoch)
        backend = backend_for(st.device)
        ctx = SelectionContext(state=st, backend=backend, epoch=epoch, k=k, key=key,
                               progress=progress, time_mode=budget.time_mode)
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
        if self.sync is not None:
            self.sync.stats0.copy_(st.stats)
        budget.epoch_counts.append(int(k))
        return order.to(torch.int64)

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

    def epoch_loss(self) -> Optional[float]:
        """Mean loss observed since the last pass (all ranks once merged), or None."""
        total, count = self.state.stats[[STAT_EPOCH_LOSS, STAT_EPOCH_COUNT]].tolist()
        return total / count if count else None

    # ---- checkpoint: the generator (key ``generator``), and in ``counters`` the passes'
    # time and the finished epochs' mean losses ---------------------------------------------
    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def counters(self) -> Dict[str, Any]:
        return {"selection_time": self.seconds, "epoch_losses": list(self.epoch_losses)}

    def check_generator_state(self, gen: Any) -> None:
        ref = self.generator.get_state()
        if not isinstance(gen, torch.Tensor) or gen.dtype != ref.dtype or gen.shape != ref.shape:
            raise refuse("generator", f"must be a torch.Generator state ({ref.dtype} tensor of "
                         f"shape {tuple(ref.shape)})")

    @staticmethod
    def check_counters(sd: Dict[str, Any]) -> None:
        check_real("counters.selection_time", require(sd, "selection_time", "counters"), lo=0.0)
        losses = sd.get("epoch_losses", [])   # absent from checkpoints of older versions
        if not isinstance(losses, list) or not all(is_real(v) for v in losses):
            raise refuse("counters.epoch_losses", f"must be a list of numbers, got {losses!r}")

    def load(self, generator: torch.Tensor, counters: Dict[str, Any]) -> None:
        """Write checked fields, keeping no tensor of the checkpoint."""
        self.generator.set_state(generator.clone())
        self.seconds = float(counters["selection_time"])
        self.epoch_losses = [float(v) for v in counters.get("epoch_losses", [])]

    def _close_epoch_loss(self) -> None:
        mean = self.epoch_loss()
        if mean is not None:
            self.epoch_losses.append(mean)
        self.state.stats[STAT_EPOCH_LOSS] = 0.0
        self.state.stats[STAT_EPOCH_COUNT] = 0.0
