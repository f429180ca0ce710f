"""Checkpoint fields (issue 12, items 7 and 8): every loader validates every field before it
writes anything, never shares a tensor with the dict it loaded, and every checkpoint loads
with ``torch.load(weights_only=True)``, torch's default."""

import pytest
import torch
import torch.nn as nn

import fastsel
from fastsel.batch_policies import BATCH_POLICIES
from fastsel.distributed import StateSync
from fastsel.layout import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,
                            ERR_SIZE, FIELDS, STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE,
                            STAT_SIZE)
from fastsel.policies import POLICIES
from fastsel.selective import SelectiveStep
from fastsel.state import SampleState
from helpers import _step, snapshot, train_epoch, weights_only

N = 157
PER_SAMPLE = [name for name, _ in FIELDS]
NAN, INF = float("nan"), float("inf")


def assert_same(a, b, path="sd"):
    """Nested dicts/lists/tensors equal (tensors: same dtype, shape and values, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True, path
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert a == b, path


def trained_sampler(policy="tftb", epochs=2, batches=None, **kw):
    args = dict(policy=policy, budget=0.4, epochs=5, seed=11)
    args.update(kw)
    s = fastsel.Sampler(N, **args)
    for e in s.epochs():
        if e == epochs:
            if batches:
                train_epoch(s, 8, stop_after=batches)
            break
        train_epoch(s, 8)
    return s


# ---- SampleState ---------------------------------------------------------------------------------

def _set(field, index, value):
    def edit(sd):
        sd[field][index] = value
    return edit


def _replace(field, value):
    def edit(sd):
        sd[field] = value(sd[field]) if callable(value) else value
    return edit


def _drop(field):
    def edit(sd):
        del sd[field]
    return edit


_DTYPE_SWAP = {torch.float32: torch.float64, torch.int32: torch.int64,
               torch.float64: torch.float32, torch.int64: torch.int32}

STATE_CASES = (
    # every field missing
    [(f"{f}-missing", _drop(f), rf"'{f}' is missing") for f in PER_SAMPLE + ["stats", "errors", "n"]]
    # every tensor field with the wrong dtype, and with the wrong shape (the scratch slot kept)
    + [(f"{f}-dtype", _replace(f, lambda t: t.to(_DTYPE_SWAP[t.dtype])), rf"'{f}' must be a .*tensor")
       for f in PER_SAMPLE + ["stats", "errors"]]
    + [(f"{f}-shape", _replace(f, lambda t: torch.cat([t, t[:1]])), rf"'{f}' must be a .*shape")
       for f in PER_SAMPLE + ["stats", "errors"]]
    + [("loss-not-a-tensor", _replace("loss", [0.0] * N), r"'loss' must be a .*tensor.*got list"),
       ("seen-2d", _replace("seen", lambda t: t.view(1, -1)), r"'seen' must be a .*shape")]
    # non-finite floats
    + [(f"{f}-{name}", _set(f, 5, v), rf"'{f}' has 1 non-finite entry")
       for f in ("loss", "loss_var", "p_true", "weight") for name, v in (("nan", NAN), ("inf", INF))]
    + [("loss--inf", _set("loss", 0, -INF), r"'loss' has 1 non-finite entry \(first: index 0"),
       ("weight--inf", _set("weight", 3, -INF), r"'weight' has 1 non-finite entry"),
       ("stats-nan", _set("stats", STAT_EPOCH_LOSS, NAN), r"'stats' has 1 non-finite entry"),
       ("stats-inf", _set("stats", STAT_NONFINITE, INF), r"'stats' has 1 non-finite entry")]
    # out-of-range values: negative counts, variances, weights; an epoch before -1
    + [("seen-negative", _set("seen", 7, -1), r"'seen' has 1 entry below 0 \(first: index 7 = -1\)"),
       ("selected-negative", _set("selected", 2, -3), r"'selected' has 1 entry below 0"),
       ("last_epoch-below-minus-1", _set("last_epoch", 4, -2), r"'last_epoch' has 1 entry below -1"),
       ("loss_var-negative", _set("loss_var", 1, -0.5), r"'loss_var' has 1 entry below 0"),
       ("weight-negative", _set("weight", 1, -1.0), r"'weight' has 1 entry below 0"),
       ("stats-nonfinite-count-negative", _set("stats", STAT_NONFINITE, -1.0), r"'stats' has 1 entry below 0"),
       ("stats-epoch-count-negative", _set("stats", STAT_EPOCH_COUNT, -2.0), r"'stats' has 1 entry below 0"),
       ("errors-index-count-negative", _set("errors", ERR_INDEX_COUNT, -1), r"'errors' has 1 entry below 0"),
       ("errors-label-count-negative", _set("errors", ERR_LABEL_COUNT, -4), r"'errors' has 1 entry below 0")]
    # n: not an int, or another N
    + [("n-str", _replace("n", str(N)), r"'n' must be an int"),
       ("n-bool", _replace("n", True), r"'n' must be an int"),
       ("n-float", _replace("n", float(N)), r"'n' must be an int"),
       ("n-other", _replace("n", N + 1), rf"n={N + 1}")]
)


@pytest.mark.parametrize("name,edit,match", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_a_bad_sample_state_field_is_refused_by_name_and_nothing_changes(name, edit, match):
    sd = trained_sampler("tftb", epochs=2).state.state_dict()
    edit(sd)
    target = trained_sampler("infobatch", epochs=1, seed=3).state
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.check_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    assert_same(before, target.state_dict())
    # The full buffers too (the scratch slot included).
    ref = trained_sampler("infobatch", epochs=1, seed=3).state
    for f, buf in target.buffers().items():
        assert torch.equal(buf, ref.buffers()[f]), f


def test_every_message_says_what_to_do():
    sd = SampleState(4).state_dict()
    sd["seen"][0] = -1
    with pytest.raises(ValueError, match="nothing was loaded: pass the unmodified state_dict"):
        SampleState(4).load_state_dict(sd)
    with pytest.raises(ValueError, match="'state' must be a dict"):
        SampleState(4).load_state_dict([sd])


def test_values_training_produces_are_accepted():
    """Example values of the error counters, negative losses (a custom loss through
    observe), p_true above 1 (exp(-loss) of a negative loss), last_epoch -1 (never seen)."""
    s = SampleState(6)
    sd = s.state_dict()
    sd["errors"][ERR_INDEX_VALUE] = -5
    sd["errors"][ERR_LABEL_VALUE] = -100
    sd["errors"][ERR_INDEX_COUNT] = 2
    sd["loss"][0] = -2.0
    sd["p_true"][0] = 7.389
    sd["stats"][STAT_EPOCH_LOSS] = -2.0
    s.load_state_dict(sd)
    assert s.errors.tolist()[ERR_INDEX_VALUE] == -5 and float(s.loss[0]) == -2.0
    assert int(s.last_epoch[1]) == -1


def test_sample_state_never_shares_a_tensor_with_the_dict_it_loaded():
    sd = trained_sampler("tftb", epochs=2).state.state_dict()
    s = trained_sampler("tftb", epochs=1)
    s.state.load_state_dict(sd)
    loaded = s.state.state_dict()
    # Mutating the dict after loading leaves the state as loaded ...
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v.add_(3)
    assert_same(loaded, s.state.state_dict())
    # ... and training after loading leaves the dict as it was.
    kept = snapshot(sd)
    for _ in s.epochs():
        train_epoch(s, 8)
    assert not torch.equal(s.state.seen, loaded["seen"])   # training did change the state
    assert_same(kept, sd)


# ---- StateSync (the DDP baseline) ----------------------------------------------------------------

def _sync(n=10, seed=0):
    st = SampleState(n)
    g = torch.Generator().manual_seed(seed)
    st.seen.copy_(torch.randint(0, 5, (n,), generator=g, dtype=torch.int32))
    st.stats.copy_(torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64))
    st.errors.copy_(torch.tensor([1, 12, 0, 0]))
    return StateSync(st, world_size=2, rank=0)


SYNC_CASES = (
    [(f"{k}-missing", _drop(k), rf"'sync.{k}' is missing") for k in ("seen0", "stats0", "errors0", "mark")]
    + [("seen0-dtype", _replace("seen0", lambda t: t.long()), r"'sync.seen0' must be a torch.int32"),
       ("seen0-shape", _replace("seen0", lambda t: t[:-1]), r"'sync.seen0' must be a .*shape \(10,\)"),
       ("seen0-negative", _set("seen0", 3, -1), r"'sync.seen0' has 1 entry below 0"),
       ("stats0-dtype", _replace("stats0", lambda t: t.float()), r"'sync.stats0' must be a torch.float64"),
       ("stats0-shape", _replace("stats0", lambda t: t[:2]), r"'sync.stats0' must be a .*shape"),
       ("stats0-nan", _set("stats0", STAT_EPOCH_LOSS, NAN), r"'sync.stats0' has 1 non-finite entry"),
       ("stats0-inf", _set("stats0", STAT_EPOCH_COUNT, INF), r"'sync.stats0' has 1 non-finite entry"),
       ("stats0-negative-count", _set("stats0", STAT_EPOCH_COUNT, -1.0), r"'sync.stats0' has 1 entry below 0"),
       ("errors0-dtype", _replace("errors0", lambda t: t.int()), r"'sync.errors0' must be a torch.int64"),
       ("errors0-shape", _replace("errors0", lambda t: t[:ERR_SIZE - 1]), r"'sync.errors0' must be a .*shape"),
       ("errors0-negative-count", _set("errors0", ERR_LABEL_COUNT, -1), r"'sync.errors0' has 1 entry below 0"),
       ("mark-negative", _replace("mark", -1), r"'sync.mark' must be >= 0"),
       ("mark-float", _replace("mark", 1.5), r"'sync.mark' must be an int"),
       ("mark-bool", _replace("mark", True), r"'sync.mark' must be an int"),
       ("extra-key", _replace("seen1", 0), r"'sync.seen1' is not a field")]
)


@pytest.mark.parametrize("name,edit,match", SYNC_CASES, ids=[c[0] for c in SYNC_CASES])
def test_a_bad_sync_field_is_refused_by_name_and_nothing_changes(name, edit, match):
    sd = _sync(seed=1).state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        StateSync.check_state_dict(sd, 10)
    target = _sync(seed=2)
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.check_state_dict(sd, 10)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd, torch.device("cpu"))
    assert_same(before, target.state_dict())


def test_sync_state_never_shares_a_tensor():
    src = _sync(seed=1)
    sd = src.state_dict()
    kept = snapshot(sd)
    src.stats0.copy_(torch.zeros(STAT_SIZE, dtype=torch.float64))   # as each selection pass does
    src.seen0.add_(1)
    src.errors0.add_(1)
    assert_same(kept, sd)                          # the saved dict did not follow the live sync
    dst = _sync(seed=2)
    StateSync.check_state_dict(sd, 10)
    dst.load_state_dict(sd, torch.device("cpu"))
    loaded = dst.state_dict()
    for v in sd.values():
        if isinstance(v, torch.Tensor):
            v.add_(7)
    assert_same(loaded, dst.state_dict())          # nor does the loaded sync follow the dict


# ---- every checkpoint loads with weights_only=True -----------------------------------------------

@pytest.mark.parametrize("mode", ["budget", "time"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policys_sampler_state_loads_weights_only(policy, mode):
    kw = dict(budget=0.4, epochs=5) if mode == "budget" else dict(time_budget=1e4, epochs=5)
    s = fastsel.Sampler(N, policy=policy, seed=5, **kw)
    for e in s.epochs():
        if e == 2:
            train_epoch(s, 8, stop_after=2)
            break
        train_epoch(s, 8)
    sd = s.state_dict()
    loaded = weights_only(sd)
    r = fastsel.Sampler(N, policy=policy, seed=5, **kw)
    r.policy.check_state_dict(loaded["policy_state"])
    r.load_state_dict(loaded)
    assert_same(s.policy.state_dict(), r.policy.state_dict())
    assert_same(s.state.state_dict(), r.state.state_dict())


def _tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


STEP_POLICIES = [("sb", {"keep": 0.5}), ("sb", {"keep": 0.5, "stale": 2}), ("osgd", {}),
                 ("sift", {"module": "1", "probe_every": 2})]
assert {p for p, _ in STEP_POLICIES} == set(BATCH_POLICIES)


def _trained_step(policy, kw, epochs=3, seed=0):
    x, y = _data()
    model = _tiny_mlp(seed)
    s = SelectiveStep(model, policy, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      num_samples=64, seed=seed, **kw)
    for _ in range(epochs):
        for i in range(0, 64, 16):
            s.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
        s.end_epoch()
    s.step(x[:8], y[:8], torch.arange(8))
    return s


@pytest.mark.parametrize("policy,kw", STEP_POLICIES, ids=["sb", "stale-sb", "osgd", "sift"])
def test_every_batch_policys_step_state_loads_weights_only(policy, kw):
    s = _trained_step(policy, kw)
    loaded = weights_only(s.state_dict())
    t = SelectiveStep(_tiny_mlp(1), policy, num_samples=64, **kw)
    t.load_state_dict(loaded)
    assert_same(s.state_dict(), t.state_dict())


# ---- BudgetLR --------------------------------------------------------------------------------------

def _lr_run(sampler, opt, sched, stop_after=None):
    """Train through the sampler's epochs; the LR each step used. Stops after
    ``stop_after`` steps (mid-epoch) if given."""
    lrs = []
    for _ in sampler.epochs():
        it = sampler.epoch_indices()
        for j in range(0, len(it), 8):
            lrs.append(opt.param_groups[0]["lr"])
            _step(sampler, it[j:j + 8])
            opt.step()
            sched.step()
            if stop_after is not None and len(lrs) == stop_after:
                return lrs
    return lrs


def _lr_setup(final_ratio=0.1):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2, momentum=0.9)
    s = fastsel.Sampler(N, policy="tftb", budget=0.4, epochs=4, seed=2)
    return s, opt, fastsel.BudgetLR(opt, s, final_ratio=final_ratio)


def test_budget_lr_state_holds_no_sampler_and_resumes_weights_only():
    s, opt, sched = _lr_setup()
    ref = _lr_run(s, opt, sched)
    s, opt, sched = _lr_setup()
    first = _lr_run(s, opt, sched, stop_after=13)
    assert "sampler" not in sched.state_dict() and "optimizer" not in sched.state_dict()
    ckpt = weights_only({"sched": sched.state_dict(), "sampler": s.state_dict(), "opt": opt.state_dict()})
    s2, opt2, sched2 = _lr_setup()
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    s2.load_state_dict(ckpt["sampler"])
    assert sched2.sampler is s2 and sched2.optimizer is opt2   # the live objects are kept
    assert sched2.get_last_lr() == sched.get_last_lr()
    rest = _lr_run(s2, opt2, sched2)
    assert first + rest == ref
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1)


def test_budget_lr_loads_an_old_state_that_held_the_sampler_and_keeps_its_own():
    s, opt, sched = _lr_setup()
    _lr_run(s, opt, sched, stop_after=5)
    old = {k: v for k, v in sched.__dict__.items() if k != "optimizer"}   # torch's default state_dict
    assert old["sampler"] is s
    s2, opt2, sched2 = _lr_setup()
    sched2.load_state_dict(old)
    assert sched2.sampler is s2 and sched2.last_epoch == sched.last_epoch


@pytest.mark.parametrize("key,value,match", [
    ("final_ratio", 1.5, r"'final_ratio' must be <= 1.0"),
    ("final_ratio", NAN, r"'final_ratio' must be finite"),
    ("last_epoch", -2, r"'last_epoch' must be >= -1"),
    ("last_epoch", 2.5, r"'last_epoch' must be an int"),
    ("base_lrs", [0.2, 0.2], r"'base_lrs' must be a list of 1 learning rates"),
    ("base_lrs", [INF], r"'base_lrs\[0\]' must be finite"),
    ("final_ratio", None, r"'final_ratio' must be a number"),
])
def test_budget_lr_refuses_a_bad_state_and_changes_nothing(key, value, match):
    s, opt, sched = _lr_setup()
    _lr_run(s, opt, sched, stop_after=3)
    sd = sched.state_dict()
    sd[key] = value
    s2, opt2, sched2 = _lr_setup()
    before = sched2.state_dict()
    with pytest.raises(ValueError, match=match):
        sched2.load_state_dict(sd)
    assert_same(before, sched2.state_dict())


# ---- SelectiveStep and the batch policies -----------------------------------------------------------

def test_stale_sb_never_shares_last_loss_with_the_dict_it_loaded():
    src = _trained_step("sb", {"keep": 0.5, "stale": 2}, epochs=1)
    sd = src.state_dict()
    assert sd["last_loss"] is not None
    kept = snapshot(sd)
    t = _trained_step("sb", {"keep": 0.5, "stale": 2}, epochs=1, seed=4)
    t.load_state_dict(sd)
    loaded = t.state_dict()
    # Training after loading (a stale epoch, then a fresh one that records new losses)
    # leaves the caller's checkpoint as it was.
    x, y = _data()
    for _ in range(2):
        for i in range(0, 64, 16):
            t.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
        t.end_epoch()
    assert not torch.equal(t.state_dict()["last_loss"], loaded["last_loss"])
    assert_same(kept, sd)
    # And mutating the dict after loading leaves the step as loaded.
    u = _trained_step("sb", {"keep": 0.5, "stale": 2}, epochs=1, seed=4)
    u.load_state_dict(sd)
    for key in ("last_loss", "known"):
        sd[key].logical_not_() if sd[key].dtype == torch.bool else sd[key].add_(1)
    sd["policy"]["history"]["buf"].add_(1)
    sd["pending"] is not None and sd["pending"]["x"].add_(1)
    assert_same(kept, u.state_dict())


def test_sift_head_optimizer_state_is_copied_not_shared():
    src = _trained_step("sift", {"module": "1", "probe_every": 2}, epochs=1)
    sd = src.state_dict()
    kept = snapshot(sd)
    t = SelectiveStep(_tiny_mlp(1), "sift", module="1", probe_every=2, num_samples=64)
    t.load_state_dict(sd)
    x, y = _data()
    for i in range(0, 64, 16):
        t.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
    assert_same(kept, sd)


def test_sift_loading_a_state_without_a_head_drops_the_trained_one():
    fresh = SelectiveStep(_tiny_mlp(1), "sift", module="1").state_dict()
    t = _trained_step("sift", {"module": "1"}, epochs=1)
    assert t.policy.head is not None
    t.load_state_dict(fresh)
    assert t.policy.head is None and t.policy.head_opt is None and t.policy.steps == 0


def _sd_set(path, value):
    def edit(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        if value is _DEL:
            del d[path[-1]]
        elif callable(value):
            d[path[-1]] = value(d[path[-1]])
        else:
            d[path[-1]] = value
    return edit


_DEL = object()
STALE = ("sb", {"keep": 0.5, "stale": 2})

STEP_CASES = (
    [(f"{k}-missing", STALE, _sd_set([k], _DEL), rf"'{k}' is missing")
     for k in ("own_epoch", "counts", "times", "policy", "batch_size", "last_loss", "known")]
    + [
        ("last_loss-nan", STALE, _sd_set(["last_loss"], lambda t: t.index_fill(0, torch.tensor([3]), NAN)),
         r"'last_loss' has 1 non-finite entry \(first: index 3"),
        ("last_loss-inf", STALE, _sd_set(["last_loss"], lambda t: t.index_fill(0, torch.tensor([0]), INF)),
         r"'last_loss' has 1 non-finite entry"),
        ("last_loss-shape", STALE, _sd_set(["last_loss"], lambda t: t[:10]), r"'last_loss' must be a .*shape \(64,\)"),
        ("last_loss-dtype", STALE, _sd_set(["last_loss"], lambda t: t.double()), r"'last_loss' must be a torch.float32"),
        ("last_loss-list", STALE, _sd_set(["last_loss"], lambda t: t.tolist()), r"'last_loss' must be a .*got list"),
        ("known-dtype", STALE, _sd_set(["known"], lambda t: t.int()), r"'known' must be a torch.bool"),
        ("known-none", STALE, _sd_set(["known"], None), r"'known' is None but last_loss is not"),
        ("own_epoch-negative", STALE, _sd_set(["own_epoch"], -1), r"'own_epoch' must be >= 0"),
        ("counts-negative", STALE, _sd_set(["counts", "steps"], -3), r"'counts.steps' must be >= 0"),
        ("counts-float", STALE, _sd_set(["counts", "backward"], 2.5), r"'counts.backward' must be an int"),
        ("counts-unknown", STALE, _sd_set(["counts", "bogus"], 1), r"'counts.bogus' is not a field"),
        ("times-inf", STALE, _sd_set(["times", "train"], INF), r"'times.train' must be finite"),
        ("times-negative", STALE, _sd_set(["times", "total"], -1.0), r"'times.total' must be >= 0"),
        ("batch_size-zero", STALE, _sd_set(["batch_size"], 0), r"'batch_size' must be >= 1"),
        ("policy-draws-negative", STALE, _sd_set(["policy", "draws"], -1), r"'policy.draws' must be >= 0"),
        ("policy-missing-draws", STALE, _sd_set(["policy", "draws"], _DEL), r"'policy.draws' is missing"),
        ("history-pos", STALE, _sd_set(["policy", "history", "pos"], 1024), r"'policy.history.pos' must be in \[0, 1023\]"),
        ("history-filled", STALE, _sd_set(["policy", "history", "filled"], -1), r"'policy.history.filled' must be in"),
        ("history-buf-dtype", STALE, _sd_set(["policy", "history", "buf"], lambda t: t.half()),
         r"'policy.history.buf' must be a torch.float32"),
        ("history-buf-none", STALE, _sd_set(["policy", "history", "buf"], None), r"'policy.history.buf' is None"),
        ("pending-idx-dtype", STALE, _sd_set(["pending", "idx"], lambda t: t.float()), r"'pending.idx' must be a 1-D int"),
        ("pending-idx-range", STALE, _sd_set(["pending", "idx"], lambda t: t + 64), r"'pending.idx' has \d+ entr"),
        ("pending-missing-y", STALE, _sd_set(["pending", "y"], _DEL), r"'pending.y' is missing"),
        ("osgd-factor-zero", ("osgd", {}), _sd_set(["policy", "factor"], 0.0), r"'policy.factor' must be > 0.0"),
        ("osgd-factor-nan", ("osgd", {}), _sd_set(["policy", "factor"], NAN), r"'policy.factor' must be finite"),
        ("osgd-accuracy", ("osgd", {}), _sd_set(["policy", "last_accuracy"], 1.5), r"'policy.last_accuracy' must be <= 1.0"),
        ("sift-head-shape", ("sift", {"module": "1"}), _sd_set(["policy", "shape"], (33, 5)),
         r"'policy.head' does not fit an exit head of shape \(33, 5\)"),
        ("sift-head-opt", ("sift", {"module": "1"}), _sd_set(["policy", "head_opt"], lambda d: {**d, "param_groups": []}),
         r"'policy.head_opt' does not fit"),
        ("sift-steps", ("sift", {"module": "1"}), _sd_set(["policy", "steps"], -1), r"'policy.steps' must be >= 0"),
        ("sift-exit-time", ("sift", {"module": "1"}), _sd_set(["policy", "exit_time"], NAN), r"'policy.exit_time' must be finite"),
    ]
)


@pytest.mark.parametrize("name,pk,edit,match", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_a_bad_selective_step_field_is_refused_by_name_and_nothing_changes(name, pk, edit, match):
    policy, kw = pk
    src = _trained_step(policy, kw, epochs=1)
    if "pending" in name and src.state_dict()["pending"] is None:
        x, y = _data()
        while src.pending == 0:
            src.step(x[:16], y[:16], torch.arange(16))
    sd = src.state_dict()
    edit(sd)
    t = _trained_step(policy, kw, epochs=1, seed=4)
    before = t.state_dict()
    with pytest.raises(ValueError, match=match):
        t.check_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        t.load_state_dict(sd)
    assert_same(before, t.state_dict())


# ---- epoch-level policies ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("alpha", NAN, r"'policy_state.alpha' must be finite"),
    ("alpha", 1.0, r"'policy_state.alpha' must be < 1.0"),
    ("explore", -0.1, r"'policy_state.explore' must be >= 0.0"),
    ("prev_loss", INF, r"'policy_state.prev_loss' must be finite"),
    ("prev_loss", "1.0", r"'policy_state.prev_loss' must be a number"),
    ("alpha", _DEL, r"'policy_state.alpha' is missing"),
    ("beta", 0.1, r"'policy_state.beta' is not a field"),
])
def test_a_bad_tftb_state_is_refused_and_changes_nothing(key, value, match):
    s = trained_sampler("tftb", epochs=3, time_budget=1e4, budget=None)
    sd = s.policy.state_dict()
    _sd_set([key], value)(sd)
    p = trained_sampler("tftb", epochs=2, time_budget=1e4, budget=None).policy
    before = p.state_dict()
    with pytest.raises(ValueError, match=match):
        p.check_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        p.load_state_dict(sd)
    assert_same(before, p.state_dict())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_stateless_policy_refuses_a_state_it_never_writes(policy):
    p = fastsel.Sampler(N, policy=policy, budget=0.4, epochs=5).policy
    p.load_state_dict(p.state_dict())
    with pytest.raises(ValueError, match="'policy_state' must be a dict"):
        p.load_state_dict(None)
    with pytest.raises(ValueError, match=r"'policy_state.bogus' is not a field"):
        p.load_state_dict({**p.state_dict(), "bogus": 1})


def test_stale_sb_records_a_nan_loss_as_unknown_so_its_checkpoint_loads():
    """A NaN loss (an fp16 overflow, a diverged sample) is no usable last loss: the sample
    counts as unknown (always kept in a stale epoch, as a NaN's CDF of 1 kept it) and the
    saved last losses stay finite, so the step's own checkpoint passes its own checks."""
    x, y = _data()
    x[[0, 16, 32, 48]] = NAN                         # these samples' losses are NaN
    s = SelectiveStep(_tiny_mlp(), "sb", keep=0.5, stale=2, num_samples=64)
    for i in range(0, 64, 16):                       # epoch 0: fresh
        s.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
    sd = s.state_dict()
    assert bool(torch.isfinite(sd["last_loss"]).all())
    assert not sd["known"][[0, 16, 32, 48]].any() and sd["known"][[1, 17]].all()
    t = SelectiveStep(_tiny_mlp(), "sb", keep=0.5, stale=2, num_samples=64)
    t.load_state_dict(weights_only(sd))
    t.end_epoch()                                    # epoch 1: stale
    t.step(x[:16], y[:16], torch.arange(16))
    assert 0 in t.last["chosen"].tolist()            # the NaN sample is kept
