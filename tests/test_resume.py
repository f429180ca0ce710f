"""Checkpoint and resume: the resumed run yields exactly the uninterrupted index stream."""
import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.policies import POLICIES
from helpers import _step, fake_labels, fake_logits, train_epoch

ALL = sorted(POLICIES)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def make(policy, **kw):
    args = dict(policy=policy, budget=0.4, epochs=5, seed=11)
    args.update(kw)
    return fastsel.Sampler(157, **args)


def uninterrupted(policy, **kw):
    s = make(policy, **kw)
    return s, [i for _ in s.epochs() for i in train_epoch(s, 8)]


@pytest.mark.parametrize("policy", ALL)
def test_resume_mid_epoch_gives_the_same_stream_and_state(policy):
    ref_sampler, ref = uninterrupted(policy)
    s = make(policy)
    stream = []
    for e in s.epochs():
        if e == 2:
            stream += train_epoch(s, 8, stop_after=3)  # interrupted after 3 batches
            break
        stream += train_epoch(s, 8)
    sd = roundtrip(s.state_dict())
    # Drift the old sampler's state: the checkpoint must not share tensors with it.
    s.state.loss.add_(5.0)
    r = make(policy)
    r.load_state_dict(sd)
    for _ in r.epochs():
        stream += train_epoch(r, 8)
    assert stream == ref
    for k, v in ref_sampler.state.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r.state.state_dict()[k]), k
    assert r.summary()["passes"] == ref_sampler.summary()["passes"]


def test_resume_at_an_epoch_boundary_starts_the_next_epoch():
    _, ref = uninterrupted("tftb")
    s = make("tftb")
    stream = []
    for e in s.epochs():
        stream += train_epoch(s, 8)
        if e == 1:
            break
    r = make("tftb")
    r.load_state_dict(roundtrip(s.state_dict()))
    assert next(iter(r.epochs())) == 2
    for _ in r.epochs():
        stream += train_epoch(r, 8)
    assert stream == ref


def test_position_is_what_was_trained_not_what_was_prefetched():
    """The DataLoader's workers read indices ahead; the checkpoint holds what went through
    loss(), and the selection restored is the one drawn, not one recomputed from the state
    that changed since."""
    n = 157
    ds = fastsel.with_indices(TensorDataset(torch.zeros(n, 1), fake_labels(torch.arange(n))))
    _, ref = uninterrupted("infobatch")
    s = make("infobatch")
    loader = DataLoader(ds, batch_size=8, sampler=s, num_workers=2, prefetch_factor=4)
    stream = []
    for e in s.epochs():
        for b, (_, _, idx) in enumerate(loader):
            _step(s, idx.tolist())
            stream += idx.tolist()
            if e == 1 and b == 2:
                break
        if e == 1:
            break
    assert s.budget.yielded > len(stream)  # the workers really did read ahead
    sd = roundtrip(s.state_dict())
    assert sd["position"] == 24
    r = make("infobatch")
    r.load_state_dict(sd)
    loader = DataLoader(ds, batch_size=8, sampler=r, num_workers=2)
    for _ in r.epochs():
        for _, _, idx in loader:
            _step(r, idx.tolist())
            stream += idx.tolist()
    assert stream == ref


@pytest.mark.parametrize("workers,policy", [(0, "p-sgd"), (0, "tftb"), (2, "uniform"), (2, "p-sgd")])
def test_torchdata_stateful_dataloader_protocol(workers, policy):
    """StatefulDataLoader saves and restores the sampler and its iterator. Without workers
    the resume is exact. With workers its snapshot is taken when a batch is fetched: the
    position is exact, but per-sample statistics miss the batches then in flight, so a
    state-driven policy may choose differently later (README says: save
    ``sampler.state_dict()`` yourself for an exact resume)."""
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    n = 157
    ds = fastsel.with_indices(TensorDataset(torch.zeros(n, 1), fake_labels(torch.arange(n))))
    _, ref = uninterrupted(policy)
    s = make(policy)
    loader = sdl.StatefulDataLoader(ds, batch_size=8, sampler=s, num_workers=workers)
    stream = []
    saved = None
    for e in s.epochs():
        for b, (_, _, idx) in enumerate(loader):
            _step(s, idx.tolist())
            stream += idx.tolist()
            if e == 1 and b == 4:
                saved = roundtrip(loader.state_dict())
                break
        if saved is not None:
            break
    r = make(policy)
    loader = sdl.StatefulDataLoader(ds, batch_size=8, sampler=r, num_workers=workers)
    loader.load_state_dict(saved)
    for _ in r.epochs():
        for _, _, idx in loader:
            _step(r, idx.tolist())
            stream += idx.tolist()
    if workers == 0 or policy == "uniform":
        assert stream == ref
    else:
        per_epoch = 63
        assert stream[: 2 * per_epoch] == ref[: 2 * per_epoch]  # the interrupted epoch resumes in place
        assert len(stream) == len(ref)


@pytest.mark.parametrize("other,match", [
    (dict(n=158), "n=157"),
    (dict(policy="uniform"), "policy"),
    (dict(budget=0.5), "budget"),
    (dict(seed=12), "seed"),
    (dict(policy="infobatch", prune=0.3), "prune|policy"),
])
def test_loading_a_mismatched_state_is_refused_and_changes_nothing(other, match):
    s = make("infobatch")
    train_epoch(s, 8)
    sd = s.state_dict()
    n = other.pop("n", 157)
    args = dict(policy="infobatch", budget=0.4, epochs=5, seed=11)
    args.update(other)
    t = fastsel.Sampler(n, **args)
    before = t.state_dict()
    with pytest.raises(ValueError, match=match):
        t.load_state_dict(sd)
    after = t.state_dict()
    assert after["epoch"] == before["epoch"] and after["position"] == before["position"]
    for k, v in before["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, after["state"][k])


def test_corrupt_state_dict_is_refused():
    s = make("uniform")
    sd = s.state_dict()
    sd["state"]["loss"] = torch.zeros(3)
    with pytest.raises(ValueError, match="loss"):
        make("uniform").load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        make("uniform").load_state_dict({"format": 99})
