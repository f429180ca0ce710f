"""No host synchronisation per step: the reference step runs on ``meta`` tensors, where any
``.item()``, ``bool()`` or device→host copy raises. (Strict mode syncs by design.)"""
import pytest
import torch

from fastsel.backends.reference import ReferenceBackend
from fastsel.config import LossConfig
from fastsel.state import SampleState


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_step_has_no_host_sync(reduction, weighted):
    st = SampleState(100, "meta")
    x = torch.randn(8, 5, device="meta", requires_grad=True)
    y = torch.zeros(8, dtype=torch.long, device="meta")
    i = torch.zeros(8, dtype=torch.long, device="meta")
    w = torch.ones(5, device="meta") if weighted else None
    cfg = LossConfig(strict=False, reduction=reduction, label_smoothing=0.1, class_weight=w)
    out = ReferenceBackend().step(x, y, i, st, cfg, 0)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_strict_mode_is_the_one_that_syncs():
    st = SampleState(10, "meta")
    x = torch.randn(2, 3, device="meta")
    z = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        ReferenceBackend().step(x, z, z, st, LossConfig(strict=True), 0)
