"""The loss-call benchmark (``fastsel.experiments.bench.bench_loss_cost``, ``fastsel bench``,
bench/bench_loss.py) on tiny shapes with the reference backend: rows, table and JSON have
the promised structure, both sides compute the same loss, and the sampler's epoch position
stays valid. No time is asserted."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastsel.experiments import bench
from fastsel.cli import main

TINY = [((8, 5), (8,)), ((2, 3, 4, 4), (2, 4, 4))]
ROW_KEYS = {"kind", "backend", "device", "logits_shape", "target_shape", "fastsel_s", "bare_s", "ratio",
            "ratio_paired", "ratio_paired_iqr", "overhead_us", "host_s", "bare_host_s",
            "ratio_min", "calls_per_block", "blocks", "N", "others_cpu_share", "target", "meets_target",
            "ratio_range", "ops_per_call", "ops", "bare_ops_per_call"}


def test_rows_have_the_promised_structure():
    rows = bench.run_loss_cost("cpu", ["reference"], cases=TINY, min_run_time=0.005, n=64)
    assert len(rows) == len(TINY)
    for r, (ls, ts) in zip(rows, TINY):
        assert set(r) == ROW_KEYS
        assert (r["kind"], r["backend"], r["device"]) == ("loss_cost", "reference", "cpu")
        assert r["logits_shape"] == list(ls) and r["target_shape"] == list(ts)
        assert r["fastsel_s"] > 0 and r["bare_s"] > 0 and r["host_s"] == pytest.approx(r["fastsel_s"], rel=0.5)
        assert r["ratio"] == pytest.approx(r["fastsel_s"] / r["bare_s"])
        assert r["ratio_paired_iqr"][0] <= r["ratio_paired"] <= r["ratio_paired_iqr"][1]
        assert r["blocks"] >= 5 and 1 <= r["calls_per_block"] <= 64 // ls[0]
        assert r["others_cpu_share"] is None or 0.0 <= r["others_cpu_share"] <= 1.0
        assert r["ratio_min"] > 0 and isinstance(r["meets_target"], bool) and r["target"].startswith("ratio <=")
        assert r["ratio_range"][0] <= r["ratio_paired"] <= r["ratio_range"][1]
        assert r["ops"][0] == "fastsel::ce_step_reference" and r["ops_per_call"] == len(r["ops"]) <= 3
        assert r["bare_ops_per_call"] >= 3
    text = bench.format_loss_cost(rows)
    assert "8x5" in text and "2x3x4x4" in text and "reference" in text and "ratio" in text
    json.dumps(rows)


def test_targets_follow_the_issue():
    assert bench.loss_target("cpu", (1, 2)) == (1.25, None)
    assert bench.loss_target("cpu", (256, 10)) == (1.0, None)
    assert bench.loss_target("cpu", (256, 100)) == (1.0, None)
    assert bench.loss_target("cpu", (16, 21, 64, 64)) == (1.0, None)
    assert bench.loss_target("cuda", (256, 1000)) == (None, 60.0)


def test_both_sides_compute_the_same_loss_and_the_position_stays_in_the_epoch():
    case = bench.LossCase("reference", (4, 3, 2, 2), (4, 2, 2), n=10)
    assert case.sampler.epoch == 0 and len(case.sampler) == 10
    idx = case.batches(2)
    assert [tuple(i.shape) for i in idx] == [(4,), (4,)]
    torch.testing.assert_close(case.sampler.loss(case.logits, case.target, idx[0], update=False),
                               F.cross_entropy(case.logits, case.target))
    for i in idx:
        case.fastsel(i)
    assert case.sampler.position == 8 and case.logits.grad is not None
    case.bare(idx[0])
    nxt = case.batches(1)  # 2 left of 10: a fresh epoch starts
    assert case.sampler.epoch == 1 and case.sampler.position == 0 and nxt[0].shape == (4,)


def test_cli_prints_the_loss_table_and_saves_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "LOSS_CASES", TINY)
    out = str(tmp_path / "b.json")
    assert main(["bench", "--backends", "reference", "--loss-only", "--min-run-time", "0.005", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "8x5" in text and "select" not in text  # --loss-only: no step/selection table
    doc = json.load(open(out))
    assert doc["command"].startswith("fastsel bench") and [r["kind"] for r in doc["results"]] == ["loss_cost"] * 2


def test_bench_script_writes_the_results_file(tmp_path, monkeypatch):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_loss.py")
    spec = importlib.util.spec_from_file_location("bench_loss_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(bench, "LOSS_CASES", TINY)
    out = str(tmp_path / "loss.json")
    assert mod.main(["--backends", "reference", "--min-run-time", "0.005", "--out", out]) == 0
    doc = json.load(open(out))
    assert {"device", "command", "machine", "rows"} <= set(doc)
    assert doc["device"] == "cpu" and "bench_loss.py" in doc["command"] and doc["machine"]["torch"]
    assert len(doc["rows"]) == 2 and set(doc["rows"][0]) == ROW_KEYS


def test_loop_bench_writes_its_results(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_loop.py")
    spec = importlib.util.spec_from_file_location("bench_loop_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = str(tmp_path / "loop.json")
    assert mod.main(["--runs", "2", "--epochs", "1", "--out", out]) == 0
    doc = json.load(open(out))
    assert len(doc["ratio_per_run"]) == 2 and doc["ratio_median"] > 0
    assert all(f > 0 and p > 0 for f, p in zip(doc["fastsel_s"], doc["plain_s"]))
    assert "bench_loop.py" in doc["command"]
