"""Sampler.observe: any per-sample loss into the per-sample state, and Sampler.loss over
every target F.cross_entropy takes, as a user calls them."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsel
from fastsel import SelectiveStep
from helpers import snapshot


def started(n=50, backend="auto", **kw):
    s = fastsel.Sampler(n, policy="uniform", budget=1.0, epochs=3, seed=0, backend=backend, **kw)
    return s, list(iter(s))


def same(a, b, exact=True):
    """Two snapshots of a Sampler: the same position, counters and per-sample state."""
    (sa, *ca), (sb, *cb) = a, b
    assert ca == cb
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            if exact or not sa[k].is_floating_point():
                assert torch.equal(sa[k], sb[k]), k
            else:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_observe_of_cross_entropy_equals_loss(backend):
    """The documented equivalence, through the public API and over several batches: bit for
    bit where both sides compute the loss with the same log-softmax (reference), and within
    fp32 rounding of the loss values where the fused kernel computes its own (cpu)."""
    torch.manual_seed(0)
    s1, order = started(backend=backend)
    s2, _ = started(backend=backend)
    for b in range(0, 48, 16):
        idx = torch.tensor(order[b:b + 16])
        x = torch.randn(16, 7)
        y = torch.randint(0, 7, (16,))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        l1 = s1.loss(x1, y, idx)
        l2 = s2.observe(F.cross_entropy(x2, y, reduction="none"), idx)
        torch.testing.assert_close(l1, l2)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(x1.grad, x2.grad)
    same(snapshot(s1), snapshot(s2), exact=backend == "reference")
    assert s1.position == 48


def test_observe_refuses_bad_input_and_changes_nothing():
    s, order = started()
    idx = torch.tensor(order[:4])
    s.observe(torch.rand(4), idx)
    before = snapshot(s)
    cases = [
        (lambda: s.observe(torch.rand(4, 2), idx), ValueError, "losses must be 1-D"),
        (lambda: s.observe(torch.rand(3), idx), ValueError, "indices has 4 entries"),
        (lambda: s.observe(torch.arange(4), idx), TypeError, "losses must be a floating dtype"),
        (lambda: s.observe([1.0, 2.0], idx), TypeError, "losses must be a torch.Tensor"),
        (lambda: s.observe(torch.rand(4), idx.float()), TypeError, "indices must be int64 or int32"),
        (lambda: s.observe(torch.rand(4), torch.tensor([0, 1, 2, 50])), IndexError, "outside \\[0, 50\\)"),
        (lambda: s.observe(torch.rand(4), idx, p_true=torch.rand(3)), ValueError, "p_true must be"),
        (lambda: s.observe(torch.rand(4), idx, reduction="avg"), ValueError, "reduction must be"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        same(before, snapshot(s))


def test_observe_update_false_and_gradient_into_losses():
    s, order = started()
    idx = torch.tensor(order[:6])
    before = snapshot(s)
    losses = torch.rand(6, requires_grad=True)
    out = s.observe(losses, idx, update=False)
    same(before, snapshot(s))
    out.backward()
    torch.testing.assert_close(losses.grad, torch.full((6,), 1 / 6))
    none = s.observe(losses.detach(), idx, reduction="none")
    assert none.shape == (6,) and s.position == 6


def test_observe_focal_loss_in_a_training_loop():
    """A focal loss (not cross-entropy) drives a loss-based policy through observe()."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = fastsel.Sampler(200, policy="tftb", budget=0.5, epochs=4, seed=0)
    for _ in s.epochs():
        order = list(iter(s))
        for b in range(0, len(order), 25):
            idx = torch.tensor(order[b:b + 25])
            logits = model(x[idx])
            ce = F.cross_entropy(logits, y[idx], reduction="none")
            pt = torch.exp(-ce)
            loss = s.observe((1 - pt) ** 2 * ce, idx, p_true=pt.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
    summ = s.summary()
    assert summ["passes"] == 400 and summ["epochs_run"] == 4
    assert int((s.state.seen > 0).sum()) > 150


def test_selective_step_with_loss_fn_and_sampler():
    """SelectiveStep(loss_fn=...) now works with a Sampler: rows reach it through observe()."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nn.Linear(6, 3)
    s = fastsel.Sampler(64, policy="uniform", budget=1.0, epochs=1, seed=0)
    step = SelectiveStep(model, "osgd", keep=0.5, schedule=None, sampler=s,
                         loss_fn=lambda logits, t: 2 * F.cross_entropy(logits, t, reduction="none"))
    order = list(iter(s))
    idx = torch.tensor(order[:16])
    step(x[idx], y[idx], idx)
    seen = s.state.seen[idx]
    assert bool((seen == 1).all())
    expect = 2 * F.cross_entropy(model(x[idx]).detach(), y[idx], reduction="none")
    # OSGD trained the chosen rows once after observing: the state holds the pre-step losses.
    assert s.state.loss[idx].shape == expect.shape


SEG_SHAPES = [((3, 5, 4, 6), (3, 4, 6)), ((2, 4, 7), (2, 7))]


@pytest.mark.parametrize("logits_shape,target_shape", SEG_SHAPES)
def test_sampler_loss_kdim_and_soft_targets(logits_shape, target_shape):
    s, order = started(n=20)
    idx = torch.tensor(order[:logits_shape[0]])
    x = torch.randn(logits_shape, requires_grad=True)
    y = torch.randint(0, logits_shape[1], target_shape)
    y.view(-1)[::3] = -100
    out = s.loss(x, y, idx)
    torch.testing.assert_close(out, F.cross_entropy(x, y))
    soft = torch.softmax(torch.randn(logits_shape), 1)
    out = s.loss(x, soft, idx, reduction="none")
    torch.testing.assert_close(out, F.cross_entropy(x, soft, reduction="none"))
    assert s.position == 2 * logits_shape[0]
    with pytest.raises(ValueError, match="target of class indices must have shape"):
        s.loss(x, y[:, :1], idx)
    with pytest.raises(ValueError, match="class probabilities"):
        s.loss(x, soft[:, :1], idx)
    assert s.position == 2 * logits_shape[0]
