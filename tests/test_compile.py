"""The op family under torch.library's opcheck, and a compiled training step
(``torch.compile(..., fullgraph=True)``) through ``Sampler.loss`` / ``Sampler.observe``:
the same loss, gradients and per-sample state as eager, and strict errors still raised."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsel
from fastsel import ops
from fastsel.backends import available
from fastsel.backends.base import state_args
from fastsel.rows import EpochRows
from fastsel.state import SampleState

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in available("cpu")]


def step_args(logits, target, idx, n=12, reduction=0, need_grad=True, update=True, rows=None, **kw):
    cw = kw.get("class_weight")
    return (logits, target, idx, *state_args(SampleState(n), 1, rows), cw, -100, kw.get("eps", 0.0), 0.3,
            reduction, False, update, need_grad)


def open_rows(n, selection, shard_len, position=0, epoch=1):
    r = EpochRows(n)
    r.open(torch.tensor(selection), epoch, shard_len, position)
    return r


def step_cases():
    g = torch.Generator().manual_seed(0)
    x2 = torch.randn(7, 5, generator=g, requires_grad=True)
    y2 = torch.randint(0, 5, (7,), generator=g)
    y2[1] = -100
    idx = torch.tensor([0, 3, 3, 11, 5, 6, 2])
    xk = torch.randn(3, 4, 2, 3, generator=g, requires_grad=True)
    yk = torch.randint(0, 4, (3, 2, 3), generator=g)
    yk[0, 1, 2] = -100
    soft = torch.softmax(torch.randn(3, 4, 2, 3, generator=g), 1)
    w = torch.rand(5, generator=g) + 0.5
    member = [0, 3, 11, 5, 2]   # 6 is a stray row
    return [step_args(x2, y2, idx), step_args(x2, y2, idx, reduction=2, class_weight=w, eps=0.1),
            step_args(x2, y2, idx, rows=open_rows(12, member, 20, 4)),
            step_args(x2, y2, idx, reduction=1, rows=open_rows(12, member, 9, 4)),  # no room: counted
            step_args(x2.detach(), y2, idx, need_grad=False, update=False),
            step_args(xk, yk, idx[:3], reduction=1), step_args(xk, soft, idx[:3], reduction=2)]


def impls():
    return ["reference"] + (["csrc"] if "cpu" in available("cpu") else [])


@pytest.mark.parametrize("impl", impls())
def test_opcheck_every_op(impl):
    for args in step_cases():
        torch.library.opcheck(ops.get("ce_step", impl), args)
    losses = torch.rand(6, requires_grad=True)
    idx = torch.tensor([1, 1, 4, 0, 9, 4])
    for red, probs in ((0, None), (2, torch.rand(6))):
        for rows in (None, open_rows(10, [1, 4, 0], 9)):
            torch.library.opcheck(ops.get("observe", impl),
                                  (losses, probs, idx, *state_args(SampleState(10), 0, rows), 0.3, red,
                                   False, True))
    keys = torch.tensor([0.5, float("nan"), 2.0, 2.0, float("-inf"), 1.0, float("inf")])
    torch.library.opcheck(ops.get("select", impl), (keys, 4))
    torch.library.opcheck(ops.get("uniform", impl), (torch.arange(9), 1234, 2))
    torch.library.opcheck(ops.get("shuffle", impl), (torch.tensor([5, 2, 9, 0]), 77))


def run(backend, compiled, observe=False, steps=2):
    """A few training steps through the sampler; returns what must match eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    s = fastsel.Sampler(64, policy="uniform", budget=1.0, epochs=1, seed=0, backend=backend, strict=True)
    order = list(iter(s))
    if observe:
        def f(x, y, i):
            return s.observe(F.cross_entropy(model(x), y, reduction="none"), i)
    else:
        def f(x, y, i):
            return s.loss(model(x), y, i)
    if compiled:
        f = torch.compile(f, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    losses = []
    for k in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        idx = torch.tensor(order[8 * k:8 * k + 8])
        idx[3] = idx[2]  # a duplicate
        loss = f(x, y, idx)
        loss.backward()
        losses.append(loss.detach())
    grads = [p.grad.clone() for p in model.parameters()]
    return s, f, losses, grads


def check_same(a, b):
    sa, _, la, ga = a
    sb, _, lb, gb = b
    for u, v in zip(la + ga, lb + gb):
        torch.testing.assert_close(u, v)
    for field in ("loss", "loss_var", "p_true", "seen", "last_epoch"):
        torch.testing.assert_close(getattr(sa.state, field), getattr(sb.state, field))
    torch.testing.assert_close(sa.state.stats, sb.state.stats)
    assert sa.position == sb.position == 16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_loss_fullgraph_equals_eager_and_raises_strict_errors(backend):
    torch._dynamo.reset()
    eager, compiled = run(backend, False), run(backend, True)
    check_same(eager, compiled)
    s, f = compiled[0], compiled[1]
    before = s.state.seen.clone()
    bad = torch.tensor([0, 1, 2, 3, 4, 5, 6, 64])
    with pytest.raises(IndexError, match="indices: 1 sample index.*e.g. 64"):
        f(torch.randn(8, 6), torch.randint(0, 5, (8,)), bad)
    assert torch.equal(s.state.seen, before)


def test_compiled_observe_fullgraph_equals_eager():
    torch._dynamo.reset()
    check_same(run(CPU_BACKENDS[-1], False, observe=True), run(CPU_BACKENDS[-1], True, observe=True))


# ---- a compiled step as users run it: many steps over several epochs ------------------------

def train(backend, compiled, fullgraph=True, observe=False, epochs=3, steps=10, bsz=8):
    """``epochs`` x ``steps`` optimizer steps through ``sampler.epochs()``; returns the
    sampler, the per-step losses, the final parameters and the compile counter (or None)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    n = steps * bsz
    s = fastsel.Sampler(n, policy="uniform", budget=1.0, epochs=epochs, seed=0, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)

    def step(xb, yb, ib):
        if observe:
            return s.observe(F.cross_entropy(model(xb), yb, reduction="none"), ib)
        return s.loss(model(xb), yb, ib)

    counter = None
    if compiled:
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        step = torch.compile(step, fullgraph=fullgraph, backend=counter)
    losses, frames_after_first_epoch = [], None
    for e in s.epochs():
        order = torch.tensor(list(s))
        for ib in order.split(bsz):
            ib = ib.clone()
            ib[1] = ib[0]  # a duplicate row
            opt.zero_grad()
            loss = step(x[ib], y[ib], ib)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if e == 0 and counter is not None:
            frames_after_first_epoch = counter.frame_count
    params = [p.detach().clone() for p in model.parameters()]
    return s, losses, params, counter, frames_after_first_epoch


COMPILED_RUNS = [("reference", True, False)] + (
    [("cpu", True, False), ("cpu", False, True)] if "cpu" in CPU_BACKENDS else [("reference", False, True)])


@pytest.mark.parametrize("backend,fullgraph,observe", COMPILED_RUNS)
def test_a_compiled_step_compiles_once_across_epochs_and_matches_eager(backend, fullgraph, observe):
    torch._dynamo.reset()
    s, losses, params, counter, first = train(backend, True, fullgraph, observe)
    assert counter.frame_count == first == 1, "the step recompiled"
    e, e_losses, e_params, _, _ = train(backend, False, observe=observe)
    assert len(losses) == len(e_losses) == 30
    for a, b in zip(losses + params, e_losses + e_params):
        torch.testing.assert_close(a, b)
    for field in ("seen", "last_epoch", "selected"):
        assert torch.equal(getattr(s.state, field), getattr(e.state, field)), field
    for field in ("loss", "loss_var", "p_true"):   # inductor's model may round differently
        torch.testing.assert_close(getattr(s.state, field), getattr(e.state, field), rtol=1e-4, atol=1e-6)
    assert int(s.state.last_epoch.max()) == 2
    # The host's counts follow the device's: position, budget, progress, summary.
    assert s.position == e.position == 80
    assert s.budget.trained == e.budget.trained == 240 and s.progress() == e.progress() == 1.0
    assert s.budget.loss_calls == e.budget.loss_calls == 30
    assert s.summary()["passes"] == e.summary()["passes"] == 240
    torch.testing.assert_close(s.summary()["epoch_mean_losses"], e.summary()["epoch_mean_losses"])


def test_a_compiled_call_with_a_stray_row_masks_it_and_raises_at_the_next_pass():
    torch._dynamo.reset()
    s = fastsel.Sampler(40, budget=0.5, epochs=3, seed=0, backend="reference", strict=False)
    f = torch.compile(lambda x, y, i: s.loss(x, y, i), fullgraph=True)
    chosen = torch.tensor(list(s))
    stray = sorted(set(range(40)) - set(chosen.tolist()))[0]
    x = torch.randn(4, 3, requires_grad=True)
    idx = torch.cat([chosen[:3], torch.tensor([stray])])
    before = s.state.seen.clone()
    loss = f(x, torch.zeros(4, dtype=torch.long), idx)
    loss.backward()
    assert torch.equal(x.grad[3], torch.zeros(3))                 # left out of the loss
    assert int(s.state.seen[stray]) == int(before[stray]) == 0     # and of the state
    assert s.position == 4                                          # the call's rows counted
    with pytest.raises(ValueError, match=rf"1 row\(s\) given to the loss call in epoch 0 were samples "
                                         rf"it did not select, e.g. {stray}"):
        list(s)


def test_a_compiled_call_past_the_shard_is_counted_and_raised_at_the_next_pass():
    torch._dynamo.reset()
    s = fastsel.Sampler(40, budget=0.5, epochs=3, seed=0, backend="reference", strict=False)
    f = torch.compile(lambda x, y, i: s.loss(x, y, i), fullgraph=True)
    chosen = torch.tensor(list(s))                  # 20 rows
    x, y = torch.randn(12, 3), torch.zeros(12, dtype=torch.long)
    f(x, y, chosen[:12])
    sd = s.state_dict()                             # a mid-epoch checkpoint sees compiled rows,
    assert sd["position"] == 12                     # in the position and in the budget's counters
    assert (sd["counters"]["trained"], sd["counters"]["loss_calls"]) == (12, 1)
    before = s.state.seen.clone()
    f(x, y, chosen[8:20])                           # 12 more would take the epoch to 24 of 20
    assert torch.equal(s.state.seen, before) and s.position == 12
    with pytest.raises(ValueError, match=r"12 row\(s\) were given to the loss call when they would "
                                         r"have taken epoch 0 to 24 rows, past this rank's shard"):
        list(s)
