"""The shared backend suite: every backend that runs here meets the same oracle.

Parametrised over every backend on every device it runs on here (``conftest.BACKEND_CASES``:
the CPU, and a GPU when there is one); a new backend joins by being available. The oracle is ``F.cross_entropy`` for losses and gradients and the float64
model in ``oracle.py`` for the per-sample state.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastsel import rng
from fastsel.backends import get_backend
from fastsel.validation.tensors import raise_for_errors
from fastsel.config import LossConfig
from fastsel.state import STAT_NONFINITE, SampleState
from helpers import batch, snapshot
from oracle import OracleState, ew_moments, expected_loss

SIZES = [(c, b) for c in (2, 10, 100, 1000, 1001) for b in (1, 255, 4096)]


def dev(name):
    return getattr(name, "device", "cpu")


def close(a, b, **kw):
    """assert_close on the host, wherever the backend ran."""
    torch.testing.assert_close(a.cpu(), b.cpu(), **kw)


def run_step(name, logits, labels, indices, state, cfg, epoch=0):
    """One step on the case's device; the state goes there and comes back to the host."""
    d = dev(name)
    x = logits.to(d).clone().requires_grad_(True)
    if cfg.class_weight is not None:
        cfg.class_weight = cfg.class_weight.to(d)
    state.to(d)
    try:
        out = get_backend(name, d).step(x, labels.to(d), indices.to(d), state, cfg, epoch)
    finally:
        state.to("cpu")
        if cfg.class_weight is not None:
            cfg.class_weight = cfg.class_weight.cpu()
    return out, x


@pytest.mark.parametrize("c,b", SIZES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grad_match_cross_entropy(backend_name, gen, c, b, reduction):
    n = 5000
    logits, labels, indices = batch(gen, b, c, n, pool=min(n, max(1, b // 3)), ignore=0.1)
    cfg = LossConfig(reduction=reduction)
    out, x = run_step(backend_name, logits, labels, indices, SampleState(n), cfg)
    ref_x = logits.clone().requires_grad_(True)
    ref = expected_loss(ref_x, labels, reduction)
    close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(ref.shape, generator=gen) if reduction == "none" else torch.tensor(1.0)
    out.backward(g.to(out.device))
    ref.backward(g)
    close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_and_class_weights(backend_name, gen, smoothing, weighted):
    c, b, n = 37, 300, 1000
    logits, labels, indices = batch(gen, b, c, n, pool=min(n, max(1, b // 3)), ignore=0.1)
    w = torch.rand(c, generator=gen) + 0.5 if weighted else None
    for reduction in ("mean", "sum", "none"):
        cfg = LossConfig(reduction=reduction, label_smoothing=smoothing, class_weight=w)
        out, x = run_step(backend_name, logits, labels, indices, SampleState(n), cfg)
        ref_x = logits.clone().requires_grad_(True)
        ref = expected_loss(ref_x, labels, reduction, label_smoothing=smoothing, class_weight=w)
        close(out, ref, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        ref.sum().backward()
        close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_accumulate_in_fp32(backend_name, gen, dtype):
    c, b, n = 1001, 255, 600
    logits, labels, indices = batch(gen, b, c, n, dtype, pool=min(n, max(1, b // 3)))
    state = SampleState(n)
    out, x = run_step(backend_name, logits, labels, indices, state, LossConfig())
    ref_x = logits.clone().requires_grad_(True)
    ref = expected_loss(ref_x, labels, "mean")  # computed from the upcast logits
    close(out, ref, rtol=1e-5, atol=1e-6)
    out.backward()
    ref.backward()
    assert x.grad.dtype == dtype
    close(x.grad.float(), ref_x.grad.float(), rtol=1e-2, atol=1e-3)
    oracle = OracleState(n)
    oracle.step(logits.float(), labels, indices, epoch=0, ema=0.3)
    torch.testing.assert_close(state.loss.double(), torch.tensor(oracle.loss, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_state_matches_float64_oracle(backend_name, gen):
    """Several steps over several epochs, with duplicates, ignore_index, label smoothing and
    NaN/inf rows: the state equals the float64 model of the documented update."""
    n, c, ema = 97, 10, 0.3
    cfg = LossConfig(label_smoothing=0.05, ema=ema)
    state, oracle = SampleState(n), OracleState(n)
    nonfinite = 0
    for step in range(12):
        logits, labels, indices = batch(gen, 61, c, n, pool=min(n, 20), unique=step % 2 == 1, ignore=0.1)
        logits[3, 2] = float("nan")
        logits[7, 0] = float("inf")
        nonfinite += int((labels[[3, 7]] != -100).sum())
        run_step(backend_name, logits, labels, indices, state, cfg, epoch=step // 4)
        oracle.step(logits, labels, indices, epoch=step // 4, ema=ema, label_smoothing=0.05)
    torch.testing.assert_close(state.loss.double(), torch.tensor(oracle.loss, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.loss_var.double(), torch.tensor(oracle.var, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state.p_true.double(), torch.tensor(oracle.p, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert state.seen.tolist() == oracle.seen
    assert state.last_epoch.tolist() == oracle.last
    assert int(state.stats[STAT_NONFINITE]) == nonfinite > 0  # rows 3 and 7, unless ignored


def test_ema_variance_equals_float64_recomputation(backend_name, gen):
    """The running EMA variance equals the exponentially weighted variance recomputed in
    float64 from each sample's whole loss history."""
    n, c, ema = 40, 7, 0.25
    state, oracle = SampleState(n), OracleState(n)
    for step in range(15):
        logits, labels, indices = batch(gen, 30, c, n, unique=True)
        run_step(backend_name, logits, labels, indices, state, LossConfig(ema=ema), epoch=step)
        oracle.step(logits, labels, indices, epoch=step, ema=ema)
    checked = 0
    for i in range(n):
        hist = oracle.history[i]
        if len(hist) < 3:
            continue
        mean, var = ew_moments(hist, ema)
        assert math.isclose(float(state.loss[i]), mean, rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(float(state.loss_var[i]), var, rel_tol=1e-4, abs_tol=1e-6)
        checked += 1
    assert checked > n // 2


def test_duplicates_are_deterministic_and_order_free(backend_name, gen):
    n, c = 50, 10
    logits, labels, _ = batch(gen, 200, c, n, pool=min(n, 66))
    indices = torch.randint(0, 8, (200,), generator=gen)  # heavy duplication
    states = []
    for perm in (torch.arange(200), torch.arange(200), torch.randperm(200, generator=gen)):
        st = SampleState(n)
        run_step(backend_name, logits[perm], labels[perm], indices[perm], st, LossConfig())
        states.append(st)
    for f in ("loss", "loss_var", "p_true", "seen"):
        assert torch.equal(getattr(states[0], f), getattr(states[1], f)), f
        torch.testing.assert_close(getattr(states[0], f), getattr(states[2], f), rtol=1e-6, atol=0)
    assert int(states[0].seen.sum()) == 200


def test_nonfinite_losses_never_enter_state(backend_name, gen):
    n, c = 20, 5
    state = SampleState(n)
    logits, labels, indices = batch(gen, 10, c, n, unique=True)
    logits[0] = float("nan")
    logits[1, labels[1]] = float("-inf")
    out, _ = run_step(backend_name, logits, labels, indices, state, LossConfig())
    assert torch.isnan(out) or torch.isinf(out)  # propagates, as F.cross_entropy does (AMP relies on it)
    assert int(state.seen[indices[0]]) == 0 and int(state.seen[indices[1]]) == 0
    assert int(state.seen[indices[2:]].sum()) == 8
    assert torch.isfinite(state.loss).all() and torch.isfinite(state.loss_var).all()
    assert int(state.stats[STAT_NONFINITE]) == 2


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("bad", ["index_high", "index_negative", "label_high", "label_negative"])
def test_bad_values_strict_refused_state_untouched(backend_name, gen, bad):
    n, c = 30, 6
    state = SampleState(n)
    logits, labels, indices = batch(gen, 12, c, n, unique=True)
    run_step(backend_name, logits, labels, indices, state, LossConfig())
    before = snapshot(state)
    value = {"index_high": n, "index_negative": -3, "label_high": c, "label_negative": -7}[bad]
    if bad.startswith("index"):
        indices = indices.clone()
        indices[5] = value
    else:
        labels = labels.clone()
        labels[5] = value
    with pytest.raises(IndexError, match=str(value)) as ei:
        run_step(backend_name, logits, labels, indices, state, LossConfig(strict=True))
    assert ("indices" if bad.startswith("index") else "labels") in str(ei.value)
    _assert_same(before, snapshot(state))


def test_bad_values_deferred_are_masked_counted_and_raised_later(backend_name, gen):
    n, c = 30, 6
    state = SampleState(n)
    logits, labels, indices = batch(gen, 12, c, n, unique=True)
    indices = indices.clone()
    labels = labels.clone()
    indices[2] = n + 5
    labels[4] = c
    run_step(backend_name, logits, labels, indices, state, LossConfig(strict=False))
    good = [r for r in range(12) if r not in (2, 4)]
    assert int(state.seen.sum()) == len(good)
    assert int(state.seen[indices[4]]) == 0
    errs = state.take_errors()
    with pytest.raises(IndexError, match=str(n + 5)):
        raise_for_errors(errs, n, c)
    assert int(state.errors.abs().sum()) == 0


def test_policy_weights_scale_each_row(backend_name, gen):
    n, c = 64, 10
    state = SampleState(n)
    state.weight.copy_(torch.rand(n, generator=gen) * 2)
    logits, labels, indices = batch(gen, 40, c, n, pool=min(n, 13))
    for reduction in ("mean", "sum", "none"):
        out, x = run_step(backend_name, logits, labels, indices, state, LossConfig(reduction=reduction))
        ref_x = logits.clone().requires_grad_(True)
        per = expected_loss(ref_x, labels, "none") * state.weight[indices]
        ref = {"mean": per.sum() / len(per), "sum": per.sum(), "none": per}[reduction]
        close(out, ref, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        ref.sum().backward()
        close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 1000, 1337, 4099])
def test_select_is_top_k_with_ties_by_index(backend_name, gen, n):
    b = get_backend(backend_name, dev(backend_name))
    keys = torch.randint(0, 7, (n,), generator=gen).float()  # many ties
    keys[torch.rand(n, generator=gen) < 0.05] = float("nan")
    order = sorted(range(n), key=lambda i: (float("inf") if math.isnan(keys[i]) else -float(keys[i]), i))
    for k in sorted({1, n // 3 or 1, n}):
        assert b.select(keys.to(dev(backend_name)), k).tolist() == order[:k]


def test_select_orders_infinities_and_nan(backend_name):
    """+inf > FLT_MAX > ... > -FLT_MAX > -inf > NaN; -0 == +0 ties by index."""
    b = get_backend(backend_name, dev(backend_name))
    big = torch.finfo(torch.float32).max
    keys = torch.tensor([float("nan"), -big, float("inf"), 0.0, float("-inf"), big, -0.0,
                         float("nan"), float("inf"), 1.0, float("-inf")]).to(dev(backend_name))
    expect = [2, 8, 5, 9, 3, 6, 1, 4, 10, 0, 7]
    for k in (1, 3, 8, len(keys)):
        assert b.select(keys, k).tolist() == expect[:k]


def test_empty_batch_is_harmless(backend_name):
    """B = 0: no state change; the mean over no rows is NaN, as F.cross_entropy gives."""
    st = SampleState(10)
    e = torch.empty(0, dtype=torch.int64)
    for strict in (True, False):
        out, _ = run_step(backend_name, torch.empty(0, 5), e, e, st, LossConfig(strict=strict))
        assert torch.isnan(out.cpu())
    assert int(st.seen.sum()) == 0 and int(st.errors.abs().sum()) == 0


def test_noise_and_shuffle_are_bit_exact_with_reference(backend_name, gen):
    d = dev(backend_name)
    b, ref = get_backend(backend_name, d), get_backend("reference", "cpu")
    idx = torch.arange(1337)
    u = b.uniform(idx.to(d), 12345, rng.STREAM_SELECT).cpu()
    assert torch.equal(u, rng.uniform(idx, 12345, rng.STREAM_SELECT))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    chosen = torch.randperm(1337, generator=gen)[:500]
    s = b.shuffle(chosen.to(d), 777).cpu()
    assert torch.equal(s, ref.shuffle(chosen, 777))
    assert sorted(s.tolist()) == sorted(chosen.tolist())


# ---- every F.cross_entropy target: K-dim class indices and class probabilities -------------

def _assert_state(state, oracle):
    torch.testing.assert_close(state.loss.double(), torch.tensor(oracle.loss, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.loss_var.double(), torch.tensor(oracle.var, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state.p_true.double(), torch.tensor(oracle.p, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert state.seen.tolist() == oracle.seen
    assert state.last_epoch.tolist() == oracle.last


def _targets(gen, shape, soft, ignore=0.2):
    """Class indices [B, d1..dk] (a share ignored) or class probabilities of ``shape``."""
    if soft:
        return torch.softmax(torch.randn(shape, generator=gen) * 2, dim=1)
    t = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]), generator=gen)
    t[torch.rand(t.shape, generator=gen) < ignore] = -100
    return t


TARGET_CASES = [((5, 7, 3, 4), False), ((6, 3, 13), False), ((9, 11), True), ((4, 5, 3, 2), True)]


@pytest.mark.parametrize("shape,soft", TARGET_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_any_target_matches_cross_entropy(backend_name, gen, shape, soft, reduction):
    """K-dim class indices with ignore_index and class probabilities (mixup), with label
    smoothing and class weights: loss and gradient equal F.cross_entropy's."""
    n = 12
    for smoothing, weighted in ((0.0, False), (0.1, True)):
        logits = torch.randn(shape, generator=gen) * 3
        target = _targets(gen, shape, soft)
        indices = torch.randint(0, n, (shape[0],), generator=gen)
        w = torch.rand(shape[1], generator=gen) + 0.5 if weighted else None
        cfg = LossConfig(reduction=reduction, label_smoothing=smoothing, class_weight=w)
        out, x = run_step(backend_name, logits, target.to(dev(backend_name)), indices, SampleState(n), cfg)
        ref_x = logits.clone().requires_grad_(True)
        ref = F.cross_entropy(ref_x, target, weight=w, reduction=reduction, label_smoothing=smoothing)
        assert out.shape == ref.shape
        close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn(ref.shape, generator=gen)
        out.backward(g.to(out.device))
        ref.backward(g)
        close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,soft", TARGET_CASES)
def test_any_target_state_matches_float64_oracle(backend_name, gen, shape, soft):
    """Several steps with duplicates, ignored elements and NaN/inf elements: each sample's
    observation is the mean over its non-ignored elements (soft: its p_true is sum t_c p_c)."""
    n, ema = 9, 0.3
    state, oracle = SampleState(n), OracleState(n)
    nonfinite = 0
    for step in range(5):
        logits = torch.randn(shape, generator=gen) * 3
        logits.view(shape[0], shape[1], -1)[1, 0, 0] = float("nan")
        target = _targets(gen, shape, soft)
        indices = torch.randint(0, n, (shape[0],), generator=gen)
        cfg = LossConfig(label_smoothing=0.05, ema=ema)
        run_step(backend_name, logits, target.to(dev(backend_name)), indices, state, cfg, epoch=step // 2)
        nonfinite += oracle.step_any(logits, target, indices, epoch=step // 2, ema=ema, label_smoothing=0.05)
    _assert_state(state, oracle)
    assert int(state.stats[STAT_NONFINITE]) == nonfinite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_any_target_low_precision_logits(backend_name, gen, dtype):
    n, shape = 10, (4, 6, 5, 3)
    for soft in (False, True):
        logits = (torch.randn(shape, generator=gen) * 3).to(dtype)
        target = _targets(gen, shape, soft)
        indices = torch.arange(4)
        out, x = run_step(backend_name, logits, target.to(dev(backend_name)), indices, SampleState(n), LossConfig())
        ref_x = logits.clone().requires_grad_(True)
        ref = F.cross_entropy(ref_x.float(), target)
        close(out, ref, rtol=1e-5, atol=1e-6)
        out.backward()
        ref.backward()
        assert x.grad.dtype == dtype
        close(x.grad.float(), ref_x.grad.float(), rtol=1e-2, atol=1e-3)


def test_kdim_bad_values_strict_and_deferred(backend_name, gen):
    """A bad label element is refused (strict, nothing written) or masked alone (deferred);
    a bad index masks its whole sample."""
    n, shape = 8, (4, 5, 3, 2)
    logits = torch.randn(shape, generator=gen)
    labels = torch.randint(0, 5, (4, 3, 2), generator=gen)
    labels[2, 1, 1] = 9
    state = SampleState(n)
    with pytest.raises(IndexError, match="labels: 1 label"):
        run_step(backend_name, logits, labels, torch.arange(4), state, LossConfig(strict=True))
    assert int(state.seen.sum()) == 0 and int(state.errors.abs().sum()) == 0
    run_step(backend_name, logits, labels, torch.tensor([0, 1, 2, n + 3]), state, LossConfig(strict=False))
    assert state.seen.tolist()[:4] == [1, 1, 1, 0]
    oracle = OracleState(n)
    oracle.step_any(logits[:3], labels[:3], torch.arange(3), epoch=0, ema=0.3)
    torch.testing.assert_close(state.loss[:3].double(), torch.tensor(oracle.loss[:3], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    errs = state.take_errors().tolist()
    assert errs == [1, n + 3, 1, 9]


# ---- observe: any per-sample loss ---------------------------------------------------------

def run_observe(name, losses, indices, state, cfg, epoch=0, p_true=None, update=True):
    d = dev(name)
    x = losses.to(d).clone().requires_grad_(True)
    state.to(d)
    try:
        out = get_backend(name, d).observe(x, indices.to(d), state, cfg, epoch,
                                           None if p_true is None else p_true.to(d), update)
    finally:
        state.to("cpu")
    return out, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_observe_matches_float64_oracle(backend_name, gen, dtype, reduction):
    """Duplicates, NaN/inf rows and low-precision losses: the state equals the oracle's; the
    returned loss is the policy-weighted reduction and its gradient flows into the losses."""
    n, ema = 13, 0.3
    state, oracle = SampleState(n), OracleState(n)
    state.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    nonfinite = 0
    for step in range(4):
        losses = (torch.rand(11, generator=gen) * 4).to(dtype)
        losses[2] = float("nan")
        losses[5] = float("inf")
        indices = torch.randint(0, n, (11,), generator=gen)
        p = None if step % 2 else torch.rand(11, generator=gen)
        out, x = run_observe(backend_name, losses, indices, state, LossConfig(reduction=reduction, ema=ema),
                             epoch=step, p_true=p)
        nonfinite += oracle.observe(losses.float(), indices, epoch=step, ema=ema, p_true=p)
        ref_x = losses.clone().requires_grad_(True)
        per = ref_x.float() * state.weight[indices]
        ref = {"mean": per.sum() / len(per), "sum": per.sum(), "none": per}[reduction]
        close(out, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        g = torch.randn(ref.shape, generator=gen)
        out.backward(g.to(out.device))
        ref.backward(g)
        assert x.grad.dtype == dtype
        close(x.grad, ref_x.grad, equal_nan=True)
    _assert_state(state, oracle)
    assert int(state.stats[STAT_NONFINITE]) == nonfinite == 8


def test_observe_of_cross_entropy_equals_the_fused_step(backend_name, gen):
    """observe(F.cross_entropy(..., reduction="none"), idx) leaves exactly the state the
    fused step leaves, and returns the same loss and gradient."""
    n, c = 30, 10
    s1, s2 = SampleState(n), SampleState(n)
    s1.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    s2.weight.copy_(s1.weight)
    for step in range(3):
        logits, labels, indices = batch(gen, 40, c, n, pool=min(n, 13))
        out1, x1 = run_step(backend_name, logits, labels, indices, s1, LossConfig(), epoch=step)
        x2 = logits.clone().to(dev(backend_name)).requires_grad_(True)
        s2.to(dev(backend_name))
        try:
            out2 = get_backend(backend_name, dev(backend_name)).observe(
                F.cross_entropy(x2, labels.to(x2.device), reduction="none"), indices.to(x2.device),
                s2, LossConfig(), step)
        finally:
            s2.to("cpu")
        close(out1, out2, rtol=1e-6, atol=1e-7)
        out1.backward()
        out2.backward()
        close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    for f in ("loss", "loss_var", "p_true"):
        torch.testing.assert_close(getattr(s1, f), getattr(s2, f), rtol=1e-6, atol=1e-7)
    assert torch.equal(s1.seen, s2.seen) and torch.equal(s1.last_epoch, s2.last_epoch)


def test_observe_bad_index_strict_refused_deferred_masked(backend_name, gen):
    n = 10
    state = SampleState(n)
    losses = torch.rand(6, generator=gen)
    bad = torch.tensor([0, 1, 2, n, 4, 5])
    with pytest.raises(IndexError, match=f"indices: 1 sample index.*e.g. {n}"):
        run_observe(backend_name, losses, bad, state, LossConfig(strict=True))
    assert int(state.seen.sum()) == 0 and int(state.errors.abs().sum()) == 0
    out, _ = run_observe(backend_name, losses, bad, state, LossConfig(strict=False, reduction="sum"))
    close(out, losses[[0, 1, 2, 4, 5]].sum())
    assert int(state.seen.sum()) == 5
    assert state.take_errors().tolist() == [1, n, 0, 0]


def test_update_false_changes_no_state(backend_name, gen):
    n, c = 20, 6
    state = SampleState(n)
    logits, labels, indices = batch(gen, 12, c, n, pool=min(n, 4))
    before = snapshot(state)
    d = dev(backend_name)
    state.to(d)
    try:
        b = get_backend(backend_name, d)
        out = b.step(logits.to(d), labels.to(d), indices.to(d), state, LossConfig(), 0, False)
        b.observe(torch.rand(12).to(d), indices.to(d), state, LossConfig(), 0, None, False)
    finally:
        state.to("cpu")
    _assert_same(before, snapshot(state))
    close(out, expected_loss(logits, labels, "mean"), rtol=1e-5, atol=1e-6)


def test_select_k_is_checked_once_for_every_backend(backend_name):
    """k is normalised in one place (Backend.select): every backend refuses k < 0 and keeps
    all keys for k > N, so backends cannot drift apart on it."""
    b = get_backend(backend_name, dev(backend_name))
    keys = torch.tensor([0.3, 2.0, -1.0, 2.0, 0.0]).to(dev(backend_name))
    for bad in (-2, 1.5, True, torch.tensor(2)):
        with pytest.raises(ValueError, match="k must be a non-negative int"):
            b.select(keys, bad)
    assert b.select(keys, 9).tolist() == [1, 3, 0, 4, 2]
    assert b.select(keys, 0).tolist() == []


# ---- duplicates at scale, and selection ties at sizes not powers of two -------------------

def test_all_rows_one_index_is_one_observation(backend_name, gen):
    """A batch whose 64 rows all carry one index is ONE observation of their mean (seen
    += the occurrences), over several steps (the first observation, then the EMA branch),
    through the step and through observe; a non-finite row stays out; others untouched."""
    n, c, b, ema = 11, 7, 64, 0.3
    state, oracle = SampleState(n), OracleState(n)
    nonfinite = 0
    for step in range(3):
        logits, labels, _ = batch(gen, b, c, n, pool=min(n, max(1, b // 3)), ignore=0.1)
        logits[3, 1] = float("nan")
        nonfinite += int(labels[3] != -100)
        idx = torch.full((b,), 5)
        run_step(backend_name, logits, labels, idx, state, LossConfig(ema=ema), epoch=step)
        oracle.step(logits, labels, idx, epoch=step, ema=ema)
    for step in (3, 4):
        losses = torch.rand(b, generator=gen) * 3
        idx = torch.full((b,), 2)
        run_observe(backend_name, losses, idx, state, LossConfig(ema=ema), epoch=step)
        oracle.observe(losses, idx, epoch=step, ema=ema)
    _assert_state(state, oracle)
    assert int(state.stats[STAT_NONFINITE]) == nonfinite
    assert state.seen.tolist() == [0, 0, 2 * b] + [0] * 2 + [int(state.seen[5])] + [0] * 5
    assert int(state.stats[2]) == int(state.seen.sum())  # STAT_EPOCH_COUNT: every occurrence


@pytest.mark.parametrize("b", [257, 1000])
def test_many_duplicates_match_oracle_and_stats(backend_name, gen, b):
    """Hundreds of rows over six samples (sizes not powers of two), ignored and non-finite
    rows among them: the state equals the float64 oracle's, and the epoch stats count and
    sum every observed row."""
    n, c, ema = 23, 5, 0.25
    state, oracle = SampleState(n), OracleState(n)
    total, count = 0.0, 0
    for step in range(2):
        logits, labels, _ = batch(gen, b, c, n, pool=min(n, max(1, b // 3)), ignore=0.1)
        logits[[5, 77], 0] = float("inf")
        idx = torch.randint(0, 6, (b,), generator=gen)
        run_step(backend_name, logits, labels, idx, state, LossConfig(ema=ema, reduction="sum"),
                 epoch=step)
        oracle.step(logits, labels, idx, epoch=step, ema=ema)
        per = expected_loss(logits, labels, "none")
        ok = (labels != -100) & torch.isfinite(per)
        total += float(per[ok].double().sum())
        count += int(ok.sum())
    _assert_state(state, oracle)
    assert int(state.stats[2]) == count == int(state.seen.sum())
    assert math.isclose(float(state.stats[1]), total, rel_tol=1e-6)


def _edge_keys(gen, n):
    """Few distinct values (heavy ties) with -0.0/+0.0, +-inf, +-FLT_MAX and NaN."""
    big = torch.finfo(torch.float32).max
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), big, -big, 0.0, -0.0, 1.5,
                         -2.0, 1e-30])
    return pool[torch.randint(0, len(pool), (n,), generator=gen)]


@pytest.mark.parametrize("n", [77, 9001, 20011])
def test_select_ties_nan_inf_and_epoch_order_equal_reference(backend_name, gen, n):
    """The winners (rank order, ties to the lower index, NaN last) and the epoch's order
    (``shuffle`` of the winners) equal the reference's at k on either side of and inside
    tie groups (the +-0 group, -inf, NaN), at sizes that are not powers of two."""
    d = dev(backend_name)
    b, ref = get_backend(backend_name, d), get_backend("reference", "cpu")
    keys = _edge_keys(gen, n)
    full = ref.select(keys, n)
    ks = {1, n // 3, n - 1, n}
    clean = torch.nan_to_num(keys, nan=float("-inf"))
    for v in (0.0, float("-inf")):
        above, same = int((clean > v).sum()), int((keys == v).sum())
        ks |= {above, above + 1, above + same // 2, above + same}
    nan = int(torch.isnan(keys).sum())
    ks |= {n - nan + nan // 2}
    kd = keys.to(d)
    for k in sorted(x for x in ks if 0 < x <= n):
        got = b.select(kd, k)
        assert torch.equal(got.cpu(), full[:k]), k
        assert torch.equal(b.shuffle(got, 4242).cpu(), ref.shuffle(full[:k], 4242)), k
