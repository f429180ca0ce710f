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
from fastsel.state import SampleState

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in available("cpu")]


def step_args(logits, target, idx, n=12, reduction=0, need_grad=True, update=True, **kw):
    cw = kw.get("class_weight")
    return (logits, target, idx, *state_args(SampleState(n)), cw, -100, kw.get("eps", 0.0), 0.3,
            reduction, False, 1, update, need_grad)


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
    return [step_args(x2, y2, idx), step_args(x2, y2, idx, reduction=2, class_weight=w, eps=0.1),
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
        torch.library.opcheck(ops.get("observe", impl),
                              (losses, probs, idx, *state_args(SampleState(10)), 0.3, red, False, 0, True))
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
