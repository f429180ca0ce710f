"""Hugging Face Transformers integration: ``SamplerTrainer`` is a ``transformers.Trainer``
that trains on a fastsel sampler's stream, through its loss call, for exactly its budget.

    sampler = fastsel.Sampler(train_ds, policy="tftb", budget=0.3, epochs=30, seed=0)
    trainer = SamplerTrainer(sampler=sampler, model=model, args=TrainingArguments(...),
                             train_dataset=train_ds)     # items: dicts (pixel_values, labels)
    trainer.train()                                      # or train(resume_from_checkpoint=...)

What it changes in the Trainer, each through a method or a callback the Trainer documents
for subclassing:

* **The data** (``get_train_dataloader``): a ``DataLoader`` over ``train_dataset`` with
  ``sampler=sampler``, each item given its index under :data:`INDEX_KEY` (the collator
  never sees it, so ``remove_unused_columns`` cannot drop it). The loader is not passed to
  ``accelerator.prepare``: Accelerate would shard the sampler's shard again under DDP.
  Its ``set_epoch``, which the Trainer calls with its epoch counter, is the sampler's.
* **The loss** (``compute_loss``): ``sampler.loss(outputs.logits, labels, index)``, the
  labels kept out of the forward; with ``per_sample_loss=fn(outputs, inputs) -> [B]``,
  ``sampler.observe(fn(...), index)`` and the forward sees the labels. A mean over the
  micro-batch: the Trainer divides it by the gradient-accumulation steps. Batches without
  an index (evaluation) get the model's own loss.
* **The budget** (``set_initial_training_values``, ``create_scheduler``): the budget's
  epochs and its optimizer steps replace ``num_train_epochs``, so ``global_step`` ends at
  the budget's steps and the Trainer's LR schedule ends there too. Under a time budget a
  linear schedule is :class:`fastsel.BudgetLR`, and training stops once the time is spent.
* **Checkpoints**: each checkpoint directory gets :data:`STATE_FILE`, every rank's
  ``sampler.state_dict()``, and ``train(resume_from_checkpoint=...)`` loads it first. The
  Trainer's own skipping of trained batches (``get_resumed_dataloader``) is turned off: the
  sampler yields only what is left, so the resumed stream is the uninterrupted one.
* **Figures**: at each epoch's end ``sampler.summary().scalars("fastsel/")`` and
  ``fastsel/progress`` go through ``Trainer.log`` (every logger, ``state.log_history``).

Transformers is imported only when this module is: ``import fastsel`` never needs it.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

try:
    from transformers import PreTrainedModel, Trainer, TrainerCallback
    from transformers.utils import SAFE_WEIGHTS_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, seed_worker
except ImportError as e:  # pragma: no cover - exercised where Transformers is absent
    raise ImportError("fastsel.transformers needs Transformers: pip install 'fastsel[transformers]' "
                      "(or pip install transformers)") from e

from .accelerate import RankStates
from .sampler import Sampler
from .schedule import BudgetLR

__all__ = ["SamplerTrainer", "INDEX_KEY", "STATE_FILE"]

#: The batch key that carries each row's sample index from the dataset to the loss.
INDEX_KEY = "fastsel_index"
#: The file in each checkpoint directory that holds every rank's sampler state.
STATE_FILE = "fastsel_sampler.pt"

PerSampleLoss = Callable[[Any, Dict[str, Any]], torch.Tensor]


def _all_reduce(values: List[float], op: Any) -> List[float]:
    """``values`` reduced over the process group (float64; on the GPU under NCCL)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


class _Indexed(Dataset):
    """``dataset[i]`` as a dict with ``INDEX_KEY: i`` added."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = self.dataset[i]
        if not hasattr(item, "keys"):
            raise TypeError(_not_a_dict(item))
        return {**item, INDEX_KEY: int(i)}


def _not_a_dict(item: Any) -> str:
    return (f"fastsel.transformers.SamplerTrainer: train_dataset's items must be dicts (e.g. "
            f"{{'pixel_values': ..., 'labels': ...}}), got {type(item).__name__}: return a dict from "
            "__getitem__, or map a datasets.Dataset to named columns")


class _IndexCollator:
    """Collates without the index (so ``remove_unused_columns`` never sees it), then adds
    the batch's indices as an int64 tensor."""

    def __init__(self, collate: Callable[[List[Dict[str, Any]]], Any]) -> None:
        self.collate = collate

    def __call__(self, features: List[Dict[str, Any]]) -> Any:
        index = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.int64)
        batch = self.collate([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = index
        return batch


class _SamplerLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` (the Trainer calls it each epoch) is its sampler's."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class _SamplerCallback(TrainerCallback):
    """Writes the sampler's state into each checkpoint, logs its figures, and stops the
    Trainer once the budget is spent."""

    def __init__(self, trainer: "SamplerTrainer") -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        states = RankStates(self.trainer.sampler).state_dict()   # a collective under DDP
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(states, os.path.join(folder, STATE_FILE))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        if t.log_figures:
            t.log(t.figures())
        s = t.sampler
        spent = s.budget.past_end(s.epoch + 1) or (s.time_mode and s.budget.time_up())
        if s.world_size > 1 and s.time_mode:     # the ranks' clocks differ: one stops, all stop
            spent = bool(_all_reduce([float(spent)], dist.ReduceOp.MAX)[0])
        if spent:
            control.should_training_stop = True


class SamplerTrainer(Trainer):
    """A ``transformers.Trainer`` driven by a :class:`fastsel.Sampler`.

    Args:
        sampler: the sampler; built for ``len(train_dataset)`` samples, and under DDP with
            ``num_replicas=args.world_size, rank=args.process_index``.
        per_sample_loss: ``fn(outputs, inputs) -> [B]`` per-sample losses of any loss, fed
            to ``sampler.observe``; by default the loss is ``sampler.loss(outputs.logits,
            labels, index)`` (cross-entropy; class indices or class probabilities).
        log_figures: log the sampler's figures (``fastsel/...``) at each epoch's end.
        *args, **kwargs: ``transformers.Trainer``'s (``model``, ``args``,
            ``train_dataset`` with dict items, ``data_collator``, ...).

    ``args.max_steps`` must stay unset (the budget sets the steps), ``num_train_epochs`` is
    ignored under a fraction budget, ``train_sampling_strategy`` must stay ``"random"`` and
    ``dataloader_drop_last`` False (the sampler orders and counts the rows).
    """

    # compute_loss returns a mean over its micro-batch: the Trainer divides it by the
    # gradient-accumulation steps (its documented switch for a custom loss).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, sampler: Sampler, per_sample_loss: Optional[PerSampleLoss] = None,
                 log_figures: bool = True, **kwargs: Any) -> None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"SamplerTrainer(sampler=...) must be a fastsel.Sampler, got {type(sampler).__name__}")
        if per_sample_loss is not None and not callable(per_sample_loss):
            raise TypeError("per_sample_loss must be a function fn(outputs, inputs) -> [B] per-sample "
                            f"losses, got {type(per_sample_loss).__name__}")
        self.sampler = sampler
        self.per_sample_loss = per_sample_loss
        self.log_figures = bool(log_figures)
        super().__init__(*args, **kwargs)
        self._check_setup()
        self.add_callback(_SamplerCallback(self))

    # ---- refusals at construction -----------------------------------------------------
    def _check_setup(self) -> None:
        a, s, ds = self.args, self.sampler, self.train_dataset
        name = "fastsel.transformers.SamplerTrainer"
        if a.train_sampling_strategy != "random" or a.dataloader_drop_last:
            setting = ("dataloader_drop_last=True" if a.dataloader_drop_last
                       else f"train_sampling_strategy={a.train_sampling_strategy!r}")
            raise ValueError(f"{name}: TrainingArguments({setting}) is a sampler setting of the Trainer's, "
                             "but sampler= orders and counts the rows: leave train_sampling_strategy='random' "
                             "and dataloader_drop_last=False (the fastsel.Sampler has its own drop_last)")
        if a.max_steps is not None and a.max_steps > 0:
            raise ValueError(f"{name}: TrainingArguments(max_steps={a.max_steps}) would cut the budget: "
                             "leave max_steps=-1; the sampler's budget sets the steps")
        if ds is None or isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
            raise TypeError(f"{name}: train_dataset must be a map-style dataset with len() and dict items, "
                            f"got {type(ds).__name__}")
        if len(ds) != s.n:
            raise ValueError(f"{name}: the sampler was built for N={s.n} samples but train_dataset has "
                             f"{len(ds)}: build it with fastsel.Sampler(train_dataset, ...)")
        if len(ds) and not hasattr(ds[0], "keys"):
            raise TypeError(_not_a_dict(ds[0]))
        if (s.world_size, s.rank) != (a.world_size, a.process_index):
            raise ValueError(f"{name}: the sampler shards for world_size={s.world_size}, rank={s.rank}, but "
                             f"this process is rank {a.process_index} of {a.world_size}: build it with "
                             "fastsel.Sampler(..., num_replicas=args.world_size, rank=args.process_index) "
                             "after creating the TrainingArguments")

    # ---- the data ---------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """The train loader: ``sampler=self.sampler``, each batch with its indices under
        ``INDEX_KEY``; not prepared by Accelerate (the sampler shards itself)."""
        a = self.args
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        workers = a.dataloader_num_workers
        extra: Dict[str, Any] = {}
        if workers > 0:
            extra = dict(persistent_workers=a.dataloader_persistent_workers,
                         prefetch_factor=a.dataloader_prefetch_factor)
        return _SamplerLoader(_Indexed(self.train_dataset), batch_size=self._train_batch_size,
                              sampler=self.sampler, collate_fn=_IndexCollator(collate), drop_last=False,
                              num_workers=workers, pin_memory=a.dataloader_pin_memory,
                              worker_init_fn=partial(seed_worker, num_workers=workers, rank=a.process_index),
                              **extra)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """No skipping: the restored sampler yields only the rows its epoch has left."""
        return dataloader

    # ---- the budget -------------------------------------------------------------------
    def budget_steps(self) -> int:
        """Optimizer steps the budget allows (an upper bound under a time budget)."""
        return self._epoch_steps() * self._epochs()

    def _rows(self) -> int:
        """This rank's rows of an epoch (the policy's share under a time budget)."""
        s = self.sampler
        return s.shard.length(s.budget.epoch_count(s.n))

    def _epoch_steps(self) -> int:
        batches = math.ceil(self._rows() / self._train_batch_size)
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def _epochs(self) -> int:
        cap = self.sampler.num_epochs
        return int(cap) if cap is not None else max(1, math.ceil(self.args.num_train_epochs))

    def set_initial_training_values(self, args: Any, dataloader: DataLoader) -> tuple:
        """The Trainer's epoch and step counts, from the budget instead of ``num_train_epochs``."""
        values = list(super().set_initial_training_values(args, dataloader))
        epochs, per_epoch, rows = self._epochs(), self._epoch_steps(), self._rows()
        values[0], values[1] = epochs, per_epoch                   # num_train_epochs, steps per epoch
        values[3] = rows * self.sampler.world_size * epochs        # num_train_samples
        values[5] = math.ceil(rows / self._train_batch_size)       # batches per epoch
        values[6] = epochs * per_epoch                             # max_steps
        return tuple(values)

    def create_scheduler(self, num_training_steps: int,
                         optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        """The Trainer's schedule over the budget's steps; under a time budget a linear
        schedule is :class:`fastsel.BudgetLR` (its steps are not known in advance)."""
        if self.lr_scheduler is None and self.sampler.time_mode:
            kind = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
            if kind not in ("linear", "constant"):
                raise ValueError(f"SamplerTrainer: lr_scheduler_type={kind!r} needs the step count, which a "
                                 "time budget does not fix: use 'linear' (fastsel.BudgetLR) or 'constant', "
                                 "or pass optimizers=(optimizer, scheduler)")
            if kind == "linear":
                if self.args.warmup_steps or getattr(self.args, "warmup_ratio", 0):
                    raise ValueError("SamplerTrainer: warmup_steps/warmup_ratio with a time budget: "
                                     "BudgetLR has no warmup; leave them 0")
                self.lr_scheduler = BudgetLR(optimizer or self.optimizer, self.sampler)
                return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # ---- the loss ---------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The sampler's loss of a training batch (see the class docstring); the model's
        own loss for a batch without indices."""
        if INDEX_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        index = inputs.pop(INDEX_KEY)
        update = model.training
        if self.per_sample_loss is not None:
            outputs = model(**inputs)
            losses = self.per_sample_loss(outputs, inputs)
            if not isinstance(losses, torch.Tensor) or losses.shape != index.shape:
                raise ValueError(f"per_sample_loss must return one loss per row, a tensor of shape "
                                 f"{tuple(index.shape)}, got {getattr(losses, 'shape', type(losses).__name__)}")
            loss = self.sampler.observe(losses, index, update=update)
        else:
            labels = self._pop_labels(inputs)
            outputs = model(**inputs)
            logits = outputs.get("logits") if hasattr(outputs, "get") else getattr(outputs, "logits", None)
            if logits is None:
                raise ValueError(f"SamplerTrainer: the model's output ({type(outputs).__name__}) has no "
                                 "`logits` for sampler.loss: pass per_sample_loss=fn(outputs, inputs) -> [B] "
                                 "per-sample losses")
            loss = self.sampler.loss(logits, labels, index, update=update)
        return (loss, outputs) if return_outputs else loss

    def _pop_labels(self, inputs: Dict[str, Any]) -> torch.Tensor:
        names: Sequence[str] = self.label_names or ["labels"]
        if len(names) != 1 or names[0] not in inputs:
            raise ValueError(f"SamplerTrainer: the batch has keys {sorted(inputs)}, not one label column "
                             f"{list(names)} for sampler.loss: name the targets 'labels' (or set "
                             "TrainingArguments(label_names=[...])), or pass per_sample_loss=fn(outputs, inputs)")
        return inputs.pop(names[0])

    # ---- checkpoints and figures --------------------------------------------------------
    def train(self, resume_from_checkpoint: Optional[Any] = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint`` (a path, or True for the last
        checkpoint in ``output_dir``) the sampler's state is restored from it first."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"no checkpoint found in output_dir={self.args.output_dir!r} to resume from")
        if path:
            self.load_sampler_state(str(path))
            self._load_weights(str(path))
        return super().train(path or None, *args, **kwargs)

    def _load_weights(self, checkpoint: str) -> None:
        """Load a ``PreTrainedModel``'s weights through ``from_pretrained``, which undoes the
        key renaming ``save_pretrained`` applies (Transformers 5's own resume loads the file
        as saved, missing renamed keys: ViT's weights are not restored). The Trainer's load
        that follows changes nothing where its keys match."""
        model = self.model
        if (not isinstance(model, PreTrainedModel) or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))):
            return
        loaded = type(model).from_pretrained(checkpoint, config=model.config, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def load_sampler_state(self, checkpoint: str) -> None:
        """Restore this rank's sampler state from a checkpoint directory's ``STATE_FILE``."""
        f = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} is missing: the checkpoint was not written by a SamplerTrainer, so "
                                    "the sampler's position cannot be restored")
        if self.sampler.time_mode:
            raise ValueError("SamplerTrainer: resuming a time budget is not supported (the Trainer counts its "
                             "epochs in steps, which a time budget varies); resume a fraction budget")
        RankStates(self.sampler).load_state_dict(torch.load(f, weights_only=True))

    def figures(self) -> Dict[str, float]:
        """``sampler.summary().scalars("fastsel/")`` and ``fastsel/progress``; under DDP the
        mean over the ranks (one all-reduce)."""
        out = self.sampler.summary().scalars("fastsel/")
        out["fastsel/progress"] = float(self.sampler.progress())
        if self.sampler.world_size > 1:
            keys = sorted(out)
            sums = _all_reduce([out[k] for k in keys], dist.ReduceOp.SUM)
            out = {k: v / self.sampler.world_size for k, v in zip(keys, sums)}
        return out
