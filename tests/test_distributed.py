"""Two gloo ranks on the CPU: the same state and selection on every rank after each
selection pass, equal disjoint shards, and the same state a single process reaches."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsel
from helpers import train_epoch

pytestmark = pytest.mark.slow


def _worker(rank, world, init_file, out_dir, n, policy, kwargs):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = fastsel.Sampler(n, policy=policy, seed=5, **kwargs)
        assert (s.world_size, s.rank) == (world, rank)
        record = []
        for e in s.epochs():
            shard = s.epoch_indices()  # the selection pass: synchronises the state
            length = len(s)
            state = {k: v.clone() for k, v in s.state.state_dict().items() if isinstance(v, torch.Tensor)}
            trained = train_epoch(s, 8)
            assert trained == shard
            record.append({"epoch": e, "len": length, "shard": trained,
                           "selection": s.cursor.selection.tolist(), "state": state})
        s.set_epoch(s.epoch + 1)
        s.epoch_indices()  # a last pass merges the last epoch's updates
        final = {k: v.clone() for k, v in s.state.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"record": record, "final": final, "summary": dict(s.summary())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, n, policy, world=2, **kwargs):
    init = tmp_path / "init"
    mp.start_processes(_worker, args=(world, str(init), str(tmp_path), n, policy, kwargs),
                       nprocs=world, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single_process(n, policy, **kwargs):
    s = fastsel.Sampler(n, policy=policy, seed=5, num_replicas=1, rank=0, **kwargs)
    states = []
    for _ in s.epochs():
        s.epoch_indices()
        states.append({k: v.clone() for k, v in s.state.state_dict().items() if isinstance(v, torch.Tensor)})
        train_epoch(s, 8)
    return states


@pytest.mark.parametrize("policy", ["tftb", "p-sgd", "infobatch"])
def test_two_ranks_share_state_and_selection_with_disjoint_equal_shards(tmp_path, policy):
    n = 200
    kw = dict(budget=0.5, epochs=4)
    r0, r1 = run_ranks(tmp_path, n, policy, **kw)
    single = single_process(n, policy, **kw)
    for e, (a, b) in enumerate(zip(r0["record"], r1["record"])):
        assert a["selection"] == b["selection"]
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (e, k)
            # the same state one process reaches training every selected sample itself
            torch.testing.assert_close(a["state"][k], single[e][k], rtol=1e-6, atol=1e-7)
        assert len(a["shard"]) == len(b["shard"]) == a["len"] == 50
        assert not set(a["shard"]) & set(b["shard"])
        assert sorted(a["shard"] + b["shard"]) == sorted(a["selection"])
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert r0["summary"]["passes"] == 4 * 100
    # the per-epoch mean losses are the merged ones: equal on both ranks, one per epoch
    assert r0["summary"]["epoch_mean_losses"] == r1["summary"]["epoch_mean_losses"]
    assert len(r0["summary"]["epoch_mean_losses"]) == 4


@pytest.mark.parametrize("drop_last,per_rank", [(False, 51), (True, 50)])
def test_uneven_selection_pads_or_drops_to_equal_shards(tmp_path, drop_last, per_rank):
    r0, r1 = run_ranks(tmp_path, 201, "uniform", budget=0.5, epochs=2, drop_last=drop_last)
    for a, b in zip(r0["record"], r1["record"]):
        assert len(a["shard"]) == len(b["shard"]) == per_rank
        sel = a["selection"]
        assert len(sel) == 101
        union = a["shard"] + b["shard"]
        if drop_last:
            assert sorted(union) == sorted(sel[:100])
        else:
            assert set(union) == set(sel) and len(union) == 102  # one sample padded in


def test_time_budget_ranks_agree_on_epochs(tmp_path):
    r0, r1 = run_ranks(tmp_path, 64, "tftb", time_budget=1e6, epochs=3)
    assert [a["epoch"] for a in r0["record"]] == [b["epoch"] for b in r1["record"]] == [0, 1, 2]
    for a, b in zip(r0["record"], r1["record"]):
        assert a["selection"] == b["selection"]


# ---- Selective Backprop under DDP: every rank runs the same backward passes ----------------

def _sb_worker(rank, world, init_file, out_dir):
    import datetime

    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A collective the ranks disagree on fails after the timeout instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        model = DDP(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = fastsel.SelectiveStep(model, "sb", keep=0.4, share="expected", optimizer=opt, seed=rank)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        batches, pending = [], []
        for t in range(25):
            x = torch.randn(16, 6, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            step(x, y, torch.arange(16) + 16 * (t + 25 * rank))
            batches.append(step.last["backward_batches"])
            pending.append(step.pending)
        before_flush = step.pending
        step.flush()
        torch.save({"batches": batches, "pending": pending, "before_flush": before_flush,
                    "after_flush": step.pending, "summary": dict(step.summary()),
                    "params": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"sb{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_selective_backprop_ranks_agree_on_backward_batches(tmp_path):
    world = 2
    mp.start_processes(_sb_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    out = [torch.load(tmp_path / f"sb{r}.pt", weights_only=False) for r in range(world)]
    a, b = out
    assert a["batches"] == b["batches"]          # the same backward passes, step by step
    assert sum(a["batches"]) >= 2
    assert a["pending"] != b["pending"]          # the ranks did pool different numbers of rows
    assert all(x < 16 for x in a["batches"])
    for r in out:                                 # what the rank with the fewest had, no more
        assert r["after_flush"] == r["before_flush"] - min(a["before_flush"], b["before_flush"])
    for p, q in zip(a["params"], b["params"]):   # DDP kept the replicas identical
        torch.testing.assert_close(p, q, rtol=0, atol=0)
