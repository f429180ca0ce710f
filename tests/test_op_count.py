"""A loss call is one op forward and one backward, judged by what it dispatches
(torch.profiler): ``sampler.loss(...).backward()`` and ``sampler.observe(...).backward()``
dispatch at most 3 top-level aten/fastsel ops, strict or not, for every target form; bare
``F.cross_entropy(...).backward()`` dispatches 3 as well (the user's own ops, and the
leaf's gradient accumulation, are not counted)."""
import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel.backends import available
from fastsel.experiments.bench import top_level_ops

BACKENDS = [b for b in ("cpu", "reference") if b in available("cpu")]
def inputs(form, b=6, c=5):
    g = torch.Generator().manual_seed(0)
    shape = (b, c) if form != "kdim" else (b, c, 3, 2)
    x = torch.randn(shape, generator=g).requires_grad_()
    if form == "soft":
        return x, torch.softmax(torch.randn(shape, generator=g), 1)
    return x, torch.randint(0, c, (b,) + shape[2:], generator=g)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("form", ["hard", "soft", "kdim", "observe"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_call_dispatches_at_most_three_ops(backend, form, strict):
    s = fastsel.Sampler(60, budget=0.5, epochs=4, seed=0, backend=backend, strict=strict)
    for epoch in s.epochs():
        order = torch.tensor(list(s)).split(6)
        for k, idx in enumerate(order):
            x, y = inputs(form)
            if form == "observe":
                losses = torch.rand(6).requires_grad_()
                call = lambda: s.observe(losses, idx).backward()  # noqa: E731
            else:
                call = lambda: s.loss(x, y, idx).backward()  # noqa: E731
            if epoch == 2 and k == 3:
                names = top_level_ops(call)
                op = "observe" if form == "observe" else "ce_step"
                ours = [n for n in names if n.startswith("fastsel::")]
                assert ours == [f"fastsel::{op}_{'csrc' if backend == 'cpu' else 'reference'}"], names
                assert len(names) <= 3, names
            else:
                call()
    assert s.budget.trained == 4 * 30


def test_bare_cross_entropy_dispatches_three():
    x, y = inputs("hard")
    names = top_level_ops(lambda: F.cross_entropy(x, y).backward())
    assert names[0] == "aten::cross_entropy_loss" and len(names) >= 3, names
