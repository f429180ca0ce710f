"""PyTorch Lightning integration: ``SamplerCallback`` makes a ``lightning.Trainer`` train
exactly a fastsel sampler's budget, checkpoint and resume its stream, and log its figures.

    sampler = fastsel.Sampler(train, policy="tftb", budget=0.3, epochs=30)
    loader = DataLoader(train, batch_size=256, sampler=sampler)
    trainer = lightning.Trainer(max_epochs=30, use_distributed_sampler=False,
                                callbacks=[fastsel.lightning.SamplerCallback(sampler)])
    trainer.fit(module, loader)           # training_step: return sampler.loss(logits, y, idx)

What the callback does:

* **The budget.** It stops the Trainer after the last epoch the budget allows, or once a
  time budget is spent, whatever ``max_epochs`` says (warning when ``max_epochs`` would
  stop it first). Lightning calls ``sampler.set_epoch`` with its own epoch counter.
* **The loader.** At the start of training it refuses a train dataloader whose sampler
  (or batch sampler's sampler) is not this sampler: Lightning replaces a custom sampler
  under a distributed strategy unless ``Trainer(use_distributed_sampler=False)``; the
  fastsel sampler shards itself. At ``setup`` it refuses a sampler whose world size or
  rank is not the Trainer's (build it with ``num_replicas=trainer.world_size,
  rank=trainer.global_rank``).
* **Checkpoints.** Lightning's checkpoints hold every rank's ``sampler.state_dict()``
  (``fastsel.accelerate.RankStates``: under DDP a rank's state holds its own updates since
  the last selection pass), and ``trainer.fit(ckpt_path=...)`` restores it, so a resumed
  run trains exactly the rows an uninterrupted one would, in the same order, also from a
  mid-epoch checkpoint (``ModelCheckpoint(every_n_train_steps=...)``). The checkpoint
  loads with ``torch.load(weights_only=True)``.
* **Figures.** Once per epoch, ``Summary.scalars()`` and ``progress`` through
  ``pl_module.log`` under ``prefix`` (``"fastsel/"``), so any Lightning logger gets them;
  under DDP they are averaged over the ranks (only the epoch's mean loss differs).
* **BudgetLR** works as a scheduler with ``"interval": "step"`` (warned otherwise).

Lightning is imported only when this module is: ``import fastsel`` never needs it.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised where Lightning is absent
    raise ImportError("fastsel.lightning needs Lightning: pip install 'fastsel[lightning]' "
                      "(or pip install lightning)") from e

from .accelerate import RankStates
from .sampler import Sampler
from .schedule import BudgetLR

__all__ = ["SamplerCallback"]


def _flatten(loaders: Any) -> List[Any]:
    """The data loaders in Lightning's train dataloader (one, or a list/dict of them)."""
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flatten(v)]
    return [] if loaders is None else [loaders]


def _samplers(loader: Any) -> List[Any]:
    """A loader's sampler and its batch sampler's sampler (either may hold ours)."""
    out = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    return [s for s in out if s is not None]


class SamplerCallback(Callback):
    """Keeps a ``lightning.Trainer`` to a :class:`fastsel.Sampler`'s budget, puts the
    sampler's state in Lightning's checkpoints and restores it, and logs its figures.

    Args:
        sampler: the sampler the train ``DataLoader`` was built with (``sampler=sampler``,
            or the sampler of its ``batch_sampler``).
        log: log the figures once per epoch through ``pl_module.log``.
        prefix: the start of every logged name.

    The training step calls ``sampler.loss(logits, y, idx)``; a validation step (and the
    sanity check, which runs validation before training) must not count rows: use
    ``sampler.loss(..., update=False)`` or ``F.cross_entropy`` there.
    """

    def __init__(self, sampler: Sampler, *, log: bool = True, prefix: str = "fastsel/") -> None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a fastsel.Sampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self.log = bool(log)
        self.prefix = str(prefix)

    # ---- checks at the start ---------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        s = self.sampler
        if (s.world_size, s.rank) != (trainer.world_size, trainer.global_rank):
            raise ValueError(
                f"fastsel.lightning.SamplerCallback: the sampler shards for world_size={s.world_size}, "
                f"rank={s.rank}, but this Trainer process is rank {trainer.global_rank} of "
                f"{trainer.world_size}: build the sampler with num_replicas=trainer.world_size, "
                "rank=trainer.global_rank after creating the Trainer (it knows them before it "
                "launches the other processes)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_loaders(trainer)
        self._check_schedulers(trainer)
        s = self.sampler
        cap = s.num_epochs
        if cap is not None and trainer.max_epochs is not None and 0 <= trainer.max_epochs < cap:
            warnings.warn(f"fastsel: Trainer(max_epochs={trainer.max_epochs}) stops before the budget's "
                          f"{cap} epochs are trained; pass max_epochs>={cap} (the callback stops the "
                          "Trainer when the budget is spent)", stacklevel=2)
        # Resumed from a checkpoint taken after the last epoch: nothing is left to train.
        if self._spent(trainer, trainer.fit_loop.epoch_progress.current.processed):
            trainer.should_stop = True

    def _check_loaders(self, trainer: Trainer) -> None:
        loaders = _flatten(trainer.train_dataloader)
        if any(x is self.sampler for dl in loaders for x in _samplers(dl)):
            return
        seen = {id(x): type(x).__name__ for dl in loaders for x in _samplers(dl)}
        found = list(seen.values()) or [type(dl).__name__ + " without a sampler" for dl in loaders] \
            or ["no train dataloader"]
        distributed = any("Distributed" in f for f in found)
        raise ValueError(
            "fastsel.lightning.SamplerCallback: the train dataloader's sampler is "
            f"{', '.join(found)}, not the fastsel.Sampler given to the callback"
            + (" (Lightning replaced it under a distributed strategy)" if distributed else "")
            + ": build the DataLoader with sampler=sampler and pass Trainer(use_distributed_sampler=False);"
            " the fastsel sampler shards itself")

    def _check_schedulers(self, trainer: Trainer) -> None:
        for cfg in getattr(trainer, "lr_scheduler_configs", []):
            if isinstance(cfg.scheduler, BudgetLR) and (cfg.interval != "step" or cfg.frequency != 1):
                warnings.warn(f"fastsel: BudgetLR is configured with interval={cfg.interval!r}, "
                              f"frequency={cfg.frequency}: it decays per step, so return it with "
                              '{"interval": "step", "frequency": 1}', stacklevel=2)

    # ---- the budget ------------------------------------------------------------------
    def _spent(self, trainer: Trainer, next_epoch: int) -> bool:
        """Whether the budget allows no epoch ``next_epoch`` (all ranks agree)."""
        s = self.sampler
        spent = s.budget.past_end(next_epoch)
        if s.budget.time_mode and not spent:
            spent = s.budget.time_up()
            if trainer.world_size > 1:   # the ranks' clocks differ: one stops, all stop
                spent = trainer.strategy.reduce_boolean_decision(spent, all=False)
        return bool(spent)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log:
            figures = self.sampler.summary().scalars(self.prefix)
            figures[self.prefix + "progress"] = float(self.sampler.progress())
            for name, value in figures.items():
                pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)
        # Lightning's next epoch is the sampler's next (it calls set_epoch with its counter).
        if self._spent(trainer, self.sampler.epoch + 1):
            trainer.should_stop = True

    # ---- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Every rank's sampler state (a collective under DDP: Lightning has every rank
        build the checkpoint, and rank 0 writes it)."""
        return {"sampler": RankStates(self.sampler).state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        RankStates(self.sampler).load_state_dict(state_dict["sampler"])
