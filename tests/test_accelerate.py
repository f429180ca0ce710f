"""The README's Accelerate recipe in one process: model, optimizer and BudgetLR through
``accelerator.prepare``, the DataLoader not (Accelerate would re-shard its batches), the
sampler told the rank and world size, and its state saved by ``accelerator.save_state``
through ``register_for_checkpointing(fastsel.accelerate.RankStates(sampler))``: a run resumed
from a mid-epoch or an epoch-end state trains exactly the rows of an uninterrupted one."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.accelerate import RankStates

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'fastsel[accelerate]')")

N, BS, EPOCHS, ROWS = 120, 8, 4, 60    # budget 0.5: 60 rows (8 batches) an epoch


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: reset them around each test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def dataset():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=g), torch.randint(0, 4, (N,), generator=g)
    return fastsel.with_indices(TensorDataset(x, y))


def run(save_dir=None, save_at=None, resume=None, dropout=False, loader_generator=False):
    """The recipe; with ``save_at`` it saves the state after that many steps and stops.
    ``dropout``: a model with dropout (its weights then also depend on the global RNG, which
    ``save_state`` saves and ``load_state`` restores) and AdamW; ``loader_generator``: the
    DataLoader gets its own generator, so starting an epoch's iterator draws nothing from the
    global RNG, which a resumed run restores mid-epoch, before the loop starts a new iterator."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    train = dataset()
    sampler = fastsel.Sampler(train, policy="tftb", budget=0.5, epochs=EPOCHS, seed=0,
                              num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    gen = torch.Generator().manual_seed(0) if loader_generator else None
    loader = DataLoader(train, batch_size=BS, sampler=sampler, generator=gen)     # not prepared
    torch.manual_seed(0)
    if dropout:
        model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        model = nn.Linear(16, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = fastsel.BudgetLR(opt, sampler)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    accelerator.register_for_checkpointing(RankStates(sampler))
    if resume is not None:
        accelerator.load_state(str(resume))
    trained, step = [], 0
    for _ in sampler.epochs():
        for x, y, idx in loader:
            x, y, idx = (t.to(accelerator.device) for t in (x, y, idx))
            loss = sampler.loss(model(x), y, idx)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
            trained += idx.tolist()
            step += 1
            if step == save_at:
                accelerator.save_state(str(save_dir))
                return model, trained, opt, sampler
    return model, trained, opt, sampler


@pytest.mark.parametrize("save_at", [11, 16])     # mid-epoch 1; epoch 1's last step
def test_accelerate_recipe_resumes_exactly(tmp_path, save_at):
    model, full, opt, sampler = run()
    assert len(full) == EPOCHS * ROWS and sampler.summary()["passes"] == EPOCHS * ROWS
    assert opt.param_groups[0]["lr"] == 0.0                     # BudgetLR reached 0 at the end
    AcceleratorState = accelerate.state.AcceleratorState
    AcceleratorState._reset_state(True)
    _, first, _, _ = run(tmp_path, save_at=save_at)
    assert (tmp_path / "custom_checkpoint_0.pkl").exists()
    states = torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=True)
    assert states["world_size"] == 1 and states["ranks"][0]["epoch"] == 1
    AcceleratorState._reset_state(True)
    resumed, rest, opt2, s2 = run(resume=tmp_path)
    assert first + rest == full                                  # the same rows, in order
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert opt2.param_groups[0]["lr"] == 0.0 and s2.summary()["passes"] == EPOCHS * ROWS


def test_a_prepared_loader_would_reshard_the_samplers_shard():
    """Why the DataLoader stays out of ``prepare``: on rank 0 of 2, Accelerate hands this
    process every other batch of what the sampler yields, so half of the shard is lost."""
    from accelerate.data_loader import prepare_data_loader
    train = dataset()
    sampler = fastsel.Sampler(train, budget=0.5, epochs=EPOCHS, seed=0)
    loader = DataLoader(train, batch_size=BS, sampler=sampler)
    prepared = prepare_data_loader(loader, device=torch.device("cpu"), num_processes=2, process_index=0,
                                   put_on_device=False)
    assert len([i for _, _, idx in prepared for i in idx.tolist()]) < len(sampler) == ROWS


def test_rank_states_refuses_a_state_for_another_world():
    s = fastsel.Sampler(N, budget=0.5, epochs=EPOCHS)
    sd = RankStates(s).state_dict()
    assert sd["world_size"] == 1 and len(sd["ranks"]) == 1
    two = fastsel.Sampler(N, budget=0.5, epochs=EPOCHS, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="world_size=1"):
        RankStates(two).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="no process group"):
        RankStates(two).state_dict()
    RankStates(s).load_state_dict(s.state_dict())    # a plain Sampler.state_dict() loads too
    with pytest.raises(TypeError):
        RankStates(object())


@pytest.mark.parametrize("loader_generator", [True, False])
def test_mid_epoch_resume_with_dropout_is_exact_when_the_loader_has_its_own_generator(tmp_path, loader_generator):
    """The Lightning callback's promise (the rows of an uninterrupted run, in order, to the
    same weights) from a mid-epoch ``save_state``, with the RNG in play: exact when the
    DataLoader has its own generator; without one, starting the resumed epoch's iterator
    draws from the restored RNG and the dropout masks differ (the rows still do not)."""
    AcceleratorState = accelerate.state.AcceleratorState
    model, full, _, _ = run(dropout=True, loader_generator=loader_generator)
    AcceleratorState._reset_state(True)
    _, first, _, _ = run(tmp_path, save_at=11, dropout=True, loader_generator=loader_generator)   # mid-epoch 1
    AcceleratorState._reset_state(True)
    resumed, rest, _, _ = run(resume=tmp_path, dropout=True, loader_generator=loader_generator)
    assert len(first) == ROWS + 3 * BS and len(first) + len(rest) == EPOCHS * ROWS
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    if loader_generator:
        assert first + rest == full and same
    else:
        assert not same
