"""No host synchronisation per step: the reference implementation runs on ``meta`` tensors,
where any ``.item()``, ``bool()`` or device→host copy raises, with the epoch's rows checked
and counted on the device (``EpochRows``). (Strict mode syncs by design.)

The functions are called directly: through ``torch.ops`` a meta tensor would reach the fake
kernel instead."""
import pytest
import torch

from fastsel import layout
from fastsel.backends import reference
from fastsel.backends.base import state_args
from fastsel.rows import EpochRows
from fastsel.state import SampleState


def _rows(n):
    r = EpochRows(n, "meta")
    return state_args(SampleState(n, "meta"), r.epoch, r)


def _step(x, target, i, args, strict, reduction, w=None, update=True):
    return reference.ce_step(x, target, i, *args, w, -100, 0.1, 0.3,
                             layout.REDUCTIONS.index(reduction), strict, update, True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["hard-2d", "hard-kdim", "soft"])
def test_reference_step_and_observe_have_no_host_sync(reduction, weighted, form):
    st = _rows(100)
    shape = (8, 5) if form == "hard-2d" else (8, 5, 3, 2)
    x = torch.randn(shape, device="meta")
    if form == "soft":
        target = torch.rand(shape, device="meta")
    else:
        target = torch.zeros((8,) + shape[2:], dtype=torch.long, device="meta")
    i = torch.zeros(8, dtype=torch.long, device="meta")
    w = torch.ones(5, device="meta") if weighted else None
    out, grad, _ = _step(x, target, i, st, False, reduction, w)
    assert grad.shape == x.shape
    losses = torch.rand(8, device="meta")
    out, row_scale = reference.observe(losses, None, i, *st, 0.3,
                                       layout.REDUCTIONS.index(reduction), False, True)
    assert row_scale.shape == (8,)


def test_strict_mode_is_the_one_that_syncs():
    st = _rows(10)
    x = torch.randn(2, 3, device="meta")
    z = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        _step(x, z, z, st, True, "mean")
