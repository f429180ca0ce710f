"""The Sampler's contract as PyTorch users lean on it: only the epoch's rows count, the
budget is kept whatever loop drives it, ``len()`` is pure and whole, a time budget holds
with DataLoader workers, a refused call changes nothing, and a checkpoint is checked whole
before anything is written."""
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from helpers import _step, fake_labels, fake_logits, snapshot, train_epoch


def assert_unchanged(s, before):
    """Nothing a loss call may change (``snapshot``: the per-sample state, position and
    counters) changed since ``before``."""
    st, *counters = before
    now, *counters_now = snapshot(s)
    assert st.keys() == now.keys()
    for k, v in st.items():
        assert torch.equal(v, now[k]) if isinstance(v, torch.Tensor) else v == now[k], k
    assert counters_now == counters


def call(s, idx, update=True, how="loss"):
    idx = torch.as_tensor(idx)
    if how == "loss":
        rows = idx.clamp(0, s.n - 1)   # logits for out-of-range indices too
        return s.loss(fake_logits(rows, s.state.seen), fake_labels(rows), idx, update=update)
    if how == "observe":
        return s.observe(torch.rand(len(idx)), idx, update=update)
    return s.skip(idx)


# ---- 1. only the epoch's rows count ---------------------------------------------------------

@pytest.mark.parametrize("how", ["loss", "observe", "skip"])
def test_a_call_before_the_loop_is_refused_and_epoch_zero_stays_whole(how):
    s = fastsel.Sampler(100, budget=0.5, epochs=2, seed=1)
    before = snapshot(s)
    with pytest.raises(ValueError, match="indices: no epoch is in progress.*update=False"):
        call(s, torch.arange(8), how=how)
    assert_unchanged(s, before)
    if how != "skip":
        call(s, torch.arange(8), update=False, how=how)   # a sanity check that counts nothing
        assert_unchanged(s, before)
    assert len(train_epoch(s, 8)) == 50 and s.position == 50


@pytest.mark.parametrize("how", ["loss", "observe", "skip"])
def test_an_evaluation_pass_after_the_epoch_is_refused(how):
    s = fastsel.Sampler(100, budget=1.0, epochs=2, seed=1)
    train_epoch(s, 10)
    assert s.position == 100
    before = snapshot(s)
    with pytest.raises(ValueError, match="indices: 20 more rows would take epoch 0 to 120 of this "
                                         "rank's 100.*update=False"):
        call(s, torch.arange(20), how=how)
    assert_unchanged(s, before)
    if how != "skip":
        call(s, torch.arange(20), update=False, how=how)
        assert_unchanged(s, before)


def unselected(s, k):
    chosen = set(s.epoch_indices())
    return [i for i in range(s.n) if i not in chosen][:k]


@pytest.mark.parametrize("how", ["loss", "observe", "skip"])
def test_rows_the_epoch_did_not_select_are_refused_at_once_in_strict_mode(how):
    s = fastsel.Sampler(100, budget=0.3, epochs=2, seed=2)
    ok = s.epoch_indices()[:4]
    rows = ok[:2] + unselected(s, 2)
    before = snapshot(s)
    with pytest.raises(ValueError, match=f"indices: 2 row\\(s\\) are samples epoch 0 did not select, "
                                         f"e.g. {rows[2]}.*update=False"):
        call(s, rows, how=how)
    assert_unchanged(s, before)
    call(s, ok, how=how)
    assert s.position == 4


def test_stray_rows_are_masked_and_raised_at_the_next_pass_when_not_strict():
    s = fastsel.Sampler(100, budget=0.3, epochs=3, seed=2, strict=False)
    ok = s.epoch_indices()[:6]
    stray = unselected(s, 2)
    idx = torch.tensor(ok[:4] + stray)
    seen_before = s.state.seen.clone()
    out = call(s, idx)
    assert torch.isfinite(out)
    seen = s.state.seen - seen_before
    assert seen[ok[:4]].tolist() == [1] * 4 and seen[stray].tolist() == [0, 0]  # masked
    assert int(seen.sum()) == 4
    s.set_epoch(1)
    with pytest.raises(ValueError, match=f"indices: 2 row\\(s\\) given to the loss call in epoch 0 were "
                                         f"samples it did not select, e.g. {stray[0]}.*update=False"):
        iter(s)
    s.set_epoch(1)
    assert len(list(s)) == 30   # raised once; the state stayed valid


def test_stray_rows_and_out_of_range_indices_are_told_apart_when_not_strict():
    s = fastsel.Sampler(100, budget=0.3, epochs=3, seed=2, strict=False)
    ok = s.epoch_indices()[:4]
    stray = unselected(s, 1)
    call(s, ok[:2] + stray + [100 + 7])
    s.set_epoch(1)
    with pytest.raises(ValueError, match="1 row\\(s\\) given"):
        iter(s)
    s = fastsel.Sampler(100, budget=0.3, epochs=3, seed=2, strict=False)
    ok = s.epoch_indices()[:4]
    call(s, ok[:3] + [107])
    s.set_epoch(1)
    with pytest.raises(IndexError, match="indices: 1 sample index.*e.g. 107"):
        iter(s)


def test_rows_of_the_epoch_in_another_order_count():
    """A grouped batch sampler (detection recipes) reorders the epoch's rows: that works."""
    s = fastsel.Sampler(60, budget=0.5, epochs=2, seed=3)
    rows = sorted(s.epoch_indices(), key=lambda i: (i % 3, -i))
    for j in range(0, 30, 6):
        call(s, rows[j:j + 6])
    assert s.position == 30
    assert int((s.state.seen > 0).sum()) == 30
    assert len(list(s)) == 0 or s.epoch == 1


def test_update_false_takes_any_in_range_index_at_any_time_and_changes_nothing():
    s = fastsel.Sampler(50, budget=0.2, epochs=2, seed=4)
    before = snapshot(s)
    for idx in (torch.arange(50), torch.tensor([3, 3, 49])):
        call(s, idx, update=False)
        call(s, idx, update=False, how="observe")
    train_epoch(s, 5)
    before = snapshot(s)
    call(s, torch.arange(50), update=False)
    assert_unchanged(s, before)
    with pytest.raises(IndexError, match="e.g. 50"):
        call(s, torch.tensor([0, 50]), update=False)


# ---- 2. the budget is kept ---------------------------------------------------------------------

def loader_for(n, s, **kw):
    ds = fastsel.with_indices(TensorDataset(torch.zeros(n, 1), torch.arange(n) % 5))
    return DataLoader(ds, batch_size=8, sampler=s, **kw)


def test_a_set_epoch_loop_past_the_budget_trains_the_budget_and_warns_once():
    n = 80
    s = fastsel.Sampler(n, policy="tftb", budget=0.5, epochs=3, seed=0)
    loader = loader_for(n, s)
    per_epoch = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for e in range(7):
            s.set_epoch(e)
            rows = 0
            for _, y, idx in loader:
                s.loss(fake_logits(idx, s.state.seen), y, idx)
                rows += len(idx)
            per_epoch.append(rows)
    assert per_epoch == [40, 40, 40, 0, 0, 0, 0]
    spent = [w for w in caught if "budget is spent" in str(w.message)]
    assert len(spent) == 1
    assert s.progress() == 1.0 and s.summary()["passes"] == 120


def test_iterating_past_a_time_budget_yields_nothing(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])
    s = fastsel.Sampler(20, time_budget=1.0, seed=0)
    for i in s:
        clock[0] += 0.125
        call(s, [i])
    assert clock[0] == 1.0
    with pytest.warns(UserWarning, match="budget is spent"):
        assert list(s) == []
    assert list(s) == [] and len(s) == 0


# ---- 3. len() is pure and whole ----------------------------------------------------------------

def test_len_runs_no_selection_pass_and_no_collective(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("len() must not call this")
    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    s = fastsel.Sampler(100, policy="uniform", keep=0.6, time_budget=30.0, seed=0, num_replicas=2, rank=1)
    monkeypatch.setattr(s, "_passes", forbidden)
    assert len(s) == 30
    f = fastsel.Sampler(101, budget=0.3, epochs=2, num_replicas=2, rank=0)
    monkeypatch.setattr(f, "_passes", forbidden)
    assert len(f) == 15 and f.cursor.selection is None


def test_len_is_the_whole_epoch_after_a_mid_epoch_resume():
    s = fastsel.Sampler(90, budget=0.5, epochs=3, seed=6)
    iter(s)
    whole = len(s)
    for idx in torch.tensor(s.epoch_indices()[:20]).split(5):
        call(s, idx)
    t = fastsel.Sampler(90, budget=0.5, epochs=3, seed=6)
    t.load_state_dict(s.state_dict())
    assert len(t) == len(s) == whole == 45
    assert len(list(t)) == 25   # the iterator yields what is left


# ---- 4. a time budget holds with DataLoader workers --------------------------------------------

def test_a_time_budget_ends_within_a_step_with_workers_prefetching(monkeypatch):
    """Two workers prefetch four batches; a step costs 0.5 s of a (driven) clock: the loop
    ends within one step of the 5 s deadline instead of training what was prefetched."""
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])
    n, step = 400, 0.5
    s = fastsel.Sampler(n, time_budget=5.0, seed=0)
    loader = loader_for(n, s, num_workers=2, prefetch_factor=2, multiprocessing_context="fork")
    steps = 0
    for _, y, idx in loader:
        s.loss(fake_logits(idx, s.state.seen), y, idx)
        clock[0] += step
        steps += 1
    assert clock[0] <= 5.0 + step
    assert steps >= 8   # and it did not stop early either


# ---- 6. a refused call changes nothing ----------------------------------------------------------

def test_logits_on_a_device_no_backend_runs_on_change_nothing():
    s = fastsel.Sampler(40, budget=0.5, epochs=2, seed=0)
    idx = torch.tensor(s.epoch_indices()[:4])
    call(s, idx[:2])
    before = snapshot(s)
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        s.loss(torch.randn(2, 5, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
               idx[2:].to("meta"))
    assert s.state.device.type == "cpu"
    assert_unchanged(s, before)
    call(s, idx[2:])
    assert s.position == 4


# ---- 7. a checkpoint is checked whole, then written ----------------------------------------------

def trained_sampler():
    s = fastsel.Sampler(60, policy="tftb", budget=0.5, epochs=3, seed=7)
    train_epoch(s, 6)
    iter(s)
    call(s, s.epoch_indices()[:6])
    return s


def corrupt(sd, path, value):
    sd = {**sd, "counters": dict(sd["counters"])}
    if value is KeyError:
        d = sd
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]
        return sd
    d = sd
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    return sd


@pytest.mark.parametrize("path,value,match", [
    (("epoch",), KeyError, "missing \\['epoch'\\]"),
    (("position",), KeyError, "missing \\['position'\\]"),
    (("generator",), KeyError, "missing \\['generator'\\]"),
    (("policy_state",), KeyError, "missing \\['policy_state'\\]"),
    (("counters",), KeyError, "missing \\['counters'\\]"),
    (("epoch",), -1, "'epoch' must be >= 0, got -1"),
    (("position",), -10, "'position' must be >= 0, got -10"),
    (("position",), 31, "'position' is 31, beyond the 30 rows"),
    (("position",), 3.0, "'position' must be an int, got float 3.0"),
    (("exhausted",), "yes", "'exhausted' must be a bool"),
    (("selection",), torch.arange(30).float(), "'selection' must be None or a 1-D int64"),
    (("selection",), torch.tensor([0, 60]), "'selection' must be None or a 1-D int64"),
    (("selection_epoch",), -2, "'selection_epoch'"),
    (("generator",), torch.zeros(3, dtype=torch.uint8), "'generator'"),
    (("counters", "trained"), -5, "'counters.trained' must be >= 0, got -5"),
    (("counters", "elapsed"), float("nan"), "'counters.elapsed'"),
    (("counters", "epoch_counts"), [30, -1], "'counters.epoch_counts'"),
    (("counters", "loss_calls"), KeyError, "'counters.loss_calls'"),
])
def test_load_state_dict_refuses_each_bad_field_and_changes_nothing(path, value, match):
    src = trained_sampler()
    sd = corrupt(src.state_dict(), path, value)
    s = trained_sampler()
    call(s, s.epoch_indices()[:6])   # a different state from src's, to see nothing is written
    before = snapshot(s)
    sel, epoch = s.cursor.selection.clone(), s.epoch
    with pytest.raises(ValueError, match=match):
        s.load_state_dict(sd)
    assert_unchanged(s, before)
    assert torch.equal(s.cursor.selection, sel) and s.epoch == epoch


def test_a_loaded_sampler_shares_no_tensor_with_the_dict():
    src = trained_sampler()
    sd = src.state_dict()
    s = fastsel.Sampler(60, policy="tftb", budget=0.5, epochs=3, seed=7)
    s.load_state_dict(sd)
    kept = {k: v.clone() for k, v in sd["state"].items() if isinstance(v, torch.Tensor)}
    sel = sd["selection"].clone()
    call(s, s.epoch_indices()[:6])
    s.set_epoch(s.epoch + 1)
    iter(s)
    for k, v in kept.items():
        assert torch.equal(sd["state"][k], v), k
    assert torch.equal(sd["selection"], sel)
    sd["selection"].zero_()
    assert not torch.equal(s.cursor.selection, sd["selection"])


# ---- 10. arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1.5, "3", None, True, torch.tensor(3)])
def test_a_seed_that_is_not_an_int_is_refused_naming_seed(seed):
    with pytest.raises(TypeError, match="seed must be an int, got seed="):
        fastsel.Sampler(10, budget=1.0, epochs=1, seed=seed)


def test_a_numpy_integer_seed_is_an_int():
    a = fastsel.Sampler(10, budget=0.5, epochs=1, seed=np.int64(3))
    b = fastsel.Sampler(10, budget=0.5, epochs=1, seed=3)
    assert a.seed == 3 and type(a.seed) is int and list(a) == list(b)


# ---- 11. scale ---------------------------------------------------------------------------------

def test_iterating_an_epoch_builds_no_python_int_per_index_up_front():
    s = fastsel.Sampler(2_000_000, budget=0.3, epochs=1, seed=0)
    tracemalloc.start()   # the selection pass makes tensors, not Python objects
    try:
        it = iter(s)
        head = [next(it) for _ in range(10_000)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head == s.epoch_array()[:10_000].tolist()
    assert peak < 2_000_000   # a list of the epoch's 600 000 ints would take ~22 MB


@pytest.mark.parametrize("how", ["loss", "observe"])
def test_a_call_refused_for_its_rows_does_not_move_the_state_first(how, monkeypatch):
    """The epoch and shard checks run before the state follows the call's device: on a GPU
    a refused sanity check would otherwise leave the state moved."""
    s = fastsel.Sampler(40, budget=0.5, epochs=2, seed=0)
    moved = []
    follow = s._follow
    monkeypatch.setattr(s, "_follow", lambda *a: moved.append(a) or follow(*a))
    with pytest.raises(ValueError, match="no epoch is in progress"):
        call(s, torch.arange(4), how=how)
    assert moved == []
    train_epoch(s, 5)
    moved.clear()
    with pytest.raises(ValueError, match="more rows would take epoch 0"):
        call(s, torch.arange(4), how=how)
    assert moved == []
