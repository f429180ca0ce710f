"""Selective Backprop that can pay: the exact kept share, the downsampled selection forward
(``scale_factor``) and the on/off schedule (``start``/``end``/``interrupt``).

Statistical checks use fixed seeds and 4-standard-deviation tolerances.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel import rng
from fastsel.batch_policies import SelectiveBackprop
from fastsel.batch_policies.sb import inclusion_probabilities, quota, systematic_sample
from fastsel.selective import SelectiveStep
from helpers import weights_only
from test_selective import data, mlp  # noqa: E402  (the same small model and data)

from test_selective import C  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)




class TinyCNN(nn.Module):
    """Convolutions, then global average pooling: any image size goes."""

    def __init__(self, c=C, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))

    def forward(self, x):
        return self.head(self.body(x))


def images(n=64, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, C, (n,), generator=g)


def epoch(step, x, y, bsz, offset=0):
    """One pass over (x, y) in batches of ``bsz`` (the last one smaller); rows chosen."""
    chosen = 0
    for i in range(0, x.shape[0], bsz):
        idx = torch.arange(i, min(i + bsz, x.shape[0]))
        step.step(x[idx], y[idx], idx + offset)
        chosen += int(step.last["chosen"].numel())
    step.end_epoch()
    return chosen


# ---- the exact share ----------------------------------------------------------------------------

def test_quota_carries_the_remainder():
    carry, ks = 0.0, []
    for _ in range(8):
        k, carry = quota(carry, 0.3, 5)      # 1.5 rows a batch: 2, 1, 2, 1, ...
        ks.append(k)
        assert -0.5 <= carry < 0.5
    assert ks == [2, 1, 2, 1, 2, 1, 2, 1]
    assert quota(0.0, 1.0, 7) == (7, 0.0) and quota(0.0, 0.01, 7)[0] == 0


@pytest.mark.parametrize("keep", [0.5, 0.3, 0.25, 0.7])
def test_sb_keeps_exactly_the_nominal_share_over_each_epoch(keep):
    """1000 rows in batches of 32 (the last one 8): keep * 1000 rows within one, each epoch,
    and the chosen rows are the rows trained (pooled backward batches, then the flush)."""
    x, y = data(n=1000)
    model = mlp()
    s = SelectiveStep(model, "sb", keep=keep, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    total = 0
    for e in range(2):
        chosen = epoch(s, x, y, 32)
        assert abs(chosen - keep * 1000) <= 1, (e, chosen)
        total += chosen
    assert abs(total - keep * 2000) <= 0.5 + 1e-9            # and the run within half a row
    assert s.summary()["chosen_share"] == pytest.approx(total / 2000)
    s.flush()
    assert s.summary()["backward_passes"] == total


def test_exact_share_holds_where_the_expected_share_drifts():
    """Losses that fall through the run (as in training) sit low in their history, so SB's
    coin keeps fewer than keep; the exact share keeps keep * rows regardless."""
    g = torch.Generator().manual_seed(3)
    n, bsz = 6400, 32
    stream = torch.rand(n, generator=g) * 0.5 + torch.linspace(2.0, 0.0, n)
    shares = {}
    for share in ("expected", "exact"):
        pol = SelectiveBackprop(keep=0.5, history=1024, share=share)
        pol.key = 99
        kept = sum(int(pol.select(stream[i:i + bsz]).numel()) for i in range(0, n, bsz))
        shares[share] = kept / n
    assert shares["exact"] == 0.5
    assert shares["expected"] < 0.45      # the drift the exact share removes


def test_inclusion_probabilities_cap_at_one_and_sum_to_k():
    p = torch.tensor([0.1, 1.0, 0.1, 0.9, 0.1, 0.1])
    pi = inclusion_probabilities(p, 3)
    # c = 2.5 once the two largest are capped: 1, 1 and 0.25 for the rest.
    torch.testing.assert_close(pi, torch.tensor([0.25, 1, 0.25, 1, 0.25, 0.25], dtype=pi.dtype))
    pi = inclusion_probabilities(torch.tensor([0.2, 0.4, 0.2, 0.2]), 2)   # no cap: c = 2
    torch.testing.assert_close(pi, torch.tensor([0.4, 0.8, 0.4, 0.4], dtype=pi.dtype))
    under = inclusion_probabilities(torch.tensor([0.0, 0.0, 1.0]), 2)       # a floor, not 0
    assert float(under.sum()) == pytest.approx(2.0) and under[2] == 1.0 and under[0] > 0


def test_systematic_sampling_takes_k_rows_each_with_its_probability():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(12, generator=g) ** 2
    k = 5
    pi = inclusion_probabilities(p, k)
    trials = 2000
    hits = torch.zeros(12, dtype=torch.float64)
    key = 1234
    for t in range(trials):
        u = rng.uniform(torch.arange(13) + 13 * t, key, 11)
        pos = systematic_sample(pi, k, u[12], torch.argsort(u[:12], stable=True))
        assert pos.numel() == k and pos.unique().numel() == k
        hits[pos] += 1
    freq = hits / trials
    sd = torch.sqrt(pi * (1 - pi) / trials)
    assert bool((freq - pi).abs().le(4 * sd + 1e-3).all()), (freq, pi)


def test_the_exact_share_prefers_high_losses_within_the_batch():
    """Over many batches the rows of higher loss percentile are kept more often, each in
    proportion to CDF**b (b = 1 here: inclusion ∝ percentile)."""
    pol = SelectiveBackprop(keep=0.25, history=4096)
    pol.key = 7
    g = torch.Generator().manual_seed(8)
    kept_low = kept_high = 0
    for _ in range(200):
        losses = torch.rand(40, generator=g)
        pos = pol.select(losses)
        assert pos.numel() == 10
        kept_high += int((losses[pos] > 0.75).sum())
        kept_low += int((losses[pos] < 0.25).sum())
    assert kept_high > 4 * kept_low


def test_stale_exact_share_keeps_never_seen_samples_first():
    x, y = data(n=96)
    s = SelectiveStep(mlp(), "sb", keep=0.5, stale=2, num_samples=96)
    for i in range(0, 64, 16):                    # epoch 0: fresh, samples 0..63 recorded
        s.step(x[i:i + 16], y[i:i + 16], torch.arange(i, i + 16))
    s.end_epoch()                                 # epoch 1: stale
    idx = torch.cat([torch.arange(60, 64), torch.arange(64, 68), torch.arange(0, 8)])
    s.step(x[idx], y[idx], idx)                   # 4 never-seen rows (64..67) among 16
    chosen = idx[s.last["chosen"]]
    assert chosen.numel() == 8 and set(range(64, 68)) <= set(chosen.tolist())
    idx = torch.arange(70, 86) % 96               # 16 never-seen rows: 8 of them
    s.step(x[idx], y[idx], idx)
    assert s.last["chosen"].numel() == 8


def test_share_must_be_exact_or_expected():
    with pytest.raises(ValueError, match=r"share must be 'exact'.*share='half'"):
        SelectiveStep(mlp(), "sb", share="half")


# ---- the downsampled selection forward -----------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_scale_factor_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"scale_factor must be a number in \(0, 1\].*scale_factor="):
        SelectiveStep(TinyCNN(), "sb", scale_factor=bad)


def test_scale_factor_refuses_inputs_that_are_not_images():
    x, y = data(n=32)
    s = SelectiveStep(mlp(), "sb", scale_factor=0.5)
    with pytest.raises(ValueError, match=r"scale_factor=0.5 .*images \[B, C, H, W\].*\(32, 16\)"):
        s.step(x, y)
    xi, yi = images(n=8)
    s = SelectiveStep(TinyCNN(), "sb", scale_factor=0.5)
    with pytest.raises(ValueError, match=r"floating-point images.*torch.uint8"):
        s.step((xi * 10).clamp(0, 255).to(torch.uint8), yi)
    with pytest.raises(ValueError, match=r"leaves no pixel of a 8x8 image"):
        SelectiveStep(TinyCNN(), "sb", scale_factor=0.1).step(xi, yi)
    # A model that cannot take the smaller image: the error says why.
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, C))
    with pytest.raises(RuntimeError, match=r"downsampled selection input \(8, 3, 4, 4\)"):
        SelectiveStep(flat, "sb", scale_factor=0.5).step(xi, yi)


def test_scale_factor_changes_only_the_selection_forward():
    """The selection losses are those of the downsampled images; the backward batch's loss
    and gradient are those of the chosen rows at full resolution."""
    x, y = images(n=64)
    model = TinyCNN()
    s = SelectiveStep(model, "sb", keep=0.5, batch_size=16, scale_factor=0.5, history=64)
    before = copy.deepcopy(model)
    idx = torch.arange(32)
    loss = s.step(x[idx], y[idx], idx)
    small = F.interpolate(x[idx], scale_factor=0.5, mode="bilinear", align_corners=False)
    with torch.no_grad():
        expect_sel = F.cross_entropy(before(small), y[idx], reduction="none")
    torch.testing.assert_close(s.policy.history.buf[:32], expect_sel)
    assert s.summary()["selection_forward"] == 32
    (ib,) = s.last["trained_indices"]
    assert ib.numel() == 16
    full = F.cross_entropy(before(x[ib]), y[ib])
    torch.testing.assert_close(loss, full.detach())
    ref = copy.deepcopy(before)
    F.cross_entropy(ref(x[ib]), y[ib]).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


# ---- the on/off schedule -----------------------------------------------------------------------

def _schedule_run(n_steps=10, bsz=16, **kw):
    x, y = data(n=n_steps * bsz)
    model = mlp()
    s = SelectiveStep(model, "sb", keep=0.5, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    on = []
    for t in range(n_steps):
        idx = torch.arange(t * bsz, (t + 1) * bsz)
        before = s.counts["backward"]
        s.step(x[idx], y[idx], idx)
        on.append(s.last["selecting"])
        if not s.last["selecting"]:       # every row trained in this very step
            assert s.last["chosen"].numel() == bsz and s.counts["backward"] - before == bsz
            assert s.last["trained_indices"][-1].tolist() == idx.tolist()
        else:
            assert s.last["chosen"].numel() == bsz // 2
    return s, on


def test_start_and_end_train_every_row_outside_the_window():
    s, on = _schedule_run(start=0.3, end=0.7, total_steps=10)
    # progress before step t (0-based) is t / 10: on for 0.3 <= t/10 < 0.7
    assert on == [False] * 3 + [True] * 4 + [False] * 3
    sm = s.summary()
    assert sm["full_steps"] == 6 and sm["chosen_share"] == 0.5
    assert s.progress() == 1.0


def test_interrupt_trains_every_nth_step_on_all_rows():
    s, on = _schedule_run(interrupt=3)
    assert on == [True, True, False] * 3 + [True]
    s, on = _schedule_run(interrupt=2, start=0.5, total_steps=10)
    assert on == [False] * 6 + [True, False] * 2      # steps 2, 4, ..., 10 (from 1) off


def test_end_one_keeps_selecting_to_the_last_step():
    s, on = _schedule_run(start=0.0, end=1.0, total_steps=4, n_steps=6)   # past total_steps too
    assert all(on)


def test_schedule_follows_the_samplers_progress_and_observes_each_row_once():
    x, y = data(n=200)
    train = fastsel.with_indices(TensorDataset(x, y))
    sampler = fastsel.Sampler(train, policy="uniform", budget=0.5, epochs=4, seed=0)
    loader = DataLoader(train, batch_size=20, sampler=sampler)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = SelectiveStep(model, "sb", keep=0.5, optimizer=opt, sampler=sampler, start=0.5)
    per_epoch = []
    for _ in sampler.epochs():
        flags = []
        for xb, yb, idx in loader:
            s.step(xb, yb, idx)
            flags.append(s.last["selecting"])
        assert sampler.position == 100
        per_epoch.append(flags)
    # 4 epochs of 100 rows: the first two are before start=0.5, the last two after.
    assert [all(f) for f in per_epoch] == [False, False, True, True]
    assert [any(f) for f in per_epoch] == [False, False, True, True]
    st = sampler.state
    assert torch.equal(st.seen, st.selected)      # off steps observe each row once too
    s.flush()
    assert s.summary()["backward_passes"] == 200 + 100


@pytest.mark.parametrize("kw,match", [
    ({"start": -0.1}, r"start must be a share of training in \[0, 1\], got start=-0.1"),
    ({"start": 1.5}, r"start must be .* got start=1.5"),
    ({"end": float("nan")}, r"end must be .* got end=nan"),
    ({"end": "0.5"}, r"end must be .* got end='0.5'"),
    ({"start": 0.6, "end": 0.4, "total_steps": 10}, r"start must be below end.*start=0.6, end=0.4"),
    ({"start": 0.5, "end": 0.5, "total_steps": 10}, r"start must be below end"),
    ({"interrupt": 1}, r"interrupt must be 0 \(never\) or an int n >= 2.*interrupt=1"),
    ({"interrupt": -2}, r"interrupt=-2"),
    ({"interrupt": 2.0}, r"interrupt=2.0"),
    ({"interrupt": True}, r"interrupt=True"),
    ({"start": 0.2}, r"start=0.2, end=1.0 need the training's progress: pass total_steps="),
    ({"end": 0.9}, r"need the training's progress"),
    ({"total_steps": 0}, r"total_steps must be an int >= 1, got total_steps=0"),
])
def test_bad_schedule_arguments_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectiveStep(mlp(), "sb", **kw)


def test_total_steps_with_a_sampler_is_refused():
    sampler = fastsel.Sampler(64, policy="uniform", budget=1.0, epochs=1)
    with pytest.raises(ValueError, match=r"total_steps=10 given with a sampler"):
        SelectiveStep(mlp(), "sb", sampler=sampler, total_steps=10, start=0.5)


def test_the_schedule_applies_to_every_batch_policy():
    x, y = data(n=64)
    s = SelectiveStep(mlp(), "osgd", keep=0.25, interrupt=2)
    s.step(x[:32], y[:32])
    assert s.last["chosen"].numel() == 8
    s.step(x[32:], y[32:])
    assert s.last["chosen"].numel() == 32 and not s.last["selecting"]


# ---- checkpoints ----------------------------------------------------------------------------------

def _run_rows(s, x, y, t0, t1, bsz=13):
    out = []
    for t in range(t0, t1):
        idx = torch.arange(t * bsz, (t + 1) * bsz) % x.shape[0]
        s.step(x[idx], y[idx], idx)
        out.append(idx[s.last["chosen"]].tolist())
    return out


def test_carry_travels_in_the_state_dict_and_loads_weights_only():
    x, y = data(n=256)
    make = lambda: SelectiveStep(mlp(), "sb", keep=0.3, seed=2, interrupt=4)  # noqa: E731
    s = make()
    _run_rows(s, x, y, 0, 5)
    sd = weights_only(s.state_dict())
    assert sd["policy"]["carry"] == s.policy.carry != 0.0
    rest = _run_rows(s, x, y, 5, 15)
    t = make()
    t.load_state_dict(sd)
    assert t.policy.carry == sd["policy"]["carry"] and t.counts["steps"] == 5
    assert _run_rows(t, x, y, 5, 15) == rest     # same quotas, same rows, same off steps


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.update(carry=float("nan")), r"'policy.carry' must be finite"),
    (lambda p: p.update(carry=2.0), r"'policy.carry' must be <= 1.0"),
    (lambda p: p.update(carry="0.1"), r"'policy.carry' must be a number"),
    (lambda p: p.pop("carry"), r"'policy.carry' is missing"),
])
def test_a_bad_carry_is_refused_and_nothing_changes(edit, match):
    x, y = data(n=64)
    s = SelectiveStep(mlp(), "sb", keep=0.3)
    _run_rows(s, x, y, 0, 3)
    sd = s.state_dict()
    edit(sd["policy"])
    t = SelectiveStep(mlp(), "sb", keep=0.3)
    _run_rows(t, x, y, 0, 1)
    before = copy.deepcopy(t.state_dict())
    with pytest.raises(ValueError, match=match):
        t.load_state_dict(sd)
    after = t.state_dict()
    assert after["policy"]["carry"] == before["policy"]["carry"]
    assert torch.equal(after["policy"]["history"]["buf"], before["policy"]["history"]["buf"])
    assert after["counts"] == before["counts"]


@pytest.mark.parametrize("other", [{"share": "expected"}, {"scale_factor": 0.5}])
def test_a_state_of_another_share_or_scale_factor_is_refused(other):
    x, y = images(n=16)
    s = SelectiveStep(TinyCNN(), "sb", keep=0.5)
    s.step(x, y)
    with pytest.raises(ValueError, match="state_dict is for policy"):
        SelectiveStep(TinyCNN(), "sb", keep=0.5, **other).load_state_dict(s.state_dict())
