"""The comparison harness's facts (issue 22): the 95% t-interval, the verdict's rule, pass
counting (rho's holdout model, the batch policies' selection forwards), flagged seed times,
the warm-up, --n-train on digits, batch-level policies through `fastsel compare`, one ratio
direction in `fastsel bench`, and the plots (files, one colour per policy across plots)."""
import math
import os

import pytest

import fastsel
from fastsel.cli import main
from fastsel.experiments import bench, compare, datasets, plots, stats
from fastsel.experiments.tables import aggregate, format_table, verdict
from fastsel.experiments.train import RunSpec, train_one


def test_t_interval_against_a_hand_computed_value():
    # xs = 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3) = 1.2910, t(0.975, 3) = 3.1824,
    # half-width = 3.1824 * 1.2910 / 2 = 2.0543.
    iv = stats.interval([1.0, 2.0, 3.0, 4.0])
    assert iv.n == 4 and iv.mean == 2.5
    assert iv.lo == pytest.approx(0.4457, abs=1e-3) and iv.hi == pytest.approx(4.5543, abs=1e-3)
    assert not stats.interval([3.0]).defined and math.isnan(stats.interval([3.0]).lo)
    # the table used without scipy: the textbook values, and the expansion past df = 30
    assert stats.t_quantile(1, use_scipy=False) == 12.706 and stats.t_quantile(2, use_scipy=False) == 4.303
    assert stats.t_quantile(60, use_scipy=False) == pytest.approx(2.000, abs=1e-3)
    assert stats.t_quantile(120, use_scipy=False) == pytest.approx(1.980, abs=1e-3)
    scipy = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 10, 29, 30, 31, 45, 200):
        assert stats.t_quantile(df, use_scipy=False) == pytest.approx(scipy.t.ppf(0.975, df), abs=1e-3)


def test_the_verdict_rule_on_constructed_gaps():
    image = 0.1  # one test image of 1000, in points
    assert stats.standing(stats.Interval(0.5, 0.2, 0.8, 3), image) == "better"
    assert stats.standing(stats.Interval(0.08, 0.02, 0.14, 3), image) == "level"    # excludes 0, < 1 image
    assert stats.standing(stats.Interval(0.1, 0.05, 0.15, 3), image) == "level"     # exactly one image ties
    assert stats.standing(stats.Interval(0.5, -0.1, 1.1, 3), image) == "level"      # includes 0
    assert stats.standing(stats.Interval(-0.5, -0.8, -0.2, 3), image) == "worse"
    assert stats.standing(stats.Interval(0.5, math.nan, math.nan, 1), image) == "?"


def runs_of(accs, test_size=1000, budget="0.3", wall=None):
    return [dict(policy=p, budget=budget, seed=s, accuracy=a / 100, wall_s=(wall or {}).get((p, s), 1.0),
                 selection_s=0.0, forward=10, backward=10, passes_full=30, entropy=0.0, test_size=test_size)
            for p, xs in accs.items() for s, a in enumerate(xs)]


def test_the_verdict_and_table_use_the_paired_interval():
    runs = runs_of({"uniform": [90.0, 91.0, 92.0], "tftb": [92.0, 93.1, 93.9], "p-sgd": [93.0, 90.0, 93.0],
                    "infobatch": [90.05, 91.05, 92.05], "rho": [85.0, 86.2, 86.9]})
    rows = aggregate(runs, "uniform")
    by = {r["policy"]: r for r in rows}
    gaps = [2.0, 2.1, 1.9]
    half = stats.t_quantile(2) * stats.mean_std(gaps)[1] / math.sqrt(3)
    assert by["tftb"]["gap"].mean == pytest.approx(2.0) and by["tftb"]["gap"].lo == pytest.approx(2.0 - half)
    assert [by[p]["standing"] for p in ("tftb", "p-sgd", "infobatch", "rho")] == ["better", "level", "level", "worse"]
    text = verdict(rows, runs)
    assert "better tftb (+2.00 [" in text and "worse rho" in text and "level" in text and "p-sgd" in text
    table = format_table(rows)
    assert "gap to uniform, 95% CI" in table and "baseline" in table and "+2.00 [+1.75, +2.25]" in table
    one = runs_of({"uniform": [90.0], "tftb": [95.0]})
    assert "cannot be judged" in verdict(aggregate(one), one)
    # rs2 as the baseline; a file without it falls back to uniform
    with_rs2 = runs + runs_of({"rs2": [92.0, 93.0, 94.0]})
    assert aggregate(with_rs2, "rs2")[0]["baseline"] == "rs2" and aggregate(runs, "rs2")[0]["baseline"] == "uniform"


def test_a_seed_whose_time_is_an_outlier_is_flagged():
    runs = runs_of({"full": [99, 99, 99], "uniform": [90, 91, 92]}, budget="0.3",
                   wall={("uniform", 1): 10.0})
    for r in runs:
        r["budget"] = "1" if r["policy"] == "full" else "0.3"
    assert set(stats.time_outliers(runs)) == {("uniform", "0.3", 1)}
    rows = aggregate(runs)
    assert next(r for r in rows if r["policy"] == "uniform")["time_outlier"]
    assert "! uniform at 0.3, seed 1: 10.00 s against 1.00 s for its fastest other seed" in verdict(rows, runs)
    assert " !" in format_table(rows)
    two = runs_of({"uniform": [90, 91]}, wall={("uniform", 1): 1.6})       # two seeds: the slow one
    assert set(stats.time_outliers(two)) == {("uniform", "0.3", 1)}
    jitter = runs_of({"uniform": [90, 91]}, wall={("uniform", 0): 0.04, ("uniform", 1): 0.2})  # 5x, 0.16 s
    assert not stats.time_outliers(jitter)


@pytest.fixture(scope="module")
def small():
    d = datasets.subset(datasets.digits(), 256, 100)
    return d


def run(small, policy, budget=0.5, epochs=2):
    return train_one(RunSpec(policy, budget=budget, epochs=epochs, seed=0, batch_size=32), small.train,
                     small.test, small.channels, small.size, small.classes).to_dict()


def test_passes_are_counted_for_rho_and_sb(small):
    uni, rho, sb = run(small, "uniform"), run(small, "rho"), run(small, "sb")
    full = 256 * 2
    assert uni["passes_full"] == rho["passes_full"] == sb["passes_full"] == full
    assert uni["forward"] == uni["backward"] == 256
    assert stats.passes_saved(uni) == pytest.approx(0.5)
    # rho: its holdout model's training (2 epochs x 26) and scoring (230, forward only) count
    assert rho["holdout_backward"] == 2 * 26 and rho["holdout_forward"] == 2 * 26 + 230
    assert stats.pass_cost(rho) == pytest.approx(rho["backward"] + (rho["forward"] - rho["backward"]) / 3)
    assert stats.passes_saved(rho) == pytest.approx(0.5, abs=0.01)     # the same budget as uniform
    assert 1 - rho["backward"] / full > 0.55                           # what the old column showed
    # sb: the backward passes of uniform at the same budget, plus a selection forward per sample
    assert sb["backward"] == uni["backward"]
    assert sb["forward"] == full + sb["backward"]
    assert stats.passes_saved(sb) == pytest.approx(0.5 - 1 / 3)
    assert sum(i * c for i, c in enumerate(sb["selection_counts"])) == sb["backward"]


def test_warm_up_runs_each_policy_once_untimed_before_the_timed_runs(monkeypatch, small):
    calls = []
    monkeypatch.setattr(compare, "train_one", lambda spec, train, *a: calls.append((spec.policy, spec.epochs,
                                                                                   len(train))))
    specs = compare.plan(["tftb", "rho"], [0.3], [0, 1], 3)
    compare.run(small, specs, show_progress=False)
    warm = calls[:len(calls) - len(specs)]
    assert sorted(p for p, _, _ in warm) == ["full", "full", "tftb", "uniform"]   # rho warms as full
    assert all(e == 1 and n == min(256, compare.WARM_UP_SAMPLES) for _, e, n in warm)
    assert [c[1] for c in calls[len(warm):]] == [3] * len(specs)


def test_compare_runs_batch_level_policies_on_a_digits_subset(tmp_path, capsys):
    out = str(tmp_path / "b")
    assert main(["compare", "--n-train", "200", "--n-test", "100", "--policies", "sb,osgd,sift", "--budgets",
                 "0.5", "--epochs", "1", "--seeds", "2", "--baseline", "uniform", "--no-progress",
                 "--out", out]) == 0
    text = capsys.readouterr().out
    assert "digits: 200 train / 100 test images" in text          # --n-train honoured
    assert "osgd, sb, sift: batch-level" in text and "gap to uniform" in text
    from fastsel.experiments.report import load_results
    doc = load_results(out)
    rows = {r["policy"]: r for r in aggregate(doc["runs"], doc["meta"]["baseline"])}
    for p in ("sb", "osgd", "sift"):
        assert rows[p]["forward"] > rows[p]["backward"] and rows[p]["passes_saved"] < 0.5
    assert abs(rows["sb"]["backward"] - rows["uniform"]["backward"]) <= 1
    for name in plots.plots(doc):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif("rs2" not in fastsel.POLICIES, reason="rs2 is not registered yet")
def test_rs2_is_the_default_baseline_and_a_row_of_the_main_job(tmp_path, capsys):
    assert compare.default_baseline() == "rs2" and "rs2" in compare.default_policies()
    out = str(tmp_path / "r")
    assert main(["run", "--epochs", "1", "--seeds", "2", "--policies", "uniform", "--no-progress",
                 "--out", out]) == 0
    text = capsys.readouterr().out
    assert "gap to rs2, 95% CI" in text and "against rs2" in text
    assert any(l.split()[:2] == ["rs2", "0.3"] for l in text.splitlines())


def test_bench_ratios_point_one_way():
    step = [{"kind": "step", "backend": "x", "B": 4, "C": 2, "fused_s": 1e-3, "plain_s": 2e-3},
            {"kind": "select", "backend": "x", "N": 10, "select_s": 3e-3, "topk_s": 1e-3}]
    text = bench.format_results(step)
    assert text.splitlines()[0].startswith("step and selection; " + bench.RATIO_RULE)
    assert " 0.50x" in text and " 3.00x" in text                     # fastsel / plain
    loss = bench.format_loss_cost([])
    assert loss.splitlines()[0].startswith("loss call; " + bench.RATIO_RULE)


def _handle_colours(ax):
    """{policy: the colour its legend entry was drawn in} for one plot."""
    from matplotlib.colors import to_hex
    out = {}
    handles = ax.get_legend().legend_handles if ax.get_legend() else []
    for h, label in zip(*ax.get_legend_handles_labels()):
        name = label.split(" ")[0]
        if name not in fastsel.POLICIES:
            continue
        if hasattr(h, "patches"):                   # bars
            out[name] = to_hex(h.patches[0].get_facecolor())
        elif hasattr(h, "lines"):                   # error bars
            out[name] = to_hex(h.lines[0].get_color())
        elif hasattr(h, "get_edgecolor") and not hasattr(h, "get_color"):   # step outlines
            out[name] = to_hex(h.get_edgecolor())
        else:
            out[name] = to_hex(h.get_color())
    for h in handles:                               # a legend of proxy artists
        if h.get_label() in fastsel.POLICIES and hasattr(h, "get_color"):
            out.setdefault(h.get_label(), to_hex(h.get_color()))
    return out


def test_plots_read_at_a_glance_and_keep_each_policys_colour(tmp_path, monkeypatch):
    runs = runs_of({"uniform": [90.0, 91.0, 99.9], "tftb": [92.0, 93.1, 99.95], "infobatch": [90, 91, 92]})
    runs += [dict(r, policy="full", budget="1", accuracy=0.99) for r in runs if r["policy"] == "uniform"]
    for r in runs:
        r["selection_counts"] = [5, 3, 2]
    seen = {}
    real = plots._finish

    def record(fig, ax, xlabel, ylabel, title, out_dir, name, legend=True):
        path = real(fig, ax, xlabel, ylabel, title, out_dir, name, legend)
        seen[name] = (_handle_colours(ax), [t.get_text() for t in ax.get_xticklabels()], ax.get_ylim())
        return path
    monkeypatch.setattr(plots, "_finish", record)
    doc = {"meta": {"baseline": "uniform"}, "runs": runs}
    paths = plots.plot(doc, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == sorted(plots.plots(doc))
    assert all(os.path.getsize(p) > 1000 for p in paths)
    for p in ("uniform", "tftb", "infobatch"):
        drawn = {name: c[p] for name, (c, _, _) in seen.items() if p in c}
        assert len(drawn) >= 3 and set(drawn.values()) == {plots.colour(p)}, (p, drawn)
    assert len({plots.colour(p) for p in plots.KNOWN}) == len(plots.KNOWN)
    ticks, ylim = seen["accuracy_vs_budget.png"][1], seen["accuracy_vs_budget.png"][2]
    assert ticks == ["uniform", "tftb", "infobatch"]               # one budget: policies side by side
    assert max(r["accuracy_range"][1] for r in aggregate(runs)) <= 100 and ylim[1] < 101
