"""SelectiveStep: batch-level selection (Selective Backprop, OSGD, SIFT).

Statistical tests use fixed seeds and tolerances of 4 standard deviations of the
binomial counts they compare, so a correct implementation fails them with probability
well under 1e-4 — and, the seeds being fixed, never in practice.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.batch_policies import KAWAGUCHI_SCHEDULE, OrderedSGD, SelectiveBackprop, batch_topk, spearman
from fastsel.selective import SelectiveStep

C = 5


def mlp(seed=0, d=16, c=C):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, c))


def data(n=256, d=16, c=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def subset_grads(model, x, y):
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return grads(m)


def assert_grads_equal(a, b):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


# ---- in-batch top-k and rank correlation -------------------------------------------------------

def test_batch_topk_breaks_ties_by_lower_position_and_ranks_nan_last():
    v = torch.tensor([1.0, 3.0, float("nan"), 3.0, 2.0, 3.0])
    assert batch_topk(v, 2).tolist() == [1, 3]
    assert batch_topk(v, 4).tolist() == [1, 3, 5, 4]
    assert batch_topk(v, 6).tolist()[-1] == 2


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (200,), generator=g).float()
    b = a + torch.randn(200, generator=g) * 2
    assert math.isclose(spearman(a, b), stats.spearmanr(a.numpy(), b.numpy())[0], rel_tol=1e-9)


# ---- Selective Backprop: the formula -----------------------------------------------------------

@pytest.mark.parametrize("b", [0.5, 1.0, 3.0])
def test_sb_probability_is_history_cdf_to_the_b(b):
    pol = SelectiveBackprop(b=b, history=100)
    g = torch.Generator().manual_seed(2)
    hist = torch.rand(100, generator=g)
    pol.history.push(hist)
    q = torch.cat([torch.rand(50, generator=g), hist[:10], torch.tensor([-1.0, 2.0])])
    expect = ((hist.numpy()[None, :] <= q.numpy()[:, None]).mean(1)) ** b
    np.testing.assert_allclose(pol.probability(q).numpy(), expect, rtol=1e-6)


def _sb_reference_probabilities(stream, batch, r, b):
    """Numpy: each loss's keep probability with the history = the last R losses up to and
    including its batch."""
    out = []
    for s in range(0, len(stream), batch):
        end = s + batch
        hist = stream[max(0, end - r):end]
        cur = stream[s:end]
        out.append(((hist[None, :] <= cur[:, None]).mean(1)) ** b)
    return np.concatenate(out)


@pytest.mark.parametrize("keep,b", [(0.5, None), (None, 2.0), (0.25, None)])
def test_sb_keep_frequencies_match_cdf_power(keep, b):
    pol = SelectiveBackprop(keep=keep, b=b, history=500)
    pol.key = 12345
    batch, n_batches = 100, 300
    g = torch.Generator().manual_seed(7)
    # Losses drift slowly so the history matters; the reference follows the same stream.
    stream = (torch.rand(batch * n_batches, generator=g) + torch.linspace(0, 1, batch * n_batches)).numpy()
    kept = np.concatenate([pol.decide(torch.from_numpy(stream[s:s + batch])).numpy()
                           for s in range(0, len(stream), batch)])
    p = _sb_reference_probabilities(stream, batch, 500, pol.b)
    # Total count against the expectation: 4 standard deviations of a Poisson-binomial.
    k, e, sd = kept.sum(), p.sum(), math.sqrt((p * (1 - p)).sum())
    assert abs(k - e) < 4 * sd, (k, e, sd)
    # Per probability decile, too.
    edges = np.quantile(p, np.linspace(0, 1, 11))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & (p <= hi)
        k, e, sd = kept[m].sum(), p[m].sum(), math.sqrt((p[m] * (1 - p[m])).sum()) + 1e-9
        assert abs(k - e) < 4 * sd + 1, (lo, hi, k, e, sd)
    # On this near-stationary stream the kept share is close to 1 / (b + 1).
    assert abs(kept.mean() - 1 / (pol.b + 1)) < 0.03


def test_sb_keep_and_b_are_the_same_knob():
    assert SelectiveBackprop(keep=0.25).b == pytest.approx(3.0)
    assert SelectiveBackprop(b=1.0).keep == pytest.approx(0.5)
    assert SelectiveBackprop(keep=1.0).b == 0.0


def test_sb_decisions_follow_the_seed():
    def run(seed):
        model = mlp()
        s = SelectiveStep(model, "sb", keep=0.5, seed=seed)
        x, y = data()
        out = []
        for i in range(0, 256, 32):
            s.step(x[i:i + 32], y[i:i + 32], torch.arange(i, i + 32))
            out.append(s.last["chosen"].tolist())
        return out
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c


# ---- Selective Backprop: the backward batches ------------------------------------------------

def test_sb_backward_batch_size_stays_constant_and_every_kept_sample_trains_once():
    model = mlp()
    s = SelectiveStep(model, "sb", keep=0.5, batch_size=16, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = data(n=500)
    sizes, kept, trained = [], [], []
    start = 0
    for bsz in [32, 17, 32, 5, 64, 32, 1, 32, 48, 32, 40, 32, 33, 2]:
        idx = torch.arange(start, start + bsz)
        s.step(x[idx], y[idx], idx)
        kept += idx[s.last["chosen"]].tolist()
        for ib in s.last["trained_indices"]:
            sizes.append(int(ib.numel()))
            trained += ib.tolist()
        assert s.pending < 16
        start += bsz
    assert sizes and set(sizes) == {16}
    s.flush()
    assert s.pending == 0
    sm = s.summary()
    assert sm["backward_passes"] == len(kept)
    assert sm["selection_forward"] == start
    assert sm["backward_batches"] == len(sizes) + (1 if len(kept) % 16 else 0)
    # The pool is first in, first out: the trained order is the kept order.
    assert trained == kept[:len(trained)]


def test_sb_leftovers_carry_over_by_default_and_flush_on_request():
    x, y = data(n=64)
    for leftover in ("carry", "flush"):
        model = mlp()
        s = SelectiveStep(model, "sb", keep=1.0, batch_size=24, leftover=leftover)
        s.step(x[:40], y[:40], torch.arange(40))   # 40 kept: one batch of 24, 16 pending
        assert s.pending == 16
        s.end_epoch()
        assert s.pending == (16 if leftover == "carry" else 0)
        assert s.summary()["backward_batches"] == (1 if leftover == "carry" else 2)


# ---- the gradient is the gradient of the selected subset -------------------------------------

@pytest.mark.parametrize("policy,kw", [("sb", {"keep": 0.5, "batch_size": 20}), ("osgd", {"keep": 0.25}),
                                       ("sift", {"module": "2", "keep": 0.5})])
def test_gradient_equals_training_on_the_selected_subset(policy, kw):
    x, y = data(n=64)
    model = mlp()
    s = SelectiveStep(model, policy, **kw)
    for i in range(0, 64, 32):
        before = copy.deepcopy(model)
        model.zero_grad(set_to_none=True)
        idx = torch.arange(i, i + 32)
        loss = s.step(x[idx], y[idx], idx)
        if policy == "sb":
            if loss is None:
                continue
            (ib,) = s.last["trained_indices"]
            sub = ib
        else:
            sub = idx[s.last["chosen"]]
        expect = subset_grads(before, x[sub], y[sub])
        assert_grads_equal(grads(model), expect)
        torch.testing.assert_close(loss, F.cross_entropy(before(x[sub]), y[sub]).detach())


def test_osgd_backprops_exactly_the_top_q_losses():
    x, y = data(n=64)
    model = mlp()
    s = SelectiveStep(model, "osgd", keep=0.25)
    with torch.no_grad():
        losses = F.cross_entropy(model(x[:32]), y[:32], reduction="none")
    s.step(x[:32], y[:32])
    assert s.last["chosen"].tolist() == sorted(torch.topk(losses, 8).indices.tolist())


# ---- OSGD's schedule ----------------------------------------------------------------------------

def test_osgd_q_follows_the_kawaguchi_schedule_and_never_grows_back():
    pol = OrderedSGD()
    assert pol.schedule == KAWAGUCHI_SCHEDULE
    seq = [(None, 64), (0.5, 64), (0.80, 32), (0.7, 32), (0.9, 16), (0.95, 8), (0.2, 8), (0.995, 4), (1.0, 4)]
    for acc, q in seq:
        pol.end_epoch(None, acc)
        assert pol.q(64) == q, (acc, q)
    assert pol.q(50) == 3 and pol.q(8) == 1 and pol.q(1) == 1   # round(50/16) = 3, at least 1
    fixed = OrderedSGD(keep=0.3, schedule=None)
    fixed.end_epoch(None, 1.0)
    assert fixed.q(64) == 19


def _labels_with_accuracy(model, x, acc):
    """Labels the frozen model gets right on exactly round(acc * n) rows."""
    with torch.no_grad():
        pred = model(x).argmax(1)
    n_right = round(acc * len(x))
    y = (pred + 1) % C
    y[:n_right] = pred[:n_right]
    return y


def test_osgd_keeps_exactly_q_per_batch_as_training_accuracy_grows():
    x, _ = data(n=128)
    model = mlp()
    s = SelectiveStep(model, "osgd")   # no optimizer: the model stays frozen
    expected_q = []
    got_q = []
    for acc, q_next in [(0.85, 16), (0.5, 16), (1.0, 2)]:
        y = _labels_with_accuracy(model, x, acc)
        for i in range(0, 128, 32):
            s.step(x[i:i + 32], y[i:i + 32])
            got_q.append(int(s.last["chosen"].numel()))
        s.end_epoch()
        assert s.last_accuracy == pytest.approx(round(acc * 128) / 128)
        expected_q.append(q_next)
    # Epoch 0 at full share (32 of 32), then 16 (acc 85%), 16 (q never grows), then 2 (acc 100%).
    assert got_q == [32] * 4 + [16] * 4 + [16] * 4
    assert s.policy.q(32) == 2


# ---- SIFT ---------------------------------------------------------------------------------------

def conv_bn_relu(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class SmallCNN(nn.Module):
    """A small ResNet-like CNN for 8x8 digits: its head is global-average-pool + linear."""

    def __init__(self, w=16):
        super().__init__()
        self.stem = conv_bn_relu(1, w)
        self.block1 = conv_bn_relu(w, w)
        self.block2 = nn.Sequential(conv_bn_relu(w, 2 * w), nn.MaxPool2d(2), conv_bn_relu(2 * w, 2 * w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def digits():
    ds = pytest.importorskip("sklearn.datasets")
    d = ds.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def test_sift_approximate_losses_rank_like_the_true_ones_on_digits():
    x, y = digits()
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = SelectiveStep(model, "sift", module="block2.1", keep=0.5, optimizer=opt, exit_lr=1e-2,
                      probe_every=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            s.step(x[b], y[b], b)
            assert s.last["chosen"].numel() == max(1, int(0.5 * len(b) + 0.5))
        s.end_epoch()
    # Measured as SIFT uses the exit: per batch of 64, model in training mode, the exit's
    # losses against a forward pass of the same batch (about 0.7-0.8 over seeds 0-3).
    rhos = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            xb, yb = x[i:i + 64], y[i:i + 64]
            approx = s.policy.approximate(s, xb, yb, update=False)
            rhos.append(spearman(approx, F.cross_entropy(model(xb), yb, reduction="none")))
    rho = sum(rhos) / len(rhos)
    assert rho > 0.5, rho
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.8, acc        # training on the selected half still learns the digits
    sm = s.summary()
    # The probes measure the same during training; the last ones are as good.
    assert sm["probes"] == sm["steps"] // 5 and sm["rank_correlation"] > 0.5
    assert 0.0 < sm["exit_time_share"] < 1.0
    # Forward passes: one full forward on the first batch (sizing the exit head), the
    # exit forward on every other row, the full forward only on the kept half (plus the
    # probes' forward on the rows left out).
    assert sm["selection_forward"] == 64
    assert sm["exit_forward"] == sm["samples_in"] - 64
    assert sm["train_forward"] == sm["backward_passes"]
    assert sm["probe_forward"] == 64 * sm["probes"]
    assert abs(sm["kept_share"] - 0.5) < 0.01


def test_sift_keeps_the_top_share_by_approximate_loss():
    x, y = digits()
    torch.manual_seed(0)
    model = SmallCNN()
    s = SelectiveStep(model, "sift", module="stem", keep=0.25, num_classes=10)
    for i in range(0, 192, 64):
        xb, yb = x[i:i + 64], y[i:i + 64]
        if s.policy.head is not None:
            approx = s.policy.approximate(s, xb, yb, update=False)
            s.step(xb, yb)
            assert s.last["chosen"].tolist() == sorted(batch_topk(approx, 16).tolist())
        else:
            s.step(xb, yb)
    # num_classes given: no full selection forward at all; the exit stops the forward early.
    assert s.summary()["selection_forward"] == 0


def test_sift_stops_the_selection_forward_at_the_exit():
    x, y = digits()
    model = SmallCNN()
    calls = []
    model.head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    s = SelectiveStep(model, "sift", module="stem", num_classes=10)
    s.step(x[:32], y[:32])
    assert calls == [16]   # only the training forward of the kept half reached the head


# ---- with an epoch-level Sampler ----------------------------------------------------------------

def _with_sampler(policy, **kw):
    """(sampler, loader, optimizer, BudgetLR, step): 200 samples, budget 0.5, 3 epochs."""
    x, y = data(n=200)
    train = fastsel.with_indices(TensorDataset(x, y))
    sampler = fastsel.Sampler(train, policy="uniform", budget=0.5, epochs=3, seed=0)
    loader = DataLoader(train, batch_size=20, sampler=sampler)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = fastsel.BudgetLR(opt, sampler)
    return sampler, loader, opt, sched, SelectiveStep(model, policy, optimizer=opt, scheduler=sched,
                                                      sampler=sampler, **kw)

@pytest.mark.parametrize("policy,kw", [("sb", {"keep": 0.5}), ("osgd", {}), ("sift", {"module": "1"})])
def test_selective_step_with_a_sampler_observes_each_sample_once(policy, kw):
    sampler, loader, opt, sched, s = _with_sampler(policy, **kw)
    epochs = 0
    for _ in sampler.epochs():
        for xb, yb, idx in loader:
            s.step(xb, yb, idx)
        assert sampler.position == 100   # every yielded sample went through loss() once
        epochs += 1
    s.flush()
    s.end_epoch()
    st = sampler.state
    assert torch.equal(st.seen, st.selected)   # one observation per selection, not two
    sm = s.summary()
    assert sm["samples_in"] == 300
    assert s.counts["epochs_ended"] == 3
    assert sm["backward_passes"] <= 300
    assert sm["optimizer_steps"] == sm["backward_batches"]
    assert sched.last_epoch == sm["optimizer_steps"]
    assert opt.param_groups[0]["lr"] < 0.01   # BudgetLR reached (almost) 0 at the budget's end


def test_stale_sb_with_a_sampler_counts_stale_batches_as_consumed():
    """StaleSB's stale epochs skip the selection forward: the sampler counts their batches
    as consumed (position, budget progress, the LR schedule) without observing them."""
    sampler, loader, opt, sched, s = _with_sampler("sb", keep=0.5, stale=2)
    observed = []
    for epoch in sampler.epochs():
        seen = sampler.state.seen.clone()
        for xb, yb, idx in loader:
            s.step(xb, yb, idx)
        assert sampler.position == 100
        observed.append(int((sampler.state.seen - seen).sum()))
    assert observed == [100, 0, 100]   # epoch 1 is stale: consumed, not observed
    assert s.summary()["stale_batches"] == 5
    assert sampler.progress() == 1.0
    assert opt.param_groups[0]["lr"] < 0.01
    with pytest.raises(ValueError, match="1-D"):
        sampler.skip(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64 or int32"):
        sampler.skip(torch.zeros(2))


def test_backward_batch_uses_the_samplers_policy_weights():
    x, y = data(n=40)
    sampler = fastsel.Sampler(40, policy="uniform", budget=1.0, epochs=1)
    model = mlp()
    s = SelectiveStep(model, "osgd", keep=0.5, sampler=sampler)
    iter(sampler)   # the epoch's selection pass sets the weights; then override them
    sampler.state.weight.copy_(torch.linspace(0.5, 2.0, 40))   # e.g. InfoBatch's rescale
    idx = torch.arange(20)
    before = copy.deepcopy(model)
    loss = s.step(x[idx], y[idx], idx)
    sub = idx[s.last["chosen"]]
    w = sampler.state.weight[sub]
    m = copy.deepcopy(before)
    expect = (w * F.cross_entropy(m(x[sub]), y[sub], reduction="none")).mean()
    torch.testing.assert_close(loss, expect.detach())
    expect.backward()
    assert_grads_equal(grads(model), grads(m))
    assert int(sampler.state.seen.sum()) == 20


# ---- AMP, accumulation, scheduler ----------------------------------------------------------------

@pytest.mark.parametrize("with_sampler", [False, True])
@pytest.mark.parametrize("policy,kw", [("sb", {}), ("osgd", {"keep": 0.5}), ("sift", {"module": "1"})])
def test_amp_bf16_on_cpu_runs(policy, kw, with_sampler):
    x, y = data(n=128)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    sampler = fastsel.Sampler(128, budget=1.0, epochs=1) if with_sampler else None
    if sampler is not None:
        iter(sampler)   # rows count towards an epoch being iterated
    s = SelectiveStep(model, policy, optimizer=opt, scaler=scaler, autocast=torch.bfloat16,
                      sampler=sampler, **kw)
    w0 = model[1].weight.detach().clone()
    losses = [s.step(x[i:i + 32], y[i:i + 32], torch.arange(i, i + 32)) for i in range(0, 128, 32)]
    s.flush()
    assert all(torch.isfinite(l) for l in losses if l is not None)
    assert s.summary()["optimizer_steps"] >= 1
    assert not torch.equal(w0, model[1].weight)
    assert model[1].weight.dtype == torch.float32


def test_gradient_accumulation_steps_once_per_accumulate_backward_batches():
    x, y = data(n=128)
    model = mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    s = SelectiveStep(model, "osgd", keep=0.5, optimizer=opt, scheduler=sched, accumulate=2)
    subsets = []
    for i in range(0, 128, 32):
        idx = torch.arange(i, i + 32)
        s.step(x[idx], y[idx], idx)
        subsets.append(idx[s.last["chosen"]])
    assert s.summary()["optimizer_steps"] == 2 and sched.last_epoch == 2
    # The same two steps by hand: each the mean of two micro-batch means.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for a, b in ((0, 1), (2, 3)):
        ref_opt.zero_grad()
        for sub in (subsets[a], subsets[b]):
            (F.cross_entropy(ref(x[sub]), y[sub]) / 2).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- StaleSB ---------------------------------------------------------------------------------------

def test_stale_sb_skips_the_selection_forward_in_stale_epochs():
    x, y = data(n=96)
    model = mlp()
    # share="expected": SB's per-row coin, which keeps every never-seen sample (the exact
    # share keeps them first within its quota: tests/test_sb_schedule.py).
    s = SelectiveStep(model, "sb", keep=0.5, stale=2, num_samples=96, share="expected",
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for i in range(0, 64, 16):                       # epoch 0: fresh, samples 0..63
        s.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
    fwd0 = s.summary()["selection_forward"]
    assert fwd0 == 64
    s.end_epoch()                                     # epoch 1: stale
    for i in range(0, 96, 16):
        s.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
        if i >= 64:                                   # never-seen samples are always kept
            assert s.last["chosen"].numel() == 16
    sm = s.summary()
    assert sm["selection_forward"] == fwd0 and sm["stale_batches"] == 6
    s.end_epoch()                                     # epoch 2: fresh again
    s.step(x[:16], y[:16], torch.arange(16))
    assert s.summary()["selection_forward"] == fwd0 + 16


# ---- checkpoints ----------------------------------------------------------------------------------

def test_state_dict_restores_history_and_schedule():
    x, y = data(n=64)
    s = SelectiveStep(mlp(), "sb", keep=0.5)
    s.step(x[:32], y[:32])
    t = SelectiveStep(mlp(), "sb", keep=0.5)
    sift = SelectiveStep(mlp(), "sift", module="1")
    sift.step(x[:32], y[:32])
    sift2 = SelectiveStep(mlp(), "sift", module="1")
    sift2.load_state_dict(sift.state_dict())
    torch.testing.assert_close(sift2.policy.approximate(sift2, x, y, update=False),
                               sift.policy.approximate(sift, x, y, update=False))
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.policy.history.buf, s.policy.history.buf) and t.policy.draws == s.policy.draws
    o = SelectiveStep(mlp(), "osgd")
    o.policy.end_epoch(o, 0.93)
    p = SelectiveStep(mlp(), "osgd")
    p.load_state_dict(o.state_dict())
    assert p.policy.q(64) == 16
    with pytest.raises(ValueError, match="policy"):
        SelectiveStep(mlp(), "sb", keep=0.25).load_state_dict(s.state_dict())


def test_resume_with_pending_rows_continues_exactly():
    """SB's pending rows travel in state_dict: a run resumed from a checkpoint taken with
    rows pending trains the same batches and reaches the same weights."""
    x, y = data(n=320)
    idx = torch.arange(320)

    def make():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, SelectiveStep(model, "sb", keep=0.4, optimizer=opt, seed=3)

    def run(step, t0, t1):
        out = []
        for t in range(t0, t1):
            sl = slice(16 * t, 16 * (t + 1))
            step(x[sl], y[sl], idx[sl])
            out.append([None if i is None else i.tolist() for i in step.last["trained_indices"]])
        return out

    model, opt, step = make()
    run(step, 0, 7)
    while step.pending == 0:  # checkpoint with rows pending
        run(step, 7, 8)
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "step": step.state_dict()}
    pending = step.pending
    rest = run(step, 8, 20)

    model2, opt2, step2 = make()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    step2.load_state_dict(ckpt["step"])
    assert step2.pending == pending > 0
    assert run(step2, 8, 20) == rest
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_pending_rows_are_refused_and_nothing_changes():
    x, y = data(n=64)
    s = SelectiveStep(mlp(), "sb", keep=0.5, seed=1)
    for t in range(3):                  # 3 x 8 rows kept: one batch of 16 trained, 8 pending
        s.step(x[16 * t:16 * (t + 1)], y[16 * t:16 * (t + 1)])
    sd = s.state_dict()
    assert sd["pending"] is not None
    sd["pending"]["y"] = sd["pending"]["y"][:-1]
    t = SelectiveStep(mlp(), "sb", keep=0.5, seed=1)
    before = t.state_dict()
    with pytest.raises(ValueError, match="pending rows disagree"):
        t.load_state_dict(sd)
    after = t.state_dict()
    assert after["pending"] is None and after["policy"]["draws"] == before["policy"]["draws"]


# ---- bad arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.5, float("nan"), True, "half"])
@pytest.mark.parametrize("policy", ["sb", "osgd", "sift"])
def test_keep_outside_0_1_is_refused(policy, keep):
    kw = {"module": "1"} if policy == "sift" else {}
    with pytest.raises(ValueError, match="keep"):
        SelectiveStep(mlp(), policy, keep=keep, **kw)


def test_unknown_module_lists_valid_names():
    with pytest.raises(ValueError, match=r"'blocks\.9'.*valid names include '0', '1', '2'"):
        SelectiveStep(mlp(), "sift", module="blocks.9")
    with pytest.raises(ValueError, match="module="):
        SelectiveStep(mlp(), "sift")


def test_a_module_the_forward_never_calls_is_a_clear_error():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = mlp(), nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    s = SelectiveStep(WithUnused(), "sift", module="unused")
    x, y = data(n=8)
    with pytest.raises(RuntimeError, match="did not run"):
        s.step(x, y)


@pytest.mark.parametrize("kw,match", [
    ({"policy": "nope"}, "policy must be one of"),
    ({"policy": "sb", "b": -1.0}, "b must be"),
    ({"policy": "sb", "b": float("nan")}, "b must be"),
    ({"policy": "sb", "b": "2"}, "b must be"),
    ({"policy": "sb", "b": 1.0, "keep": 0.5}, "not both"),
    ({"policy": "sb", "history": 0}, "history"),
    ({"policy": "sb", "history": 2.5}, "history"),
    ({"policy": "sb", "stale": 0}, "stale"),
    ({"policy": "sb", "stale": 2}, "num_samples"),
    ({"policy": "sb", "leftover": "drop"}, "leftover"),
    ({"policy": "osgd", "schedule": "fast"}, "schedule"),
    ({"policy": "osgd", "schedule": [(0.9, 2.0)]}, "schedule"),
    ({"policy": "sb", "accumulate": 0}, "accumulate"),
    ({"policy": "sb", "scheduler": object()}, "need optimizer"),
    ({"policy": "sb", "autocast": torch.float64}, "autocast"),
])
def test_bad_arguments_give_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectiveStep(mlp(), **kw)


def test_parameters_of_another_policy_are_refused():
    with pytest.raises(TypeError, match="'osgd'"):
        SelectiveStep(mlp(), "osgd", b=2.0)


def test_missing_indices_with_a_sampler_are_refused():
    sampler = fastsel.Sampler(50, budget=1.0, epochs=1)
    s = SelectiveStep(mlp(), "sb", sampler=sampler)
    x, y = data(n=8)
    with pytest.raises(ValueError, match="idx"):
        s.step(x, y)


def test_custom_loss_fn_and_policy_instances():
    x, y = data(n=32)
    model = mlp()
    before = copy.deepcopy(model)
    s = SelectiveStep(model, OrderedSGD(keep=0.5, schedule=None),
                      loss_fn=lambda logits, t: 2 * F.cross_entropy(logits, t, reduction="none"))
    s.step(x, y)
    sub = s.last["chosen"]
    expect = [2 * g for g in subset_grads(before, x[sub], y[sub])]
    assert_grads_equal(grads(model), expect)
    with pytest.raises(ValueError, match="keep= given with a BatchPolicy"):
        SelectiveStep(mlp(), SelectiveBackprop(b=2.0), keep=0.5)
    with pytest.raises(ValueError, match="loss_fn must return per-sample losses"):
        SelectiveStep(mlp(), "osgd", loss_fn=lambda a, b: a).step(x, y)


# The README section proposed for SelectiveStep (docs/report); kept runnable here until
# fastsel exports SelectiveStep and the README carries it.
README_EXAMPLE = '''
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fastsel

g = torch.Generator().manual_seed(0)
x, y = torch.randn(600, 1, 8, 8, generator=g), torch.randint(0, 10, (600,), generator=g)
train = fastsel.with_indices(TensorDataset(x, y))
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

sampler = fastsel.Sampler(train, policy="uniform", budget=0.5, epochs=4, seed=0)   # optional
loader = DataLoader(train, batch_size=64, sampler=sampler)
sched = fastsel.BudgetLR(opt, sampler)
step = fastsel.SelectiveStep(model, "sb", keep=0.5, optimizer=opt, scheduler=sched,
                             sampler=sampler)
# or fastsel.SelectiveStep(model, "osgd", optimizer=opt, ...)
# or fastsel.SelectiveStep(model, "sift", module="2", keep=0.5, optimizer=opt, ...)

for epoch in sampler.epochs():
    for xb, yb, idx in loader:
        loss = step(xb, yb, idx)      # None while SB is still filling a backward batch
step.flush()                          # train SB's last pending samples
print(step.summary())                 # forward and backward passes, kept share, times
'''


def test_readme_section_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(fastsel, "SelectiveStep", SelectiveStep, raising=False)
    scope = {}
    exec(compile(README_EXAMPLE, "README-selective", "exec"), scope)
    sm = scope["step"].summary()
    assert sm["samples_in"] == sm["selection_forward"] == 4 * 300
    assert abs(sm["kept_share"] - 0.5) < 0.1 and sm["pending"] == 0
    assert "backward_passes" in capsys.readouterr().out
