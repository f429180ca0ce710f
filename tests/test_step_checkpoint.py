"""SelectiveStep's checkpoint after the batch policies took over their fields (issue 20):
SB's pending rows and StaleSB's last losses are the policy's, yet a format-1 checkpoint
written before, with them at the top level, loads and is written back the same."""
import copy

import pytest
import torch

from fastsel.selective import SelectiveStep
from test_selective import data, mlp  # noqa: E402  (the same small model and data)


def _format1_checkpoint():
    """A StaleSB step's state_dict as the code before the policies owned their fields wrote
    it (format 1), built field by field: SB's pending rows and StaleSB's last losses at the
    top level, beside the policy's own state."""
    g = torch.Generator().manual_seed(11)
    counts = {"steps": 9, "samples_in": 72, "selection_forward": 40, "exit_forward": 0,
              "train_forward": 32, "backward": 32, "probe_forward": 0, "backward_batches": 8,
              "optimizer_steps": 0, "epochs_ended": 1, "chosen": 35, "full_steps": 0,
              "full_rows": 0}
    times = {"total": 0.5, "selection": 0.1, "selection_forward": 0.2, "train": 0.2}
    policy = {"history": {"size": 8, "pos": 3, "filled": 8, "buf": torch.rand(8, generator=g)},
              "draws": 45, "stale_batches": 4, "carry": 0.25}
    return {"format": 1,
            "config": {"name": "sb", "b": 1.0, "history": 8, "stale": 2, "leftover": "carry",
                       "share": "exact", "scale_factor": 1.0},
            "own_epoch": 1, "counts": counts, "times": times, "policy": policy, "batch_size": 4,
            "last_loss": torch.rand(16, generator=g), "known": torch.arange(16) % 3 != 0,
            "pending": {"x": torch.randn(3, 16, generator=g), "y": torch.tensor([0, 1, 2]),
                        "idx": torch.tensor([5, 9, 11])}}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_a_checkpoint_of_the_old_layout_loads_and_resumes():
    """The pending rows and last losses are the SB policy's now; a format-1 checkpoint,
    which keeps them at the top level, loads into them and is written back the same."""
    old = _format1_checkpoint()
    make = lambda: SelectiveStep(mlp(), "sb", history=8, stale=2, num_samples=16)  # noqa: E731
    assert list(make().state_dict()) == list(old)           # the same fields, in order
    s = make()
    s.load_state_dict(copy.deepcopy(old))
    assert _same(s.state_dict(), old)
    assert s.pending == 3 and s.epoch == 1 and s.policy.is_stale_epoch(s.epoch)
    idx = torch.arange(16)
    loss, known = s.policy.last_loss.lookup(idx)
    assert torch.equal(loss, old["last_loss"]) and torch.equal(known, old["known"])
    x, y = data(n=16)
    s.step(x[:8], y[:8], idx[:8])                          # a stale epoch: no selection forward
    assert s.counts["selection_forward"] == 40
    trained = [i.tolist() for i in s.last["trained_indices"]]
    assert trained[0][:3] == [5, 9, 11]                     # the loaded rows train first
    # An older format-1 checkpoint had no "pending" field at all.
    older = {k: v for k, v in _format1_checkpoint().items() if k != "pending"}
    t = make()
    t.load_state_dict(older)
    assert t.pending == 0 and t.state_dict()["pending"] is None


def test_another_policys_checkpoint_fields_are_refused():
    sd = SelectiveStep(mlp(), "osgd").state_dict()
    sd["pending"] = _format1_checkpoint()["pending"]
    with pytest.raises(ValueError, match=r"'pending' must be None: policy 'osgd'"):
        SelectiveStep(mlp(), "osgd").load_state_dict(sd)
    sd = SelectiveStep(mlp(), "sb").state_dict()
    sd["last_loss"], sd["known"] = torch.zeros(16), torch.zeros(16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'last_loss' is saved, but this step keeps no last"):
        SelectiveStep(mlp(), "sb", num_samples=16).load_state_dict(sd)


def test_step_last_losses_still_works_with_a_deprecation_warning():
    x, y = data(n=32)
    s = SelectiveStep(mlp(), "sb", stale=2, num_samples=32)
    s.step(x, y, torch.arange(32))
    idx = torch.tensor([3, 7])
    with pytest.warns(DeprecationWarning, match="policy.last_loss.lookup"):
        loss, known = s.last_losses(idx)
    expect = s.policy.last_loss.lookup(idx)
    assert torch.equal(loss, expect[0]) and torch.equal(known, expect[1]) and known.all()
