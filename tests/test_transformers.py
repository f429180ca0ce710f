"""fastsel.transformers.SamplerTrainer in a real transformers.Trainer on the CPU, with a
one-layer ViT built from its config: the budget kept whatever num_train_epochs says, the
linear LR schedule ending at 0 with it, the figures in log_history, gradient accumulation at
the right scale, the exact stream and weights after a mid-epoch resume, per_sample_loss,
mixup soft targets (docs/loss.md's Mixup as a collator), a time budget under BudgetLR, the
refusals, the docs' example, and 2-rank DDP under torchrun (tests/ddp_transformers.py)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsel

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'fastsel[transformers]')")
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.data.data_collator import default_data_collator  # noqa: E402

from fastsel.transformers import INDEX_KEY, STATE_FILE, SamplerTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, C, BS, EPOCHS, LR = 96, 3, 8, 3, 1e-2
ROWS = 48                      # budget 0.5: 48 rows an epoch, 6 batches, 18 steps in all
STEPS = EPOCHS * ROWS // BS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model on one thread: on a busy 2-core machine more threads make each step
    ~20x slower (contention), not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Images(torch.utils.data.Dataset):
    """N random 8x8 images, items as dicts (the Trainer's format)."""

    def __init__(self, n=N, dicts=True):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)
        self.dicts = dicts

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]} if self.dicts else (self.x[i], self.y[i])


def vit(dropout=0.1):
    """A one-layer ViT from its config; dropout makes an exact resume depend on the RNG too."""
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, image_size=8, patch_size=4,
                                               num_labels=C, hidden_dropout_prob=dropout))


def make_args(out, **kw):
    a = dict(output_dir=str(out), per_device_train_batch_size=BS, learning_rate=LR, num_train_epochs=1,
             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
             seed=0, log_level="error")
    a.update(kw)
    return TrainingArguments(**a)


class Recorder(SamplerTrainer):
    """Records each training batch's indices and the LR its optimizer step uses."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if INDEX_KEY in inputs:
            self.rows += inputs[INDEX_KEY].tolist()
            self.lrs.append(self.optimizer.param_groups[0]["lr"])
            self.labels.append(inputs.get("labels"))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def sampler(**kw):
    args = dict(policy="tftb", budget=0.5, epochs=EPOCHS, seed=0)
    args.update(kw)
    return fastsel.Sampler(N, **args)


TRAINER_KW = ("eval_dataset", "per_sample_loss", "data_collator")


def train(out, s=None, resume=None, callbacks=(), model=None, **kw):
    """A Recorder trained from ``resume``; ``kw``: TrainingArguments or TRAINER_KW."""
    s = sampler() if s is None else s
    extra = {k: kw.pop(k) for k in TRAINER_KW if k in kw}
    t = Recorder(sampler=s, model=vit() if model is None else model, args=make_args(out, **kw),
                 train_dataset=Images(), callbacks=list(callbacks), **extra)
    t.rows, t.lrs, t.labels = [], [], []
    t.train(resume_from_checkpoint=resume)
    return t


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- no Transformers needed to import fastsel --------------------------------------------
def test_import_fastsel_does_not_import_transformers():
    code = textwrap.dedent("""
        import sys
        import fastsel
        assert "transformers" not in sys.modules
        assert fastsel.transformers.SamplerTrainer.__module__ == "fastsel.transformers"
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ---- the budget, the schedule, the figures ------------------------------------------------
def test_budget_kept_lr_reaches_zero_and_figures_are_logged(tmp_path):
    s = sampler()
    t = train(tmp_path, s, num_train_epochs=1, eval_dataset=Images(24), eval_strategy="epoch")
    assert t.state.global_step == STEPS == t.budget_steps() and t.state.max_steps == STEPS
    assert len(t.rows) == EPOCHS * ROWS and s.summary()["passes"] == EPOCHS * ROWS   # eval counted nothing
    for e in range(EPOCHS):                          # each epoch: 48 distinct rows
        assert len(set(t.rows[e * ROWS:(e + 1) * ROWS])) == ROWS
    assert t.lrs[0] == LR and all(a > b > 0 for a, b in zip(t.lrs, t.lrs[1:]))
    assert t.lrs[-1] == pytest.approx(LR / STEPS)    # the last step's LR, then 0
    assert all(g["lr"] == 0.0 for g in t.optimizer.param_groups) and set(t.lr_scheduler.get_last_lr()) == {0.0}
    logged = [h for h in t.state.log_history if "fastsel/progress" in h]
    assert [h["epoch"] for h in logged] == [1.0, 2.0, 3.0]
    assert [h["fastsel/passes"] for h in logged] == [ROWS, 2 * ROWS, 3 * ROWS]
    assert [h["fastsel/progress"] for h in logged] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert set(logged[-1]) >= set(s.summary().scalars()) | {"fastsel/progress", "step"}
    assert logged[-1]["fastsel/epoch_mean_losses/last"] == pytest.approx(s.summary()["epoch_mean_losses"][-1])
    assert len([h for h in t.state.log_history if "eval_loss" in h]) == EPOCHS
    assert len([h for h in t.state.log_history if "loss" in h]) == STEPS


def test_gradient_accumulation_keeps_the_loss_scale(tmp_path):
    """Batches of 4 with 2 accumulation steps train what batches of 8 train (plain SGD, no
    clipping: a loss twice too large would double every update)."""
    kw = dict(optim="sgd", max_grad_norm=0.0)
    s1, s2 = sampler(policy="uniform"), sampler(policy="uniform")
    one = train(tmp_path / "a", s1, model=vit(0.0), **kw)
    acc = train(tmp_path / "b", s2, model=vit(0.0), per_device_train_batch_size=4, gradient_accumulation_steps=2, **kw)
    assert acc.state.global_step == one.state.global_step == STEPS and acc.rows == one.rows
    assert max_diff(one.model, acc.model) < 1e-5


@pytest.mark.parametrize("stop", [8, 6])         # mid-epoch 1; the end of epoch 0
def test_resume_continues_the_exact_stream_and_weights(tmp_path, stop):
    full = train(tmp_path / "full")
    part = train(tmp_path / "run", callbacks=[StopAt(stop)], save_strategy="steps", save_steps=stop)
    ckpt = tmp_path / "run" / f"checkpoint-{stop}"
    assert (ckpt / STATE_FILE).exists()
    states = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert states["ranks"][0]["epoch"] == (stop - 1) // (ROWS // BS)
    s = sampler()
    rest = train(tmp_path / "run", s, resume=str(ckpt), save_strategy="steps", save_steps=stop)
    assert part.rows + rest.rows == full.rows            # no double skip, no repeat
    assert rest.state.global_step == STEPS and s.summary()["passes"] == EPOCHS * ROWS
    assert all(g["lr"] == 0.0 for g in rest.optimizer.param_groups)
    print(f"resume at step {stop}: max |w_resumed - w_full| = {max_diff(full.model, rest.model)}")
    assert all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), rest.model.state_dict().values()))


def test_resume_true_finds_the_last_checkpoint_and_plain_checkpoints_are_refused(tmp_path):
    train(tmp_path, callbacks=[StopAt(4)], save_strategy="steps", save_steps=2)
    rest = train(tmp_path, resume=True, save_strategy="steps", save_steps=2)
    assert rest.state.global_step == STEPS and len(rest.rows) == EPOCHS * ROWS - 4 * BS
    os.remove(tmp_path / "checkpoint-4" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        train(tmp_path, resume=str(tmp_path / "checkpoint-4"))


# ---- other losses -------------------------------------------------------------------------
class NoLogits(nn.Module):
    """A model whose output has no ``logits``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3 * 8 * 8, C)

    def forward(self, pixel_values, labels=None):
        return {"scores": self.net(pixel_values.flatten(1))}


def test_per_sample_loss_goes_through_observe(tmp_path):
    def focal(outputs, inputs):
        ce = F.cross_entropy(outputs["scores"], inputs["labels"], reduction="none")
        return (1 - torch.exp(-ce)) ** 2 * ce
    s = sampler()
    t = train(tmp_path, s, model=NoLogits(), per_sample_loss=focal)
    assert t.state.global_step == STEPS and s.summary()["passes"] == EPOCHS * ROWS
    assert int((s.state.seen > 0).sum()) > ROWS
    with pytest.raises(ValueError, match="one loss per row"):
        train(tmp_path, model=NoLogits(), per_sample_loss=lambda outputs, inputs: outputs["scores"].sum())


def mixup_class():
    """docs/loss.md's Mixup (run as written by tests/test_readme.py)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_readme import find
    scope = {}
    block = find("Beta(0.4, 0.4)")
    exec(compile(block.split("g = torch.Generator()")[0], "docs/loss.md", "exec"), scope)
    return scope["Mixup"]


def test_mixup_and_cutmix_soft_targets_through_the_trainer(tmp_path):
    mix = mixup_class()(C)

    def collate(features):
        batch = default_data_collator(features)
        batch["pixel_values"], batch["labels"] = mix(batch["pixel_values"], batch["labels"])
        return batch
    s = sampler(policy="p-sgd")
    t = train(tmp_path, s, data_collator=collate)
    assert t.state.global_step == STEPS and s.summary()["passes"] == EPOCHS * ROWS
    assert all(y.shape == (BS, C) and torch.allclose(y.sum(1), torch.ones(BS)) for y in t.labels)
    assert any(float(y.max()) < 0.9 for y in t.labels)        # mixed, not one-hot
    assert s.summary()["nonfinite_losses"] == 0 and int((s.state.seen > 0).sum()) > ROWS


# ---- a time budget --------------------------------------------------------------------------
def test_time_budget_stops_the_trainer_with_budget_lr(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock[0] += 1.0                      # one clock second per optimizer step
    s = fastsel.Sampler(N, policy="tftb", time_budget=10.0, seed=0)
    t = train(tmp_path, s, callbacks=[Tick()], num_train_epochs=50)
    assert isinstance(t.lr_scheduler, fastsel.BudgetLR)
    assert s.budget.time_up() and 10 <= t.state.global_step <= 12, t.state.global_step
    # BudgetLR reads the clock when the Trainer steps it, before Tick advances it: 1 - progress.
    assert t.lrs == pytest.approx([LR * (1 - max(0, k - 1) / 10.0) for k in range(len(t.lrs))]), t.lrs
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(LR * (1 - (t.state.global_step - 1) / 10.0))
    with pytest.raises(ValueError, match="warmup"):
        train(tmp_path, fastsel.Sampler(N, time_budget=10.0), warmup_steps=2)


# ---- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("setting, match", [
    (dict(train_sampling_strategy="sequential"), "train_sampling_strategy='sequential'"),
    (dict(dataloader_drop_last=True), "dataloader_drop_last=True"),
    (dict(max_steps=5), "max_steps=5"),
])
def test_refuses_the_trainers_own_sampler_settings(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        SamplerTrainer(sampler=sampler(), model=vit(), args=make_args(tmp_path, **setting), train_dataset=Images())


def test_refuses_bad_input(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(TypeError, match="items must be dicts"):
        SamplerTrainer(sampler=sampler(), model=vit(), args=args, train_dataset=Images(dicts=False))
    with pytest.raises(ValueError, match=r"N=96 samples but train_dataset has 50.*fastsel.Sampler\(train_dataset"):
        SamplerTrainer(sampler=sampler(), model=vit(), args=args, train_dataset=Images(50))
    with pytest.raises(ValueError, match=r"world_size=2, rank=1.*num_replicas=args.world_size"):
        SamplerTrainer(sampler=sampler(num_replicas=2, rank=1), model=vit(), args=args, train_dataset=Images())
    with pytest.raises(TypeError, match="must be a fastsel.Sampler"):
        SamplerTrainer(sampler=torch.utils.data.RandomSampler(Images()), model=vit(), args=args,
                       train_dataset=Images())
    s = sampler()
    t = SamplerTrainer(sampler=s, model=NoLogits(), args=args, train_dataset=Images())
    with pytest.raises(ValueError, match=r"no `logits`.*per_sample_loss=fn\(outputs, inputs\)"):
        t.train()
    assert s.position == 0                       # refused before anything was counted


# ---- the docs' example ----------------------------------------------------------------------
def test_docs_example_runs(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_readme import find, page_of
    block = find("SamplerTrainer(sampler=sampler")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, page_of(block), "exec"), scope)
    t, s = scope["trainer"], scope["sampler"]
    assert t.state.global_step == 10 * 4 and s.summary()["passes"] == 10 * 60
    assert t.optimizer.param_groups[0]["lr"] == 0.0


# ---- DDP --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_shard_stop_together_and_resume(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)   # one thread a rank (see one_thread)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(__file__), "ddp_transformers.py"), str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    per_rank = ROWS // 2                                        # 24 rows a rank an epoch: 3 steps
    for rk in ranks:
        assert rk["steps"] == EPOCHS * per_rank // BS == rk["resumed_steps"]   # both stop at the budget
        assert rk["passes"] == EPOCHS * ROWS and rk["lr"] == 0.0
        assert rk["part"] + rk["rest"] == rk["full"] and rk["same_weights"]
        assert "world_size=1" in rk["refused"]
    for e in range(EPOCHS):
        a, b = (set(rk["full"][e * per_rank:(e + 1) * per_rank]) for rk in ranks)
        assert len(a) == len(b) == per_rank and not a & b and len(a | b) == ROWS
        assert sorted(a | b) == ranks[0]["selections"][e]           # the epoch's selection, covered
    assert ranks[0]["weights"] == ranks[1]["weights"]               # DDP kept the replicas equal
