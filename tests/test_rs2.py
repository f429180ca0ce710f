"""policy="rs2": RS2 without replacement (Okanovic et al. 2023) with exact epoch counts.

Each epoch is the next k samples of a seeded permutation, a new one drawn when it runs out;
at the wrap the old rest comes first and the new round puts the rest's samples last. Checked
through real Sampler loops: exact k, distinct samples, every sample trained j times before
any j + 1 times, the stream of the documented rule, seeds, time budgets, checkpoints and
two DDP ranks."""
import copy
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsel
from fastsel import rng
from fastsel.policies import RS2, SelectionContext
from fastsel.state import SampleState
from fastsel.validation.values import round_half_up
from helpers import train_epoch, weights_only

BUDGETS = [(97, 0.3), (97, 1.0), (100, 0.25), (60, 0.7), (7, 0.5), (1, 0.5)]


def run(n, budget, epochs, seed=0, **kw):
    """Each epoch's trained indices of a Sampler loop that calls loss() on every batch."""
    s = fastsel.Sampler(n, policy="rs2", budget=budget, epochs=epochs, seed=seed, **kw)
    return [train_epoch(s, 8) for _ in s.epochs()], s


def check_rounds(n, epochs, ks):
    """Exact, distinct k per epoch; after every epoch the counts differ by at most one (every
    sample trained j times before any j + 1 times); and at each wrap the old round's rest is
    not trained again in the next ⌊N/k⌋ − 1 epochs (it sits at the end of the new round)."""
    counts = torch.zeros(n, dtype=torch.int64)
    for e, (ep, k) in enumerate(zip(epochs, ks)):
        assert len(ep) == k and len(set(ep)) == k, e
        before = counts.clone()
        counts[ep] += 1
        assert int(counts.max() - counts.min()) <= 1, e
        low = int(before.min())
        rest = [i for i in ep if before[i] == low]
        if rest and len(rest) < k and all(k_ == k for k_ in ks):   # a wrap with a rest
            later = {i for x in epochs[e + 1:e + n // k] for i in x}
            assert not later & set(rest), e
    return counts


@pytest.mark.parametrize("n,budget", BUDGETS)
def test_every_sample_is_trained_once_per_round_with_exact_k(n, budget):
    epochs, s = run(n, budget, 40)
    k = round_half_up(n * budget)
    assert len(epochs) == 40 and s.budget.epoch_counts == [k] * 40
    counts = check_rounds(n, epochs, [k] * 40)
    assert int(counts.sum()) == 40 * k
    first = -(-n // k)                      # ⌈N/k⌉ epochs cover the data once
    assert set().union(*map(set, epochs[:first])) == set(range(n))
    assert len(set().union(*map(set, epochs[:n // k]))) == (n // k) * k   # disjoint
    assert s.policy.state_dict()["round"] == -(-40 * k // n)


def oracle(n, keys, ks):
    """The documented rule, written from the docstring with plain Python lists."""
    def perm(key, late):
        h = rng.hash_indices(torch.arange(n), key, rng.STREAM_SELECT).tolist()
        return sorted(range(n), key=lambda i: (i in late, h[i]))
    order, off, out = None, 0, []
    for key, k in zip(keys, ks):
        if order is not None and k <= n - off:
            out.append(order[off:off + k])
            off += k
            continue
        rest = [] if order is None else order[off:]
        order = perm(key, set(rest))
        out.append(rest + order[:k - len(rest)])
        off = k - len(rest)
    return out


def epoch_keys(seed, epochs):
    return [rng.epoch_key(torch.Generator(), seed, e) for e in range(epochs)]


@pytest.mark.parametrize("n,budget", [(97, 0.3), (100, 0.25), (7, 0.5)])
def test_the_stream_is_the_documented_rule_and_follows_the_seed(n, budget):
    a, _ = run(n, budget, 12, seed=3)
    k = round_half_up(n * budget)
    want = oracle(n, epoch_keys(3, 12), [k] * 12)
    assert [sorted(x) for x in a] == [sorted(x) for x in want]
    assert a != want                          # the selection pass shuffles within the epoch
    assert run(n, budget, 12, seed=3)[0] == a
    other, _ = run(n, budget, 12, seed=4)
    assert other != a and sorted(other[0]) != sorted(a[0])


class Varying(RS2):
    """RS2 whose share per epoch (under a time budget) cycles, so k varies."""

    shares = (0.3, 0.55, 1.0, 0.01, 0.9, 0.45)
    draws = 0

    def time_share(self) -> float:
        return self.shares[self.draws % len(self.shares)]

    def select(self, ctx):
        self.draws += 1
        return super().select(ctx)


def test_a_varying_k_keeps_every_epoch_distinct_and_the_rounds_whole():
    n, ks = 97, []
    s = fastsel.Sampler(n, policy=Varying(), time_budget=1e9, epochs=30, seed=2)
    epochs = []
    for _ in s.epochs():
        ks.append(len(s))
        epochs.append(train_epoch(s, 8))
    assert ks == s.budget.epoch_counts and len(set(ks)) >= 4 and n in ks
    check_rounds(n, epochs, ks)
    assert [sorted(x) for x in epochs] == [sorted(x) for x in oracle(n, epoch_keys(2, 30), ks)]


def test_a_time_budget_ends_mid_round_and_the_stream_is_unchanged(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(fastsel.budget, "now", lambda: clock[0])
    n = 97
    s = fastsel.Sampler(n, policy="rs2", time_budget=30.0, keep=0.3, seed=1)
    epochs = []
    for _ in s.epochs():
        ep = []
        for i in s:
            clock[0] += 0.125
            train_batch = torch.tensor([i])
            s.loss(torch.zeros(1, 5), train_batch % 5, train_batch)
            ep.append(i)
        epochs.append(ep)
    assert clock[0] == 30.0 and sum(map(len, epochs)) == 240   # 240 rows of 0.125 s
    assert [len(x) for x in epochs] == [29] * 8 + [8]
    want = oracle(n, epoch_keys(1, 9), [29] * 9)
    assert [sorted(x) for x in epochs[:8]] == [sorted(x) for x in want[:8]]
    assert set(epochs[8]) <= set(want[8])
    check_rounds(n, epochs[:8], [29] * 8)


def test_selecting_by_hand_on_the_state_device_needs_no_host_sync():
    """The policy alone: selections are int64 on the state's device, each round a
    permutation; the same calls on a fresh instance give the same selections."""
    n = 50
    state = SampleState(n, "cpu")

    def draws(p):
        out = []
        for e, k in enumerate([50, 13, 40, 1, 50, 7, 29]):
            ctx = SelectionContext(state=state, backend=None, epoch=e, k=k, key=1000 + e,
                                   progress=0.0, time_mode=True)
            sel = p.select(ctx).indices
            assert sel.dtype == torch.int64 and sel.device == state.device and sel.numel() == k
            out.append(sel.tolist())
        return out

    a = draws(RS2())
    assert a == draws(RS2())
    check_rounds(n, a, [len(x) for x in a])


def resume_stream(n, budget, epochs, cut_epoch, cut_batches, seed=5):
    """The stream of a run saved at (cut_epoch, after cut_batches batches; None: at the
    epoch's end) and resumed in a fresh sampler: what it trained before and after."""
    s = fastsel.Sampler(n, policy="rs2", budget=budget, epochs=epochs, seed=seed)
    before = []
    for e in s.epochs():
        before += train_epoch(s, 8, stop_after=cut_batches if e == cut_epoch else None)
        if e == cut_epoch:
            break
    sd = weights_only(s.state_dict())
    t = fastsel.Sampler(n, policy="rs2", budget=budget, epochs=epochs, seed=seed)
    t.load_state_dict(sd)
    after = []
    for _ in t.epochs():
        after += train_epoch(t, 8)
    return before, after, sd["policy_state"], t


@pytest.mark.parametrize("cut_epoch,cut_batches", [(1, 2), (3, 1), (3, None), (4, None), (6, 3)])
def test_a_checkpoint_mid_permutation_resumes_the_exact_stream(cut_epoch, cut_batches):
    n, budget, epochs = 97, 0.3, 10
    whole, ref = run(n, budget, epochs, seed=5)
    flat = [i for ep in whole for i in ep]
    before, after, ps, t = resume_stream(n, budget, epochs, cut_epoch, cut_batches)
    assert before + after == flat and len(before) < len(flat)
    assert ps["round"] == (1 if cut_epoch < 3 else 2 if cut_epoch < 6 else 3)
    if cut_epoch in (3, 6):       # saved in a wrap epoch: the old rest sits at the round's end
        assert ps["deferred"].numel() == (97 - 87 if cut_epoch == 3 else 2 * 97 - 6 * 29)
    assert t.policy.state_dict()["offset"] == ref.policy.state_dict()["offset"]
    assert torch.equal(t.state.seen, ref.state.seen)


def _set(sd, key, value):
    sd = copy.deepcopy(sd)
    if value is _DEL:
        del sd[key]
    else:
        sd[key] = value
    return sd


_DEL = object()
BAD = [
    ("round", -1, r"'policy_state.round' must be >= 0"),
    ("round", True, r"'policy_state.round' must be an int"),
    ("round", 0, r"'policy_state.key' must be None with round=0"),
    ("key", None, r"'policy_state.key' must be an int with round=2"),
    ("key", 2 ** 32, r"'policy_state.key' must be in \[0, 4294967295\]"),
    ("offset", 0, r"'policy_state.offset' must be in \[1, 97\]"),
    ("offset", 98, r"'policy_state.offset' must be in \[1, 97\]"),
    ("n", 0, r"'policy_state.n' must be >= 1"),
    ("deferred", [1, 2], r"'policy_state.deferred' must be a 1-D int64 tensor"),
    ("deferred", torch.zeros(3), r"'policy_state.deferred' must be a 1-D int64 tensor"),
    ("deferred", torch.tensor([5, 97]), r"'policy_state.deferred' has 1 entry above 96"),
    ("deferred", torch.tensor([-1, 4]), r"'policy_state.deferred' has 1 entry below 0"),
    ("deferred", torch.tensor([4, 9, 4]), r"'policy_state.deferred' holds sample 4 twice"),
    ("deferred", torch.arange(97), r"'policy_state.deferred' must hold fewer than n=97"),
    ("offset", _DEL, r"'policy_state.offset' is missing"),
    ("bogus", 1, r"'policy_state.bogus' is not a field"),
]


@pytest.mark.parametrize("key,value,match", BAD, ids=[f"{c[0]}={c[1]!r:.12}" for c in BAD])
def test_a_corrupt_policy_state_is_refused_by_name_and_changes_nothing(key, value, match):
    src = fastsel.Sampler(97, policy="rs2", budget=0.3, epochs=10, seed=5)
    for _ in zip(src.epochs(), range(5)):
        train_epoch(src, 8)
    good = src.state_dict()
    assert good["policy_state"]["round"] == 2 and good["policy_state"]["deferred"].numel() == 10
    bad = dict(good, policy_state=_set(good["policy_state"], key, value))
    t = fastsel.Sampler(97, policy="rs2", budget=0.3, epochs=10, seed=5)
    for _ in zip(t.epochs(), range(2)):
        train_epoch(t, 8)
    before = weights_only(t.state_dict())
    with pytest.raises(ValueError, match=match):
        t.policy.check_state_dict(bad["policy_state"])
    with pytest.raises(ValueError, match=match):
        t.load_state_dict(bad)
    after = t.state_dict()
    assert after["policy_state"]["round"] == before["policy_state"]["round"]
    assert after["policy_state"]["offset"] == before["policy_state"]["offset"]
    assert torch.equal(after["policy_state"]["deferred"], before["policy_state"]["deferred"])
    assert (after["epoch"], after["position"]) == (before["epoch"], before["position"])
    t.load_state_dict(good)                      # the unmodified one loads
    assert t.policy.state_dict()["offset"] == good["policy_state"]["offset"]


def _rank(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = fastsel.Sampler(97, policy="rs2", budget=0.3, epochs=6, seed=7)
        rec = []
        for _ in s.epochs():
            shard = s.epoch_indices()
            for i in range(0, len(shard), 8):
                idx = torch.tensor(shard[i:i + 8])
                s.loss(torch.zeros(len(idx), 5), idx % 5, idx)
            rec.append({"shard": shard, "selection": s.cursor.selection.tolist()})
        torch.save(rec, os.path.join(out_dir, f"rs2_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_draw_the_same_selection_and_disjoint_covering_shards(tmp_path):
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rs2_rank{r}.pt") for r in range(2))
    single, _ = run(97, 0.3, 6, seed=7)
    for a, b, one in zip(r0, r1, single):
        assert a["selection"] == b["selection"] == one      # the single process's stream
        assert len(a["shard"]) == len(b["shard"]) == 15      # 29 selected, one padded in
        assert set(a["shard"]) | set(b["shard"]) == set(a["selection"])
        assert set(a["shard"]) & set(b["shard"]) == {a["selection"][0]}
    check_rounds(97, [x["selection"] for x in r0], [29] * 6)


def test_the_policies_page_example_runs(tmp_path, monkeypatch):
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "policies.md")) as f:
        block = next(b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S)
                     if 'policy="rs2"' in b)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "docs/policies.md", "exec"), scope)
    assert scope["sampler"].summary()["samples_never_selected"] == 0
    assert scope["uniform"].summary()["samples_never_selected"] > 100


def test_rs2_is_registered():
    assert fastsel.POLICIES["rs2"] is RS2
    p = fastsel.Sampler(10, policy="rs2", time_budget=5, keep=0.4).policy
    assert isinstance(p, RS2) and p.keep == 0.4 and p.state_dict()["round"] == 0
    with pytest.raises(ValueError, match="keep must be in"):
        RS2(keep=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_stream_is_the_cpus_and_selecting_never_syncs():
    n, ks = 1000, [300, 300, 300, 300, 1000, 7, 999]

    def draws(device, sync_check):
        state, p, out = SampleState(n, device), RS2(), []
        for e, k in enumerate(ks):
            ctx = SelectionContext(state=state, backend=None, epoch=e, k=k, key=77 + e,
                                   progress=0.0, time_mode=True)
            if sync_check:
                torch.cuda.set_sync_debug_mode("error")
            try:
                sel = p.select(ctx).indices
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert sel.device == state.device
            out.append(sel)
        return [x.cpu().tolist() for x in out]

    assert draws("cuda", True) == draws("cpu", False)
