"""RHO-LOSS (policy="rho"): keys against a hand computation, unseen samples first, argument
checks, checkpoints; the redundant synthetic set; and compare charging rho's holdout model."""
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import fastsel
from fastsel.experiments import compare, datasets
from fastsel.backends import available, get_backend
from fastsel.cli import main
from fastsel.policies import SelectionContext, make_policy
from fastsel.policies.rho import RHO, fit_irreducible, irreducible_losses
from fastsel.state import SampleState
from fastsel.experiments.train import RunSpec, make_sampler, rho_plan, train_one
from helpers import weights_only

# loss EMA, irreducible loss and their difference (exact in float32):
LOSS = [1.0, 2.0, 0.5, 3.0, 2.5, 1.5, 0.2, 2.0]
IRR = [0.1, 1.9, 0.4, 0.5, 0.5, 0.0, 0.0, 0.0]
# reducible:  0.9  0.1  0.1  2.5  2.0  1.5  0.2  2.0
#   top-3 by hand: 3 (2.5), then the tie 4 and 7 (2.0) by index -> {3, 4, 7};
#   top-3 by loss alone would be {3, 4, 1}: rho drops sample 1, whose loss is irreducible.
HAND_TOP = {3: [3], 3.5: [3, 4, 7], 4: [3, 4, 7, 5]}


def ctx_for(policy_state, backend="reference", k=3, key=1234):
    return SelectionContext(state=policy_state, backend=get_backend(backend, "cpu"), epoch=0, k=k,
                            key=key, progress=0.0, time_mode=False)


def state_with(loss, seen):
    st = SampleState(len(loss))
    st.loss.copy_(torch.tensor(loss))
    st.seen.copy_(torch.tensor(seen, dtype=st.seen.dtype))
    return st


# ---- keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", available("cpu"))
def test_keys_and_selection_match_the_hand_computation(backend):
    pol = RHO(torch.tensor(IRR), explore=0.0)
    st = state_with(LOSS, [1] * 8)
    keys = pol.keys(ctx_for(st, backend))
    assert torch.equal(keys, torch.tensor(LOSS) - torch.tensor(IRR))
    for k, want in ((1, [3]), (3, [3, 4, 7]), (4, [3, 4, 7, 5])):
        got = pol.select(ctx_for(st, backend, k=k)).indices
        assert got.tolist() == want      # the hand top-k, in rank order, ties to the lower index
    loss_only = get_backend(backend, "cpu").select(torch.tensor(LOSS), 3).tolist()
    assert loss_only == [3, 4, 1]        # and not what the training loss alone picks


def test_sampler_end_to_end_selects_the_hand_top_k():
    """Observed losses are the EMA's first values; after the data are covered the epoch's
    selection is exactly the top of loss - irreducible."""
    s = fastsel.Sampler(8, policy="rho", budget=0.5, epochs=3, seed=2, irreducible=torch.tensor(IRR),
                        explore=0.0)
    picked = []
    for e in s.epochs():
        idx = torch.tensor(s.epoch_indices())
        picked.append(sorted(idx.tolist()))
        if e < 2:
            s.observe(torch.tensor(LOSS)[idx], idx)
        else:
            break
    assert sorted(picked[0] + picked[1]) == list(range(8))   # the first 1/B epochs cover the data
    assert picked[2] == [3, 4, 5, 7]


# ---- unseen samples ----------------------------------------------------------------------

def test_unseen_samples_come_first_uniformly_at_random():
    n = 100
    # Unseen samples go first even where their irreducible loss would rank them last.
    irr = torch.linspace(0.0, 50.0, n)
    s = fastsel.Sampler(n, policy="rho", budget=0.3, epochs=5, seed=0, irreducible=irr)
    epochs = []
    for _ in s.epochs():
        idx = torch.tensor(s.epoch_indices())
        epochs.append(set(idx.tolist()))
        s.observe(torch.full((len(idx),), 0.5), idx)
    first3 = epochs[0] | epochs[1] | epochs[2]
    assert len(first3) == 90                       # three disjoint draws of 30 unseen samples
    assert (set(range(n)) - first3) <= epochs[3]   # the last 10 unseen lead epoch 3
    assert sorted(epochs[0]) != list(range(30))    # random, not by index
    # Uniform among the unseen: over seeds, the first epoch's mean index is about (n-1)/2.
    means = []
    for seed in range(20):
        s = fastsel.Sampler(n, policy="rho", budget=0.3, epochs=2, seed=seed, irreducible=irr)
        means.append(sum(s.epoch_indices()) / 30)
    assert abs(sum(means) / len(means) - 49.5) < 4.0
    # keys: -inf for the unseen
    st = state_with([1.0, 2.0, 3.0], [1, 0, 1])
    keys = RHO(torch.zeros(3)).keys(ctx_for(st))
    assert keys[1] == float("-inf") and keys[0] == 1.0 and keys[2] == 3.0


def test_explore_share_is_drawn_outside_the_top():
    n = 200
    irr = torch.zeros(n)
    pol = RHO(irr, explore=0.25)
    loss = torch.arange(n, dtype=torch.float32)
    st = state_with(loss.tolist(), [1] * n)
    got = pol.select(ctx_for(st, k=40)).indices.tolist()
    assert len(got) == len(set(got)) == 40
    assert got[:30] == list(range(199, 169, -1))              # the top 30 by key
    assert all(i < 170 for i in got[30:])                     # 10 explored from the rest


# ---- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,err,match", [
    ([0.1, 0.2], TypeError, "irreducible must be a torch.Tensor"),
    (torch.tensor([1, 2]), ValueError, "irreducible must be a floating tensor"),
    (torch.zeros(2, 3), ValueError, r"irreducible must be a 1-D tensor.*\(2, 3\)"),
    (torch.zeros(0), ValueError, "irreducible must be a 1-D tensor"),
    (torch.tensor([0.0, float("nan"), 1.0]), ValueError, r"irreducible must hold finite.*index 1"),
    (torch.tensor([0.0, 1.0, float("inf")]), ValueError, r"irreducible must hold finite.*index 2"),
    (torch.tensor([0.0, 1e300], dtype=torch.float64), ValueError, "beyond float32's range"),
])
def test_bad_irreducible_is_refused_naming_it(bad, err, match):
    with pytest.raises(err, match=match):
        fastsel.Sampler(2, policy="rho", budget=0.5, epochs=1, irreducible=bad)


def test_irreducible_of_the_wrong_length_is_refused_at_the_first_selection():
    s = fastsel.Sampler(8, policy="rho", budget=0.5, epochs=1, irreducible=torch.zeros(5))
    with pytest.raises(ValueError, match=r"irreducible has 5 losses but the sampler has N=8"):
        s.epoch_indices()


def test_explore_and_missing_irreducible():
    with pytest.raises(ValueError, match="explore"):
        RHO(torch.zeros(3), explore=1.5)
    with pytest.warns(UserWarning, match="without irreducible="):
        pol = make_policy("rho")
    st = state_with([1.0, 3.0, 2.0], [1, 1, 1])
    assert pol.select(ctx_for(st, k=2)).indices.tolist() == [1, 2]   # the training loss alone


# ---- checkpoints -------------------------------------------------------------------------

def test_state_dict_round_trip_weights_only_and_no_aliasing():
    from helpers import train_epoch
    n = 157
    irr = torch.rand(n, generator=torch.Generator().manual_seed(0))
    mine = irr.clone()
    make = lambda t: fastsel.Sampler(n, policy="rho", budget=0.4, epochs=5, seed=11, irreducible=t)  # noqa: E731
    ref = make(irr)
    stream_ref = [i for _ in ref.epochs() for i in train_epoch(ref, 8)]
    mine.add_(100.0)                                   # the caller's tensor is not the policy's
    s = make(irr)
    assert s.policy.irreducible is not irr
    stream = []
    for e in s.epochs():
        if e == 3:
            stream += train_epoch(s, 8, stop_after=2)
            break
        stream += train_epoch(s, 8)
    sd = weights_only(s.state_dict())
    assert sd["policy_state"] == {}
    cfg = sd["config"]["policy"]
    assert cfg["irreducible_n"] == n and len(cfg["irreducible_sha256"]) == 64   # no N-sized tensor
    # Other irreducible losses: refused, and nothing written.
    other = make(irr + 1.0)
    before = other.state.state_dict()
    with pytest.raises(ValueError, match="irreducible_sha256"):
        other.load_state_dict(sd)
    assert all(torch.equal(v, other.state.state_dict()[k]) for k, v in before.items() if isinstance(v, torch.Tensor))
    r = make(irr)
    r.load_state_dict(sd)
    for _ in r.epochs():
        stream += train_epoch(r, 8)
    assert stream == stream_ref


# ---- the irreducible-loss helper -----------------------------------------------------------

def test_irreducible_losses_helper_trains_on_the_holdout_and_scores_the_train_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long()
    y_train = y[:100].clone()
    y_train[:10] = 1 - y_train[:10]                       # 10 mislabelled training samples
    hold, train = TensorDataset(x[100:], y[100:]), TensorDataset(x[:100], y_train)
    model_fn = lambda: torch.nn.Linear(4, 2)  # noqa: E731
    fit = fit_irreducible(model_fn, hold, train, epochs=30, batch_size=10, lr=0.1)
    assert fit.losses.shape == (100,) and fit.losses.dtype == torch.float32
    assert fit.train_passes == 30 * 20 and fit.eval_passes == 100 and fit.seconds > 0
    assert fit.losses[:10].mean() > 3 * fit.losses[10:].mean()   # mislabelled: high irreducible loss
    assert 0.7 <= fit.train_accuracy <= 0.9
    assert torch.equal(irreducible_losses(model_fn, hold, train, epochs=30, batch_size=10, lr=0.1), fit.losses)
    with pytest.raises(TypeError, match="model_fn must be a function"):
        fit_irreducible(torch.nn.Linear(4, 2), hold, train)
    with pytest.raises(ValueError, match="epochs"):
        fit_irreducible(model_fn, hold, train, epochs=0)


# ---- the redundant synthetic set ---------------------------------------------------------

def test_redundancy_generator_share_closeness_determinism():
    n = 400
    d = datasets.synthetic(n_train=n, n_test=50, redundancy=0.5, seed=3)
    copy = d.masks["near_copy"]
    assert int(copy.sum()) == d.info["near_copies"] == 200 and d.info["sources"] == 20
    x = d.train.tensors[0].flatten(1)
    rms = torch.cdist(x, x) / x.shape[1] ** 0.5
    rms.fill_diagonal_(float("inf"))
    nearest = rms.min(1).values
    assert nearest[copy].max() < 0.05       # every copy has a near-twin (noise 0.02 each)
    assert nearest[~copy].min() > 0.1       # originals do not (pixel noise 0.15)
    # Class counts, test set, and the data without copies are those of redundancy=0.
    base = datasets.synthetic(n_train=n, n_test=50, seed=3)
    assert torch.equal(torch.bincount(d.train.tensors[1]), torch.bincount(base.train.tensors[1]))
    assert torch.equal(d.test.tensors[0], base.test.tensors[0])
    assert not base.masks["near_copy"].any() and "near_copies" not in base.info
    again = datasets.synthetic(n_train=n, n_test=50, redundancy=0.5, seed=3)
    assert torch.equal(again.train.tensors[0], d.train.tensors[0]) and torch.equal(again.masks["near_copy"], copy)
    other = datasets.synthetic(n_train=n, n_test=50, redundancy=0.5, seed=4)
    assert not torch.equal(other.masks["near_copy"], copy)
    noisy = datasets.synthetic(n_train=n, n_test=50, redundancy=0.5, label_noise=0.2, seed=3)
    assert int(noisy.masks["noisy_label"].sum()) == noisy.info["noisy_labels"] > 0
    assert (noisy.masks["noisy_label"] & noisy.masks["near_copy"]).any()   # copies are flipped too
    with pytest.raises(ValueError, match="redundancy"):
        datasets.synthetic(redundancy=1.0)


def test_cli_redundancy_flag_is_checked(capsys):
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["compare", "--redundancy", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "redundancy is the share of near-copies" in err[-1] and "--redundancy" in err[-1]


# ---- compare charges rho's holdout model ------------------------------------------------

def test_rho_plan_charges_the_holdout_to_the_budget():
    p = rho_plan(RunSpec("rho", budget=0.3, epochs=10, seed=0), 100)
    assert (p.n_holdout, p.n_train, p.holdout_epochs, p.holdout_passes, p.eval_passes) == (10, 90, 10, 100, 90)
    assert p.budget == pytest.approx((0.3 * 100 * 10 - 100 - 90 / 3) / (90 * 10))
    p = rho_plan(RunSpec("rho", budget=0.3, epochs=10, seed=0, holdout=0.2, holdout_epochs=3), 100)
    assert (p.n_holdout, p.n_train, p.holdout_passes, p.eval_passes) == (20, 80, 60, 80)
    with pytest.raises(ValueError, match="nothing is left to train on"):
        rho_plan(RunSpec("rho", budget=0.1, epochs=10, seed=0), 100)
    # Time budgets: the holdout model's seconds come off rho's.
    s = make_sampler(RunSpec("rho", time_budget=5.0, epochs=3), 100, irreducible=torch.zeros(90), spent_s=1.5)
    assert s.n == 90 and s.budget.seconds == pytest.approx(3.5)


def test_train_one_rho_includes_the_holdout_in_passes_and_time():
    d = datasets.digits()
    x, y = d.train.tensors
    train = TensorDataset(x[:300], y[:300])
    spec = RunSpec("rho", budget=0.5, epochs=2, seed=1, batch_size=64)
    plan = rho_plan(spec, 300)
    r = train_one(spec, train, d.test, d.channels, d.size, d.classes)
    k = int(plan.n_train * plan.budget + 0.5)
    assert r.holdout_backward == plan.holdout_passes == 60 and r.holdout_forward == 60 + 270
    assert r.backward == k * 2 + 60 and r.forward == k * 2 + 330
    assert r.backward + r.holdout_forward - r.holdout_backward == r.forward
    assert r.backward + (r.forward - r.backward) / 3 <= 0.5 * 300 * 2 + 1   # within the budget
    assert r.passes_full == 300 * 2
    assert 0 < r.holdout_s <= r.wall_s
    assert sum(r.selection_counts) == plan.n_train
    u = train_one(RunSpec("uniform", budget=0.5, epochs=2, seed=1, batch_size=64), train, d.test,
                  d.channels, d.size, d.classes)
    assert (u.holdout_s, u.holdout_forward, u.holdout_backward) == (0.0, 0, 0) and u.forward == u.backward
    assert RunSpec("full").device == "cpu"


def test_compare_with_rho_charges_the_holdout_and_checks_the_plan(tmp_path, capsys):
    d = datasets.digits()
    x, y = d.train.tensors
    small = datasets.Data(TensorDataset(x[:300], y[:300]), d.test, "digits", d.channels, d.size, d.classes)
    specs = compare.plan(["rho"], [0.5], [0], 2, batch_size=64)
    assert [s.policy for s in specs] == ["full", "uniform", "rho"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the plan check's stand-in does not warn
        for spec in specs:
            make_sampler(spec, 300)      # what `fastsel compare` builds to check the plan
    runs = [r.to_dict() for r in compare.run(small, specs, show_progress=False)]
    rows = {r["policy"]: r for r in compare.aggregate(runs)}
    assert rows["rho"]["forward"] > rows["rho"]["backward"] and rows["uniform"]["forward"] == rows["uniform"]["backward"]
    rho = next(r for r in runs if r["policy"] == "rho")
    assert rho["holdout_s"] > 0 and rho["spec"]["holdout"] == 0.1 and rho["spec"]["device"] == "cpu"
    assert rho["forward"] - rho["backward"] == 270 and rho["passes_full"] == 600
    with pytest.raises(SystemExit) as e:   # a holdout the budget cannot pay for: an argument error
        main(["compare", "--epochs", "1", "--seeds", "1", "--budgets", "0.01", "--policies", "rho",
              "--no-progress", "--out", str(tmp_path / "never")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "irreducible-loss model" in err[-1] and err[-1].startswith("fastsel compare: error: argument")
