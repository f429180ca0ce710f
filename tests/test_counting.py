"""What counts is rows trained, and the loops that lose rows say so: a sampler reused for
evaluation, ``drop_last=True`` or a ``break``, distributed wrappers, loss settings passed to
the call, labels that look like a missing ``ignore_index``, a dict item with an ``index``."""
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import fastsel
from helpers import fake_logits


def loader_for(s, n, **kw):
    ds = fastsel.with_indices(TensorDataset(torch.zeros(n, 1), torch.arange(n) % 5))
    return DataLoader(ds, batch_size=kw.pop("batch_size", 8), sampler=s, **kw)


def run(s, loader, eval_loader=None, stop_after=None):
    """A plain loop over ``sampler.epochs()``; optionally an evaluation pass per epoch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in s.epochs():
            for step, (_, y, idx) in enumerate(loader):
                if stop_after is not None and step == stop_after:
                    break
                s.loss(fake_logits(idx, s.state.seen), y, idx)
            if eval_loader is not None:
                for _, y, idx in eval_loader:
                    s.loss(fake_logits(idx, s.state.seen), y, idx, update=False)
    return [str(w.message) for w in caught if "fastsel" in str(w.message)]


def test_a_full_loop_trains_the_whole_budget_without_a_word():
    n = 40
    s = fastsel.Sampler(n, budget=0.5, epochs=4, seed=0)
    assert run(s, loader_for(s, n)) == []
    assert s.budget.trained == 80 and s.progress() == 1.0


def test_the_train_sampler_reused_for_evaluation_warns_naming_the_cause():
    n = 40
    s = fastsel.Sampler(n, budget=0.5, epochs=4, seed=0)
    msgs = run(s, loader_for(s, n), eval_loader=loader_for(s, n))
    untrained = [m for m in msgs if "handed out but none of its 20 rows were trained" in m]
    assert len(untrained) == 1 and "evaluation DataLoader given the training sampler" in untrained[0]
    assert any("rows untrained" in m for m in msgs)     # and the budget ends unspent
    assert s.summary()["epochs_run"] == 4 and s.budget.trained < 80


def test_list_sampler_twice_in_an_epoch_warns():
    n = 30
    s = fastsel.Sampler(n, budget=1.0, epochs=6, seed=0)
    with pytest.warns(UserWarning, match="list\\(sampler\\) called again"):
        for e in s.epochs():
            rows = list(s)
            list(s)                                  # a second epoch handed out
            for b in torch.tensor(rows).split(10):
                s.loss(fake_logits(b, s.state.seen), b % 5, b)
            if e >= 2:
                break


@pytest.mark.parametrize("how", ["drop_last", "break"])
def test_an_unspent_budget_warns_once_with_the_shortfall_and_the_fix(how):
    n = 60
    s = fastsel.Sampler(n, budget=0.5, epochs=4, seed=0)   # 30 rows an epoch, batches of 8
    if how == "drop_last":
        msgs = run(s, loader_for(s, n, drop_last=True))
        short = 4 * 6
    else:
        msgs = run(s, loader_for(s, n), stop_after=3)
        short = 4 * 6
    assert s.budget.trained == 120 - short
    partial = [m for m in msgs if "trained 24 of its 30 rows" in m]
    unspent = [m for m in msgs if f"{short} of the budget's 120 rows untrained" in m]
    assert len(partial) == 1 and "drop_last=False" in partial[0]
    assert len(unspent) == 1 and "drop_last=False" in unspent[0]


@pytest.mark.parametrize("bad", [-1, 1.0, True, "2"])
def test_set_epoch_refuses_a_bad_epoch_and_changes_nothing(bad):
    s = fastsel.Sampler(20, budget=0.5, epochs=3, seed=0)
    s.set_epoch(1)
    with pytest.raises(ValueError, match=f"epoch must be an int >= 0, got epoch={bad!r}"):
        s.set_epoch(bad)
    assert s.epoch == 1 and s.position == 0


def test_the_unspent_warning_names_the_users_loop():
    """The warning points at the ``for ... in sampler.epochs()`` line, not into fastsel or
    beyond the loop's function (a stacklevel counted through the sampler's parts)."""
    s = fastsel.Sampler(40, budget=0.5, epochs=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in s.epochs():
            idx = torch.tensor(list(s)[:10])
            s.loss(fake_logits(idx, s.state.seen), idx % 5, idx)
        loop_line = sys._getframe().f_lineno - 3
    unspent = [w for w in caught if "rows untrained" in str(w.message)]
    assert len(unspent) == 1
    assert (unspent[0].filename, unspent[0].lineno) == (__file__, loop_line)


def test_a_time_budget_or_a_loop_without_loss_calls_does_not_warn():
    s = fastsel.Sampler(20, budget=0.5, epochs=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in s.epochs():
            list(s)                                  # an order only: nothing is trained


def test_lightning_style_distributed_wrapper_is_refused_with_the_fix():
    fabric = pytest.importorskip("lightning.fabric.utilities.distributed")
    s = fastsel.Sampler(100, budget=0.5, epochs=3)
    w = fabric.DistributedSamplerWrapper(s, num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        list(w)


def test_a_torch_distributed_sampler_over_the_sampler_is_refused():
    s = fastsel.Sampler(100, budget=0.5, epochs=3)

    class Over(Dataset):
        def __len__(self):
            return len(s)

        def __getitem__(self, i):
            return list(s)[i]

    class Wrapper(DistributedSampler):
        def __iter__(self):
            return iter(list(s))

    with pytest.raises(TypeError, match="fastsel shards itself"):
        list(Wrapper(Over(), num_replicas=2, rank=0))


def test_a_distributed_sampler_in_place_of_fastsels_gets_fastsels_error():
    n = 40
    s = fastsel.Sampler(n, budget=0.5, epochs=2, seed=0)
    ds = fastsel.with_indices(TensorDataset(torch.zeros(n, 1), torch.arange(n) % 5))
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=1, rank=0))
    _, y, idx = next(iter(loader))
    with pytest.raises(ValueError, match="a torch DistributedSampler in its place draws no fastsel epoch"):
        s.loss(fake_logits(idx, s.state.seen), y, idx)


def test_num_replicas_without_a_process_group_is_refused_at_the_first_pass():
    s = fastsel.Sampler(100, budget=0.5, epochs=3, num_replicas=2, rank=0)
    assert len(s) == 25                               # len() needs no process group
    with pytest.raises(RuntimeError, match=r"num_replicas=2, rank=0\) needs an initialised process group"):
        iter(s)


@pytest.mark.parametrize("name,value", [("ignore_index", 255), ("label_smoothing", 0.1),
                                        ("weight", None), ("class_weight", None)])
@pytest.mark.parametrize("how", ["loss", "observe"])
def test_loss_settings_passed_to_the_call_point_at_the_sampler(name, value, how):
    s = fastsel.Sampler(10, budget=1.0, epochs=1)
    idx = torch.tensor(list(s))[:4]
    with pytest.raises(TypeError, match=rf"belong on the Sampler.*fastsel.Sampler\(\.\.\., "):
        if how == "loss":
            s.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), idx, **{name: value})
        else:
            s.observe(torch.rand(4), idx, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        s.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), idx, foo=1)
    assert s.position == 0


@pytest.mark.parametrize("backend", fastsel.backends.available("cpu"))
def test_a_label_like_255_names_ignore_index_on_the_sampler(backend):
    s = fastsel.Sampler(10, budget=1.0, epochs=1, backend=backend)
    idx = torch.tensor(list(s))[:2]
    with pytest.raises(IndexError, match=r"if 255 marks elements to ignore, pass "
                                         r"fastsel\.Sampler\(\.\.\., ignore_index=255\)"):
        s.loss(torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255), idx)


def test_with_indices_refuses_a_dict_that_has_an_index_key():
    class Dicts(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"x": i, "index": 100 + i}

    with pytest.raises(ValueError, match="already has an 'index' key"):
        fastsel.with_indices(Dicts())[1]
    ok = fastsel.with_indices([{"x": 0}])
    assert ok[0] == {"x": 0, "index": 0}
