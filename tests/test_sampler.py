"""The Sampler: exact counts, reproducible streams, policies, budgets, bad arguments."""
import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.policies import POLICIES
from helpers import fake_labels, fake_logits, train_epoch

ALL = sorted(POLICIES)


def run_stream(policy, n=203, budget=0.3, epochs=5, seed=0, batch=16, **kw):
    s = fastsel.Sampler(n, policy=policy, budget=budget, epochs=epochs, seed=seed, **kw)
    return s, [train_epoch(s, batch) for _ in s.epochs()]


@pytest.mark.parametrize("policy", ALL)
@pytest.mark.parametrize("n,budget", [(1, 0.3), (203, 0.3), (1000, 0.25), (999, 0.5), (77, 1.0), (50, 0.01)])
def test_exact_count_per_epoch_known_before_it_starts(policy, n, budget):
    s = fastsel.Sampler(n, policy=policy, budget=budget, epochs=4)
    expect_k = n if policy == "scan" else max(1, int(n * budget + 0.5))
    expect_epochs = max(1, int(4 * budget + 0.5)) if policy == "scan" else 4
    epochs = 0
    for _ in s.epochs():
        assert len(s) == expect_k  # known before the iteration (fraction budgets)
        got = train_epoch(s, 7)
        assert len(got) == expect_k
        assert len(set(got)) == expect_k  # without replacement
        assert all(0 <= i < n for i in got)
        epochs += 1
    assert epochs == expect_epochs == s.num_epochs


@pytest.mark.parametrize("policy", ALL)
def test_same_seed_same_stream_other_seed_other_stream(policy):
    _, a = run_stream(policy, seed=3)
    _, b = run_stream(policy, seed=3)
    _, c = run_stream(policy, seed=4)
    assert a == b
    assert a != c


def test_uniform_draws_a_fresh_subset_every_epoch():
    _, stream = run_stream("uniform", n=500, budget=0.2, epochs=6)
    sets = [frozenset(e) for e in stream]
    assert len(set(sets)) == 6
    # Over 6 epochs a uniform 20% draw covers about 1 - 0.8^6 = 74% of the data.
    covered = len(frozenset().union(*sets)) / 500
    assert 0.65 < covered < 0.83


def test_psgd_favours_hard_samples_and_csgd_uncertain_ones():
    n = 400
    for policy, prefer in (("p-sgd", "hard"), ("c-sgd", "uncertain")):
        s = fastsel.Sampler(n, policy=policy, budget=0.25, epochs=2)
        st = s.state
        st.seen.fill_(1)
        # Half the samples are easy (p_true 0.95), a quarter hard (0.05), a quarter uncertain (0.5).
        p = torch.full((n,), 0.95)
        p[: n // 4] = 0.05
        p[n // 4: n // 2] = 0.5
        st.p_true.copy_(p)
        s.set_epoch(1)
        chosen = torch.tensor(s.epoch_indices())
        hard = float((chosen < n // 4).float().mean())
        unc = float(((chosen >= n // 4) & (chosen < n // 2)).float().mean())
        if prefer == "hard":
            # weights (1 - p) + eps: 0.95+e vs 0.5+e vs 0.05+e with e = mean = 0.3; hard share ~0.39
            assert hard > 0.3 and hard > unc
        else:
            # p(1-p) + eps: 0.0475+e vs 0.25+e vs 0.0475+e with e ≈ 0.098; uncertain share ~0.35
            assert unc > 0.28 and unc > hard


def test_psgd_weights_follow_arazo_equation():
    """Selection frequencies over many epochs match the Gumbel-top-k of w = (1 - p) + ε."""
    n, k = 40, 4
    s = fastsel.Sampler(n, policy="p-sgd", budget=k / n, epochs=1)
    s.state.seen.fill_(1)
    p = torch.linspace(0.0, 0.9, n)
    s.state.p_true.copy_(p)
    counts = torch.zeros(n)
    epochs = 1500
    for e in range(epochs):
        s.set_epoch(e)
        counts[torch.tensor(s.epoch_indices())] += 1
    w = (1 - p) + (1 - p).mean()
    # Inclusion probability of the top weights exceeds the lowest; the ordering follows w.
    freq = counts / epochs
    assert float(freq[:10].mean()) > float(freq[-10:].mean()) * 1.5
    assert torch.corrcoef(torch.stack([freq, w]))[0, 1] > 0.9


def test_tftb_ranks_unseen_first_then_variance_weighted_loss():
    n = 100
    s = fastsel.Sampler(n, policy="tftb", budget=0.2, epochs=3, explore=0.0, adaptive=False)
    st = s.state
    st.seen[:90] = 1
    st.loss[:90] = torch.linspace(0.1, 1.0, 90)
    st.loss_var[:90] = 0.0
    st.loss_var[0] = 100.0  # a low loss with a huge variance is kept by the weighting
    s.set_epoch(1)
    chosen = set(s.epoch_indices())
    assert set(range(90, 100)) <= chosen  # never-trained samples first
    assert 0 in chosen
    assert set(range(81, 90)) <= chosen  # then the top losses


def test_tftb_adapts_alpha_under_time_budget_and_explore_under_fraction():
    t = fastsel.policies.TFTB(alpha=0.3, step=0.05, tol=0.01)
    t.observe(None, 1.0, True)
    t.observe(None, 0.5, True)  # fast progress: prune more
    assert math.isclose(t.alpha, 0.35)
    t.observe(None, 0.4999, True)  # plateau: keep more data
    assert math.isclose(t.alpha, 0.30)
    f = fastsel.policies.TFTB(explore=0.1, step=0.05)
    f.observe(None, 1.0, False)
    f.observe(None, 0.999, False)  # plateau: explore more
    assert math.isclose(f.explore, 0.15)


class _MeanLossProbe(fastsel.policies.Policy):
    """Uniform selection that records the mean loss each selection pass hands to observe."""

    name = "mean-loss-probe"

    def __init__(self, uses_mean_loss):
        super().__init__()
        self.uses_mean_loss = uses_mean_loss
        self.got = []

    def observe(self, state, mean_loss, time_mode):
        self.got.append(mean_loss)

    def select(self, ctx):
        return self.uniform_selection(ctx)


def test_mean_loss_is_computed_only_for_policies_that_read_it():
    assert {name for name, cls in POLICIES.items() if cls.uses_mean_loss} == {"tftb"}
    assert fastsel.policies.Policy.uses_mean_loss  # a custom policy's observe may read it
    for uses in (True, False):
        probe = _MeanLossProbe(uses)
        s = fastsel.Sampler(40, policy=probe, budget=1.0, epochs=2)
        for _ in s.epochs():
            expect = float(s.state.loss.mean()) if uses and s.epoch > 0 else None
            train_epoch(s, 8)
            if expect is None:
                assert probe.got[-1] is None
            else:
                assert probe.got[-1] == pytest.approx(expect, rel=1e-6)


def test_infobatch_prunes_low_loss_and_rescales_exactly():
    n = 1000
    s = fastsel.Sampler(n, policy="infobatch", budget=0.8, epochs=8, prune=0.5, anneal=0.25)
    st = s.state
    st.seen.fill_(1)
    loss = torch.ones(n)
    loss[:600] = 0.1  # 600 below the mean (0.46), 400 above
    st.loss.copy_(loss)
    s.set_epoch(1)
    chosen = torch.tensor(s.epoch_indices())
    assert len(chosen) == 800
    # k = 800 >= |H| + (1 - r)|L| = 700: all of H, 400 of L, r_eff = 1/3, weight 1.5.
    assert int((chosen >= 600).sum()) == 400
    w = st.weight
    assert torch.allclose(w[chosen[chosen < 600]], torch.tensor(1.5))
    assert torch.all(w[chosen[chosen >= 600]] == 1.0)
    # Tighter budget: both groups sampled at InfoBatch's ratio, L weight = 1 / (1 - r).
    s2 = fastsel.Sampler(n, policy="infobatch", budget=0.35, epochs=8, prune=0.5, anneal=0.25)
    s2.state.load_state_dict(st.state_dict())
    s2.set_epoch(1)
    c2 = torch.tensor(s2.epoch_indices())
    k_h = int((c2 >= 600).sum())
    k_l = len(c2) - k_h
    assert len(c2) == 350 and k_h == round(350 * 400 / 700)
    assert math.isclose(float(s2.state.weight[c2[c2 < 600][0]]), (k_h / 400) / (k_l / 600), rel_tol=1e-6)
    # The last anneal share of epochs is uniform with weight 1.
    s.set_epoch(6)
    s.epoch_indices()
    assert torch.all(st.weight == 1.0)


def test_infobatch_weight_is_applied_in_the_loss():
    n = 10
    s = fastsel.Sampler(n, policy="infobatch", budget=1.0, epochs=2)
    iter(s)   # the epoch's selection pass sets the weights; then override them
    s.state.weight.copy_(torch.arange(n).float())
    idx = torch.arange(n)
    logits = torch.randn(n, 3)
    y = idx % 3
    out = s.loss(logits, y, idx)
    ref = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * idx.float()).mean()
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0.0, epochs=3), "budget must be a fraction in \\(0, 1\\], got budget=0.0"),
    (dict(budget=1.5, epochs=3), "budget=1.5"),
    (dict(budget=-0.1, epochs=3), "budget=-0.1"),
    (dict(budget=float("nan"), epochs=3), "budget=nan"),
    (dict(budget="0.3", epochs=3), "budget='0.3'"),
    (dict(budget=0.3, time_budget=10), "exactly one of budget"),
    (dict(), "exactly one of budget"),
    (dict(budget=0.3), "needs epochs="),
    (dict(time_budget=0), "time_budget=0"),
    (dict(budget=0.3, epochs=0), "epochs=0"),
    (dict(budget=0.3, epochs=3, policy="nope"), "policy='nope'"),
    (dict(budget=0.3, epochs=3, backend="gpu9000"), "backend='gpu9000'"),
    (dict(budget=0.3, epochs=3, reduction="avg"), "reduction='avg'"),
    (dict(budget=0.3, epochs=3, policy="tftb", alpha=1.5), "alpha=1.5"),
    (dict(budget=0.3, epochs=3, policy="infobatch", prune=1.0), "prune=1.0"),
    (dict(budget=0.3, epochs=3, num_replicas=2, rank=2), "rank=2"),
    (dict(budget=0.3, epochs=3, keep=0.5), "keep=0.5"),
    (dict(time_budget=9, keep=1.5), "keep=1.5"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsel.Sampler(100, **kwargs)


def test_unknown_policy_parameter_is_refused():
    with pytest.raises(TypeError, match="tftb"):
        fastsel.Sampler(100, policy="tftb", budget=0.3, epochs=2, prune=0.5)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda l, y, i: (l[0], y, i), ValueError, "logits must be \\[batch, classes\\]"),
    (lambda l, y, i: (l.long(), y, i), TypeError, "logits must be float32"),
    (lambda l, y, i: (l, y.float(), i), ValueError, "target holds class probabilities"),
    (lambda l, y, i: (l, y.to(torch.uint8), i), TypeError, "target must be int64 or int32"),
    (lambda l, y, i: (l, y, i[:-1]), ValueError, "indices has 7 entries but logits has 8"),
    (lambda l, y, i: (l, y[:, None], i), ValueError, "target of class indices must have shape"),
    (lambda l, y, i: (l, y, torch.cat([i[:-1], torch.tensor([100])])), IndexError, "outside \\[0, 100\\), e.g. 100"),
    (lambda l, y, i: (l, torch.tensor([0, 1, 2, 3, 4, 0, 1, 9]), i), IndexError, "labels: 1 label.*e.g. 9"),
])
def test_bad_loss_input_refused_and_state_unchanged(bad, exc, match):
    s = fastsel.Sampler(100, policy="uniform", budget=0.5, epochs=2)
    idx = torch.tensor(s.epoch_indices()[:8])
    s.loss(torch.randn(8, 5), idx % 5, idx)
    before = {k: v.clone() for k, v in s.state.state_dict().items() if isinstance(v, torch.Tensor)}
    pos = s.position
    with pytest.raises(exc, match=match):
        s.loss(*bad(torch.randn(8, 5), idx % 5, idx))
    after = s.state.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert s.position == pos


def test_deferred_errors_raise_at_the_next_selection_pass():
    s = fastsel.Sampler(50, policy="uniform", budget=0.5, epochs=3, strict=False)
    it = iter(s)
    idx = torch.tensor([next(it) for _ in range(4)])
    bad = idx.clone()
    bad[0] = 77
    s.loss(torch.randn(4, 3), bad % 3, bad)  # no error yet: no host sync on this path
    assert int(s.state.seen.sum()) == 3
    s.set_epoch(1)
    with pytest.raises(IndexError, match="77"):
        iter(s)
    s.set_epoch(1)
    assert len(list(iter(s))) == 25  # the state stayed valid and selection goes on


def test_nonfinite_losses_are_reported_by_summary():
    s = fastsel.Sampler(20, policy="uniform", budget=1.0, epochs=1)
    iter(s)
    idx = torch.arange(4)
    logits = torch.randn(4, 3)
    logits[1, 0] = float("nan")
    s.loss(logits, idx % 3, idx)
    assert s.summary()["nonfinite_losses"] == 1


def test_summary_reports_each_epochs_mean_observed_loss():
    """Uniform logits over C classes cost log C; a confident right answer about 0. The
    epoch that is running reports its mean so far; finished epochs survive a resume."""
    n, c = 40, 10
    s = fastsel.Sampler(n, policy="uniform", budget=0.5, epochs=3, seed=0)
    for e, scale in zip(s.epochs(), (0.0, 20.0)):
        for chunk in torch.tensor(s.epoch_indices()).split(7):
            labels = chunk % c
            logits = scale * torch.nn.functional.one_hot(labels, c).float()
            s.loss(logits, labels, chunk)
        if e == 1:
            break
    losses = s.summary()["epoch_mean_losses"]
    assert len(losses) == 2
    assert math.isclose(losses[0], math.log(c), rel_tol=1e-6)
    assert losses[1] < 1e-6
    t = fastsel.Sampler(n, policy="uniform", budget=0.5, epochs=3, seed=0)
    t.load_state_dict(s.state_dict())
    assert t.summary()["epoch_mean_losses"][0] == losses[0]
    s.set_epoch(2)
    s.epoch_indices()   # the pass closes epoch 1: nothing running yet
    assert s.summary()["epoch_mean_losses"] == losses


def test_summary_counts_passes_entropy_and_selection_time():
    s, _ = run_stream("uniform", n=100, budget=0.3, epochs=4)
    r = s.summary()
    assert r["epochs_run"] == 4
    assert r["passes"] == 120 and r["passes_full_training"] == 400
    assert math.isclose(r["passes_saved"], 0.7)
    assert math.isclose(r["selected_fraction"], 0.3)
    assert r["samples_seen"] + r["samples_never_selected"] == 100
    assert r["selection_time_s"] > 0
    counts = s.state.selected.double()
    p = counts[counts > 0] / counts.sum()
    assert math.isclose(r["selection_entropy"]["nats"], float(-(p * p.log()).sum()), rel_tol=1e-9)
    assert "passes_saved" in str(r)


def test_set_epoch_and_auto_advance():
    s = fastsel.Sampler(60, policy="uniform", budget=0.5, epochs=5)
    e0 = list(s)
    assert list(s) != e0  # an exhausted epoch moves on to the next
    assert s.epoch == 1
    s.set_epoch(0)
    assert list(s) == e0  # set_epoch names the epoch again: the same selection
    s.set_epoch(3)
    a = s.epoch_indices()
    assert s.epoch_indices() == a and list(s) == a


def test_time_budget_ends_epochs_when_time_is_spent(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])
    s = fastsel.Sampler(100, policy="uniform", time_budget=12.5)
    seen_epochs = []
    for e in s.epochs():
        n = 0
        for _ in s:
            n += 1
            clock[0] += 0.125  # each sample costs 0.125 s (exact in binary)
        seen_epochs.append(n)
    # 100 samples per epoch (time mode keeps everything by default), 100 fit in 12.5 s.
    assert seen_epochs == [100]
    assert s.elapsed() == 12.5
    assert list(s.epochs()) == []


def test_time_budget_keep_share_and_tftb_alpha():
    assert len(fastsel.Sampler(100, policy="uniform", time_budget=5, keep=0.4)) == 40
    assert len(fastsel.Sampler(100, policy="tftb", time_budget=5, alpha=0.3)) == 70


def test_budget_lr_decays_linearly_to_zero_at_the_end_of_the_budget():
    n, bs = 103, 10
    s = fastsel.Sampler(n, policy="uniform", budget=0.5, epochs=4)  # 52 per epoch
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = fastsel.BudgetLR(opt, s)
    lrs, done = [], 0
    total = 4 * 52
    for _ in s.epochs():
        it = s.epoch_indices()
        for j in range(0, len(it), bs):
            batch = torch.tensor(it[j:j + bs])
            lrs.append(opt.param_groups[0]["lr"])
            assert math.isclose(lrs[-1], 0.2 * (1 - done / total), abs_tol=1e-12)
            s.loss(torch.randn(len(batch), 2), batch % 2, batch)
            done += len(batch)
            opt.step()
            sched.step()
    assert lrs[0] == 0.2 and lrs[-1] > 0
    assert opt.param_groups[0]["lr"] == 0.0  # exactly at the end


def test_budget_lr_by_wall_clock_under_a_time_budget(monkeypatch):
    s = fastsel.Sampler(10, policy="uniform", time_budget=100.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = fastsel.BudgetLR(opt, s, final_ratio=0.01)
    monkeypatch.setattr(s.budget, "elapsed", lambda: 25.0)
    opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.01 + 0.99 * 0.75)
    monkeypatch.setattr(s.budget, "elapsed", lambda: 500.0)
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.01)


def test_with_indices_appends_index_and_pickles():
    ds = TensorDataset(torch.arange(10).float(), torch.arange(10) % 3)
    w = fastsel.with_indices(ds)
    x, y, i = w[7]
    assert i == 7 and float(x) == 7.0
    w2 = pickle.loads(pickle.dumps(w))
    assert w2[3][2] == 3 and len(w2) == 10
    assert fastsel.with_indices([{"a": 1}])[0] == {"a": 1, "index": 0}
    with pytest.raises(TypeError):
        fastsel.with_indices(5)


@pytest.mark.parametrize("ctx", ["spawn", "fork"])
def test_dataloader_with_workers(ctx):
    n = 64
    ds = fastsel.with_indices(TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n) % 4))
    s = fastsel.Sampler(ds, policy="uniform", budget=0.5, epochs=2)
    loader = DataLoader(ds, batch_size=8, sampler=s, num_workers=2, multiprocessing_context=ctx)
    expected = s.epoch_indices()
    got = []
    for x, y, idx in loader:
        assert torch.equal(x.squeeze(1).long(), idx)  # each item carries its own index
        s.loss(torch.randn(len(idx), 4), y, idx)
        got += idx.tolist()
    assert got == expected and len(got) == 32
    assert s.position == 32


def test_import_needs_neither_triton_nor_the_extension():
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None; sys.modules['fastsel._C'] = None\n"
            "import torch, fastsel\n"
            "info = fastsel.list_backends()\n"
            "assert info['reference'].startswith('available'), info\n"
            "assert not info['triton'].startswith('available') and not info['cpu'].startswith('available'), info\n"
            "s = fastsel.Sampler(10, budget=0.5, epochs=1)\n"
            "i = torch.tensor(s.epoch_indices())\n"
            "s.loss(torch.randn(5, 3), i % 3, i)\n"
            "print(s.summary()['backend'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_state_follows_the_logits_device_and_backends_report():
    info = fastsel.list_backends()
    assert info["reference"].startswith("available")
    assert all(isinstance(v, str) and v for v in info.values())
    s = fastsel.Sampler(10, budget=1.0, epochs=1, backend="reference")
    assert s.state.device.type == "cpu"
    iter(s)
    s.loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert s.summary()["backend"] == "reference"


def test_loss_reduction_override_and_update_false():
    s = fastsel.Sampler(30, policy="uniform", budget=1.0, epochs=1)
    iter(s)
    s.state.weight.copy_(torch.linspace(0.5, 2.0, 30))
    idx = torch.tensor([3, 7, 7, 20])
    logits = torch.randn(4, 6)
    y = torch.tensor([0, 5, 5, 2])
    per = s.loss(logits, y, idx, reduction="none", update=False)
    ref = torch.nn.functional.cross_entropy(logits, y, reduction="none") * s.state.weight[idx]
    torch.testing.assert_close(per, ref)
    assert int(s.state.seen.sum()) == 0 and s.position == 0  # nothing observed
    torch.testing.assert_close(s.loss(logits, y, idx, reduction="sum"), ref.sum())
    assert int(s.state.seen.sum()) == 4 and s.position == 4
    with pytest.raises(ValueError, match="reduction='avg'"):
        s.loss(logits, y, idx, reduction="avg")
    with pytest.raises(IndexError, match="99"):
        s.loss(logits, y, torch.tensor([3, 7, 7, 99]), update=False)


def test_epoch_indices_follow_set_epoch_at_once():
    """Asking for the indices right after set_epoch gives the new epoch's, in every form."""
    s = fastsel.Sampler(90, policy="uniform", budget=0.5, epochs=4)
    seen = []
    for e in s.epochs():
        a = s.epoch_indices()
        assert s.epoch_array().tolist() == a
        assert list(s) == a
        seen.append(a)
    assert len({tuple(x) for x in seen}) == 4
