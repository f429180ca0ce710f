"""fastsel.lightning.SamplerCallback in a real lightning.Trainer on the CPU: the budget kept
whatever max_epochs says, a replaced sampler refused, exact resume from mid-epoch and
epoch-end checkpoints, the figures in a CSVLogger, weights_only checkpoints, BudgetLR as a
per-step scheduler, and Lightning's DDP strategy with the sampler's own sharding (2 processes).
Also Summary.scalars() and that ``import fastsel`` never imports Lightning."""
import csv
import glob
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

import fastsel
from fastsel.summary import Summary

try:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from fastsel.lightning import SamplerCallback
except ImportError:  # pragma: no cover - setup.sh installs Lightning
    L = None

needs_lightning = pytest.mark.skipif(L is None, reason="lightning is not installed (pip install 'fastsel[lightning]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, BS, EPOCHS, ROWS = 120, 8, 4, 60    # budget 0.5: 60 rows an epoch, 8 batches (7 of 8, one of 4)


def dataset():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=g), torch.randint(0, 4, (N,), generator=g)
    return fastsel.with_indices(TensorDataset(x, y))


def make_sampler(**kw):
    args = dict(policy="tftb", budget=0.5, epochs=EPOCHS, seed=0)
    args.update(kw)
    return fastsel.Sampler(N, **args)


if L is not None:
    class Net(L.LightningModule):
        """A linear classifier trained through ``sampler.loss``; records each step's rows and LR."""

        def __init__(self, sampler, interval="step"):
            super().__init__()
            self.sampler = sampler
            self.interval = interval
            torch.manual_seed(0)
            self.net = nn.Linear(16, 4)
            self.trained, self.lrs, self.rows_before = [], [], []
            self.clock = None       # a fake clock to advance per step (time budget)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.trained.append(idx.tolist())
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.rows_before.append(self.sampler.budget.trained)
            if self.clock is not None:
                self.clock[0] += 1.0
            return self.sampler.loss(self.net(x), y, idx)

        def validation_step(self, batch, batch_idx):
            x, y, idx = batch   # the sanity check runs this before any epoch: rows must not count
            self.log("val_loss", self.sampler.loss(self.net(x), y, idx, update=False))

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = fastsel.BudgetLR(opt, self.sampler)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def fit(root, sampler=None, loader=None, ckpt=None, callbacks=(), val=False, logger=False,
        max_epochs=10, interval="step", clock=None, **trainer_kw):
    """One ``trainer.fit`` of a fresh Net; returns (module, trainer, sampler)."""
    train = dataset()
    sampler = make_sampler() if sampler is None else sampler
    module = Net(sampler, interval)
    module.clock = clock
    args = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, use_distributed_sampler=False,
                enable_progress_bar=False, enable_model_summary=False, logger=logger,
                default_root_dir=str(root), num_sanity_val_steps=2 if val else 0,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                callbacks=[SamplerCallback(sampler), *callbacks])
    args.update(trainer_kw)
    trainer = L.Trainer(**args)
    loader = DataLoader(train, batch_size=BS, sampler=sampler) if loader is None else loader
    val_loader = DataLoader(train, batch_size=40) if val else None
    trainer.fit(module, loader, val_loader, ckpt_path=None if ckpt is None else str(ckpt))
    return module, trainer, sampler


def rows(module):
    return [i for b in module.trained for i in b]


def budget_warnings(record):
    return [w for w in record if "the budget is spent" in str(w.message)]


# ---- no Lightning needed ----------------------------------------------------------------
def test_import_fastsel_imports_neither_lightning_nor_accelerate():
    code = textwrap.dedent("""
        import sys
        import fastsel
        loaded = [m for m in ("lightning", "pytorch_lightning", "accelerate") if m in sys.modules]
        assert not loaded, loaded
        try:
            import lightning
        except ImportError:
            sys.exit(0)
        assert fastsel.lightning.SamplerCallback.__module__ == "fastsel.lightning"
        assert fastsel.accelerate.RankStates.__module__ == "fastsel.accelerate"
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_summary_scalars_are_a_flat_dict_of_numbers():
    assert Summary({"a": 1, "b": {"c": 2.5, "d": "x"}, "h": [0.5, 0.25], "e": [], "f": "text",
                    "g": torch.tensor(3.0)}).scalars(prefix="p.") == \
        {"p.a": 1.0, "p.b/c": 2.5, "p.h/last": 0.25, "p.g": 3.0}
    s = make_sampler()
    train = dataset()
    model = nn.Linear(16, 4)
    for _ in s.epochs():
        for x, y, idx in DataLoader(train, batch_size=BS, sampler=s):
            s.loss(model(x), y, idx).backward()
        break
    summ = s.summary()
    sc = summ.scalars()
    assert all(k.startswith("fastsel/") and type(v) is float for k, v in sc.items())
    assert sc["fastsel/passes"] == ROWS and sc["fastsel/epochs_run"] == 1
    assert sc["fastsel/epoch_mean_losses/last"] == summ["epoch_mean_losses"][-1]
    assert sc["fastsel/selection_entropy/normalized"] == summ["selection_entropy"]["normalized"]
    assert "fastsel/policy" not in sc and "fastsel/backend" not in sc
    assert set(summ.scalars(prefix="")) == {k[len("fastsel/"):] for k in sc}
    timed = fastsel.Sampler(N, time_budget=5.0).summary().scalars()
    assert "fastsel/budget" not in timed and "fastsel/elapsed_s" in timed   # "5 s" is no number


# ---- the Trainer ------------------------------------------------------------------------
@needs_lightning
def test_budget_kept_with_max_epochs_above_it_and_budget_lr_per_step(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, trainer, s = fit(tmp_path, max_epochs=10)
    assert trainer.current_epoch == EPOCHS and s.summary()["passes"] == EPOCHS * ROWS
    assert len(rows(module)) == EPOCHS * ROWS and trainer.global_step == EPOCHS * 8
    for e in range(EPOCHS):    # each epoch: its 60 selected rows, each once
        assert len(set(rows(module)[e * ROWS:(e + 1) * ROWS])) == ROWS
    assert not budget_warnings(record)      # no epoch was started past the budget
    # BudgetLR stepped per step: the LR of each step is 0.1 x the budget left; 0 at the end.
    expected = [0.1 * (1 - r / (EPOCHS * ROWS)) for r in module.rows_before]
    assert module.lrs == pytest.approx(expected, abs=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0


@needs_lightning
def test_time_budget_stops_the_trainer(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])
    s = fastsel.Sampler(N, policy="uniform", time_budget=20.0, seed=0)
    module, trainer, s = fit(tmp_path, sampler=s, max_epochs=1000, clock=clock)
    steps = len(module.trained)
    assert s.budget.time_up() and 18 <= steps <= 21, steps   # one clock second per step
    assert trainer.current_epoch < 10 and trainer.global_step == steps


@needs_lightning
def test_warns_when_max_epochs_stops_before_the_budget(tmp_path):
    with pytest.warns(UserWarning, match=r"max_epochs=2\) stops before the budget's 4 epochs"):
        module, trainer, s = fit(tmp_path, max_epochs=2)
    assert len(rows(module)) == 2 * ROWS


@needs_lightning
def test_refuses_a_train_loader_whose_sampler_is_not_the_callbacks(tmp_path):
    train = dataset()
    for loader, name in ((DataLoader(train, batch_size=BS, shuffle=True), "RandomSampler"),
                         (DataLoader(train, batch_size=BS, sampler=make_sampler()), "Sampler")):
        s = make_sampler()
        with pytest.raises(ValueError, match=r"use_distributed_sampler=False") as e:
            fit(tmp_path, sampler=s, loader=loader)
        assert f"sampler is {name}, not the fastsel.Sampler" in str(e.value)
        assert s.summary()["passes"] == 0
    # Accepted: the sampler inside a batch sampler; and on one device Lightning keeps a
    # custom sampler even with use_distributed_sampler=True (it replaces it only when distributed).
    s = make_sampler()
    module, _, _ = fit(tmp_path, sampler=s, loader=DataLoader(train, batch_sampler=BatchSampler(s, BS, False)))
    assert len(rows(module)) == EPOCHS * ROWS
    module, _, _ = fit(tmp_path, use_distributed_sampler=True)
    assert len(rows(module)) == EPOCHS * ROWS


@needs_lightning
def test_refuses_a_sampler_sharded_for_another_world(tmp_path):
    with pytest.raises(ValueError, match=r"world_size=2, rank=1.*num_replicas=trainer.world_size"):
        fit(tmp_path, sampler=make_sampler(num_replicas=2, rank=1))


@needs_lightning
def test_budget_lr_per_epoch_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"BudgetLR is configured with interval='epoch'"):
        fit(tmp_path, max_epochs=1, interval="epoch")


# ---- checkpoints, resume, figures ---------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run with validation (and its sanity check), a CSVLogger, a checkpoint every 4 steps
    and one at each epoch's end."""
    if L is None:
        pytest.skip("lightning is not installed")
    root = tmp_path_factory.mktemp("uninterrupted")
    steps = ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    epochs = ModelCheckpoint(dirpath=root / "epochs", save_top_k=-1, filename="{epoch}")
    module, trainer, s = fit(root, callbacks=[steps, epochs], val=True,
                             logger=CSVLogger(str(root), name="csv"))
    return root, module, trainer, s


@needs_lightning
@pytest.mark.parametrize("ckpt, done", [("steps/step=12.ckpt", ROWS + 4 * BS),   # mid-epoch 1
                                        ("steps/step=16.ckpt", 2 * ROWS),   # epoch 1's last batch
                                        ("epochs/epoch=1.ckpt", 2 * ROWS),  # epoch 1's end
                                        ("steps/step=32.ckpt", 4 * ROWS),   # the budget's end
                                        ("epochs/epoch=3.ckpt", 4 * ROWS)])
def test_resume_trains_exactly_what_an_uninterrupted_run_would(uninterrupted, tmp_path, ckpt, done):
    root, full, trainer, _ = uninterrupted
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module, resumed, s = fit(tmp_path, ckpt=root / ckpt, val=True)
    assert rows(module) == rows(full)[done:]    # the same rows in the same order
    assert s.summary()["passes"] == EPOCHS * ROWS and not budget_warnings(record)
    for (k, a), b in zip(full.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.optimizers[0].param_groups[0]["lr"] == 0.0


@needs_lightning
def test_resume_mid_epoch_with_loader_workers(tmp_path):
    """Workers prefetch ahead of the training step: the checkpoint still holds what went
    through the loss call, and the resumed run trains exactly the rest."""
    train = dataset()

    def loader(s):
        return DataLoader(train, batch_size=BS, sampler=s, num_workers=2)

    s = make_sampler()
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    full, _, _ = fit(tmp_path, sampler=s, loader=loader(s), callbacks=[steps])
    s = make_sampler()
    module, _, _ = fit(tmp_path / "resumed", sampler=s, loader=loader(s), ckpt=tmp_path / "steps" / "step=10.ckpt")
    assert rows(module) == rows(full)[ROWS + 2 * BS:]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), module.state_dict().values()))


@needs_lightning
def test_checkpoint_loads_with_weights_only(uninterrupted):
    root = uninterrupted[0]
    ck = torch.load(root / "steps" / "step=12.ckpt", weights_only=True)
    states = ck["callbacks"]["SamplerCallback"]["sampler"]
    assert states["world_size"] == 1 and len(states["ranks"]) == 1
    assert "sampler" not in ck["lr_schedulers"][0]
    s = make_sampler()
    fastsel.accelerate.RankStates(s).load_state_dict(states)
    assert (s.epoch, s.position) == (1, 4 * BS) and len(s) == ROWS
    assert len(list(iter(s))) == ROWS - 4 * BS


@needs_lightning
def test_figures_reach_a_csv_logger_once_per_epoch(uninterrupted):
    root, _, _, s = uninterrupted
    (path,) = glob.glob(str(root / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        logged = [r for r in csv.DictReader(f) if r.get("fastsel/passes")]
    assert [int(r["epoch"]) for r in logged] == list(range(EPOCHS))
    assert [float(r["fastsel/passes"]) for r in logged] == [ROWS * (e + 1) for e in range(EPOCHS)]
    assert [float(r["fastsel/progress"]) for r in logged] == [0.25, 0.5, 0.75, 1.0]
    losses = [float(r["fastsel/epoch_mean_losses/last"]) for r in logged]
    assert losses == pytest.approx(s.summary()["epoch_mean_losses"], rel=1e-6)
    names = {k for k in logged[0] if k.startswith("fastsel/")}
    assert names == set(s.summary().scalars()) | {"fastsel/progress"}
    assert all(0 < float(r["fastsel/selection_entropy/normalized"]) <= 1 for r in logged)


# ---- DDP ----------------------------------------------------------------------------------
DDP_SCRIPT = r'''
import json, sys
import torch, torch.nn as nn
from torch.utils.data import DataLoader
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import fastsel
from fastsel.lightning import SamplerCallback
sys.path.insert(0, sys.argv[2])
from test_lightning import BS, Net, dataset

out = sys.argv[1]

def run(root, ckpt=None, every=None, use_distributed_sampler=False):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=10,
                        use_distributed_sampler=use_distributed_sampler, enable_progress_bar=False,
                        enable_model_summary=False, logger=False, enable_checkpointing=bool(every),
                        default_root_dir=root)
    # The Trainer knows this process's rank and the world size before it launches the others.
    sampler = fastsel.Sampler(len(dataset()), policy="tftb", budget=0.5, epochs=4, seed=0,
                              num_replicas=trainer.world_size, rank=trainer.global_rank)
    trainer.callbacks.append(SamplerCallback(sampler))
    if every:
        trainer.callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every,
                                                 save_top_k=-1, filename="{step}"))
    module = Net(sampler)
    trainer.fit(module, DataLoader(dataset(), batch_size=BS, sampler=sampler), ckpt_path=ckpt)
    return module, trainer, sampler

full, trainer, s = run(out + "/a", every=5)
rank = trainer.global_rank
resumed, _, _ = run(out + "/b", ckpt=out + "/a/step=5.ckpt")   # mid-epoch 1 (4 steps an epoch)
try:
    run(out + "/c", use_distributed_sampler=True)
    refused = ""
except ValueError as e:
    refused = str(e)
json.dump({"full": [i for b in full.trained for i in b], "resumed": [i for b in resumed.trained for i in b],
           "epochs": trainer.current_epoch, "passes": s.summary()["passes"],
           "same_weights": all(torch.equal(a, b) for a, b in zip(full.state_dict().values(),
                                                                   resumed.state_dict().values())),
           "lr": trainer.optimizers[0].param_groups[0]["lr"], "refused": refused},
          open(f"{out}/rank{rank}.json", "w"))
'''


@needs_lightning
@pytest.mark.slow
def test_ddp_two_processes_shard_resume_and_refuse(tmp_path):
    """Lightning's DDP strategy (gloo, 2 CPU processes launched by Lightning): the ranks train
    disjoint halves of each epoch's selection, the budget is kept, a mid-epoch checkpoint
    (every rank's sampler state in rank 0's file) resumes each rank's stream and the weights
    exactly, and use_distributed_sampler=True is refused."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script), str(tmp_path), os.path.dirname(__file__)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    half = ROWS // 2
    for e in range(EPOCHS):
        a, b = (set(x["full"][e * half:(e + 1) * half]) for x in ranks)
        assert len(a) == len(b) == half and not a & b
    for x in ranks:
        assert x["epochs"] == EPOCHS and x["passes"] == EPOCHS * ROWS and x["lr"] == 0.0
        assert len(x["full"]) == EPOCHS * half
        assert x["resumed"] == x["full"][len(x["full"]) - len(x["resumed"]):]
        assert len(x["resumed"]) == EPOCHS * half - (half + BS) and x["same_weights"]
        assert "use_distributed_sampler=False" in x["refused"] and "DistributedSamplerWrapper" in x["refused"]
