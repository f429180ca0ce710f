"""The command line end to end on tiny settings: run, compare (every dataset kind, time
budgets), report, bench, backends; results files are written and readable; bad arguments
are refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastsel
from fastsel.experiments import bench, compare, datasets
from fastsel.cli import build_parser, main
from fastsel.experiments.report import plots, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def rows_of(out, names):
    return [l.split() for l in out.splitlines() if l.split() and l.split()[0] in names]


def assert_report(out_dir):
    doc = json.load(open(os.path.join(out_dir, "results.json")))
    assert doc["runs"] and doc["meta"]["machine"]["torch"]
    md = open(os.path.join(out_dir, "results.md")).read()
    assert "| policy |" in md and "uniform" in md and "full" in md
    names = plots(doc)
    assert any(n.startswith("selection_counts_") for n in names)   # one per budget
    for p in names:
        with open(os.path.join(out_dir, p), "rb") as f:
            assert f.read(8) == PNG
    return doc


def test_run_prints_the_table_and_writes_results(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", "--epochs", "2", "--seeds", "2", "--policies", "uniform,tftb", "--no-progress",
                 "--out", out]) == 0
    text = capsys.readouterr().out
    rows = rows_of(text, ("full", "uniform", "tftb"))
    assert len(rows) == 3
    assert rows[0][1] == "1" and rows[0][-1] == "0%"
    assert rows[1][1] == "0.3" and rows[1][-1] == "70%" and "±" in rows[1]
    base = compare.default_baseline()
    assert f"against {base}" in text and "paired over 2 seeds" in text   # a 95% interval needs 2 seeds
    doc = assert_report(out)
    assert len(doc["runs"]) == 2 * (3 + (base != "uniform")) and doc["meta"]["command"].startswith("fastsel run")
    assert doc["meta"]["baseline"] == base
    full = [r for r in doc["runs"] if r["policy"] == "full"]
    assert all(r["backward"] == r["passes_full"] for r in full)
    assert sum(sum(r["selection_counts"][1:]) for r in full) > 0


def test_compare_synthetic_with_noise_and_imbalance(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert main(["compare", "--dataset", "synthetic", "--n-train", "200", "--n-test", "50", "--label-noise",
                 "0.2", "--imbalance", "0.2", "--budgets", "0.3,0.5", "--epochs", "2", "--seeds", "1",
                 "--policies", "p-sgd", "--batch-size", "64", "--no-progress", "--out", out]) == 0
    rows = rows_of(capsys.readouterr().out, ("full", "uniform", "p-sgd"))
    assert [(r[0], r[1]) for r in rows] == [("full", "1"), ("uniform", "0.3"), ("p-sgd", "0.3"),
                                            ("uniform", "0.5"), ("p-sgd", "0.5")]
    assert "label_noise" in assert_report(out)["meta"]["dataset"]


def test_compare_under_a_time_budget(tmp_path, capsys):
    out = str(tmp_path / "t")
    assert main(["compare", "--time-budget", "0.3", "--seeds", "1", "--policies", "tftb", "--no-progress",
                 "--out", out]) == 0
    rows = rows_of(capsys.readouterr().out, ("full", "uniform", "tftb"))
    assert [r[1] for r in rows] == ["0.3s"] * 3 and all(r[-1] == "-" for r in rows)
    doc = assert_report(out)
    assert all(r["wall_s"] >= 0.3 for r in doc["runs"])


def test_synthetic_dataset_options():
    d = datasets.synthetic(n_train=1000, n_test=100, label_noise=0.3, imbalance=0.1, seed=1)
    counts = d.info["class_counts"]
    assert counts == sorted(counts, reverse=True) and counts[-1] / counts[0] == pytest.approx(0.1, abs=0.02)
    assert abs(d.info["noisy_labels"] / len(d.train) - 0.3) < 0.05
    x, y = d.train.tensors
    assert x.shape[1:] == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = datasets.synthetic(n_train=1000, n_test=100, label_noise=0.3, imbalance=0.1, seed=1)
    assert (again.train.tensors[0] == x).all()  # seeded
    with pytest.raises(ValueError, match="label_noise"):
        datasets.synthetic(label_noise=1.0)


def test_image_folder_and_beton_datasets(tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    d = datasets.load(f"folder:{root}", size=16)
    assert d.classes == 2 and d.info["classes"] == ["cat", "dog"]
    assert len(d.train) + len(d.test) == 12 and d.train.tensors[0].shape[1:] == (3, 16, 16)
    pytest.importorskip("ffcv")
    from fastsel.ffcv import write_beton
    x, y = d.train.tensors
    path = write_beton([(x[i], int(y[i])) for i in range(len(y))], str(tmp_path / "t.beton"))
    b = datasets.load(f"beton:{path},{path}")
    assert len(b.train) == len(y) and b.classes == 2
    np.testing.assert_allclose(b.train.tensors[0].numpy(), np.rint(x.numpy() * 255) / 255, atol=1e-6)
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load(f"folder:{tmp_path / 'nope'}")


def test_report_rerenders_and_refuses_a_folder_without_results(tmp_path, capsys):
    out = str(tmp_path / "r")
    specs = compare.plan(["uniform"], [0.5], [0], 1)
    compare.save(compare.run(datasets.digits(), specs, show_progress=False), out, {"command": "test"})
    os.remove(os.path.join(out, "results.md"))
    assert main(["report", out]) == 0
    assert "| policy |" in capsys.readouterr().out
    assert_report(out)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2
    assert "no results.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        write_report(str(tmp_path / "missing"))


def test_bench_measures_every_available_backend(tmp_path, capsys):
    rows = bench.run_all("cpu", ["reference"], quick=True, min_run_time=0.01)
    assert {r["kind"] for r in rows} == {"step", "select"}
    assert all(r.get("fused_s", r.get("select_s")) > 0 for r in rows)
    text = bench.format_results(rows)
    assert "reference" in text and "ratio" in text
    out = str(tmp_path / "b.json")
    assert main(["bench", "--backends", "reference", "--out", out]) == 0
    assert json.load(open(out))["results"]
    with pytest.raises(SystemExit) as e:
        main(["bench", "--backends", "bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv,msg", [
    (["run", "--budget", "0"], "budget must be a number in (0, 1], got 0"),
    (["run", "--budget", "x"], "budget must be a number in (0, 1], got 'x'"),
    (["run", "--epochs", "-1"], "positive integer"),
    (["run", "--policies", "uniform,bogus"], "unknown policy"),
    (["compare", "--budgets", "0.2,2"], "budget must be a number in (0, 1], got 2"),
    (["compare", "--time-budget", "0"], "seconds > 0"),
    (["compare", "--dataset", "cifar"], "dataset must be"),
    (["compare", "--label-noise", "1"], "[0, 1)"),
    (["compare", "--imbalance", "0"], "(0, 1]"),
    (["report"], "results_dir"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_refused(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


# Every argument error of every subcommand, through main() as the console script runs it:
# (argv, the argument the error line must name). {file}: an existing file; {dir}: an empty
# folder; {missing}: a path that does not exist; {classes}: a folder with a class sub-folder
# but no images; {badjson}/{noruns}: folders whose results.json is not JSON / has no runs.
BAD_ARGUMENTS = [
    (["run", "--budget", "0"], "--budget"),
    (["run", "--budget", "x"], "--budget"),
    (["run", "--budget", "nan"], "--budget"),
    (["run", "--budget"], "--budget"),
    (["run", "--epochs", "0"], "--epochs"),
    (["run", "--epochs", "2.5"], "--epochs"),
    (["run", "--seeds", "-1"], "--seeds"),
    (["run", "--batch-size", "0"], "--batch-size"),
    (["run", "--lr", "0"], "--lr"),
    (["run", "--lr", "-0.1"], "--lr"),
    (["run", "--lr", "nan"], "--lr"),
    (["run", "--lr", "inf"], "--lr"),
    (["run", "--lr", "fast"], "--lr"),
    (["run", "--backend", "bogus"], "--backend"),
    (["run", "--backend", "cuda"], "--backend"),  # training runs on the CPU: never there
    (["run", "--policies", "uniform,bogus"], "--policies"),
    (["run", "--policies", ","], "--policies"),
    (["run", "--out", "{file}"], "--out"),
    (["run", "--out", "{file}/results"], "--out"),
    (["run", "--budgets", "0.3"], "--budgets"),  # compare's option
    (["compare", "--backend", "bogus"], "--backend"),
    (["compare", "--backend", "cuda"], "--backend"),
    (["compare", "--backend", ""], "--backend"),
    (["compare", "--lr", "-1"], "--lr"),
    (["compare", "--dataset", "cifar"], "--dataset"),
    (["compare", "--dataset", "folder:"], "--dataset"),
    (["compare", "--dataset", "folder:{missing}"], "--dataset"),
    (["compare", "--dataset", "folder:{file}"], "--dataset"),
    (["compare", "--dataset", "folder:{dir}"], "--dataset"),      # no class sub-folders
    (["compare", "--dataset", "folder:{classes}"], "--dataset"),  # no images
    (["compare", "--dataset", "beton:"], "--dataset"),
    (["compare", "--dataset", "beton:{missing}"], "--dataset"),
    (["compare", "--dataset", "beton:{file},{missing}"], "--dataset"),
    (["compare", "--dataset", "beton:{file},{file},{file}"], "--dataset"),
    (["compare", "--dataset", "beton:{dir}"], "--dataset"),
    (["compare", "--budgets", "0.2,2"], "--budgets"),
    (["compare", "--budgets", ""], "--budgets"),
    (["compare", "--budgets", "0.2,x"], "--budgets"),
    (["compare", "--time-budget", "0"], "--time-budget"),
    (["compare", "--time-budget", "inf"], "--time-budget"),
    (["compare", "--time-budget", "nan"], "--time-budget"),
    (["compare", "--time-budget", "1", "--budgets", "0.3"], "--time-budget"),
    (["compare", "--n-train", "0"], "--n-train"),
    (["compare", "--dataset", "synthetic", "--n-train", "5"], "--n-train"),
    (["compare", "--n-test", "0"], "--n-test"),
    (["compare", "--n-train", "5000"], "--n-train"),            # digits has 1,348: never silently ignored
    (["compare", "--n-test", "5000"], "--n-test"),
    (["compare", "--label-noise", "0.1"], "--label-noise"),     # synthetic only
    (["compare", "--dataset", "folder:{classes}", "--redundancy", "0.5"], "--redundancy"),
    (["compare", "--image-size", "16"], "--image-size"),        # folder: only
    (["compare", "--baseline", "bogus"], "--baseline"),
    (["compare", "--policies", "sb", "--time-budget", "1"], "--policies/--time-budget"),  # batch level
    (["compare", "--label-noise", "1"], "--label-noise"),
    (["compare", "--label-noise", "-0.1"], "--label-noise"),
    (["compare", "--imbalance", "0"], "--imbalance"),
    (["compare", "--imbalance", "2"], "--imbalance"),
    (["compare", "--image-size", "1"], "--image-size"),
    (["compare", "--seeds", "0"], "--seeds"),
    (["compare", "--out", "{file}"], "--out"),
    (["compare", "extra"], "extra"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--device", "cuda:99"], "--device"),
    (["bench", "--device", "cuda:x"], "--device"),
    (["bench", "--backends", "bogus"], "--backends"),
    (["bench", "--backends", "reference,bogus"], "--backends"),
    (["bench", "--backends", ","], "--backends"),
    (["bench", "--backends", "auto"], "--backends"),
    (["bench", "--backends", "cuda"], "--backends"),  # not built here, or not on the CPU
    (["bench", "--min-run-time", "0"], "--min-run-time"),
    (["bench", "--out", "{dir}"], "--out"),
    (["bench", "--out", "{file}/b.json"], "--out"),
    (["bench", "--full", "--loss-only"], "--full"),
    (["bench", "--backend", "reference", "--lr", "1"], "--lr"),
    (["report"], "results_dir"),
    (["report", "{missing}"], "results_dir"),
    (["report", "{file}"], "results_dir"),
    (["report", "{dir}"], "results_dir"),
    (["report", "{badjson}"], "results_dir"),
    (["report", "{noruns}"], "results_dir"),
    (["report", "{noruns}", "{noruns}"], "unrecognized arguments"),
    (["backends", "--all"], "--all"),
    (["frobnicate"], "COMMAND"),
    ([], "COMMAND"),
]


@pytest.fixture
def paths(tmp_path):
    p = {"file": tmp_path / "a_file", "dir": tmp_path / "empty", "missing": tmp_path / "missing",
         "classes": tmp_path / "classes", "badjson": tmp_path / "badjson", "noruns": tmp_path / "noruns"}
    p["file"].write_text("not a folder")
    for d in ("dir", "badjson", "noruns"):
        p[d].mkdir()
    (p["classes"] / "cat").mkdir(parents=True)
    (p["badjson"] / "results.json").write_text("{not json")
    (p["noruns"] / "results.json").write_text(json.dumps({"meta": {}, "runs": []}))
    return {k: str(v) for k, v in p.items()}


def assert_argument_error(err, command, argument):
    """argparse's format and nothing else: the usage (which argparse may wrap over several
    lines), then one ``fastsel <command>: error: ...`` line naming the argument."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    prog = "fastsel " + command if command in ("run", "compare", "bench", "report", "backends") else "fastsel"
    assert lines[0].startswith("usage: " + prog), err
    assert all(l.startswith(" ") for l in lines[1:-1]), err  # usage continuation lines only
    assert lines[-1].startswith(prog + ": error: "), err
    assert argument in lines[-1], err


@pytest.mark.parametrize("argv,argument", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_every_argument_error_is_one_error_line_and_exit_2(paths, capsys, monkeypatch, argv, argument):
    argv = [a.format(**paths) for a in argv]
    for mod, name in ((compare, "run"), (bench, "run_all"), (bench, "run_loss_cost")):  # refused before work
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail(f"{argv} was accepted"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_argument_error(err, argv[0] if argv else "", argument)


def test_a_bad_backend_is_refused_before_any_training(monkeypatch, capsys):
    from fastsel.experiments import train
    monkeypatch.setattr(train, "train_one", lambda *a, **k: pytest.fail("trained with a bad --backend"))
    with pytest.raises(SystemExit) as e:
        main(["compare", "--backend", "bogus", "--epochs", "1", "--seeds", "1", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_argument_error(err, "compare", "--backend")
    assert "'bogus'" in err and "reference" in err  # names the bad value and the good ones


def test_a_combination_the_sampler_refuses_is_an_argument_error(monkeypatch, capsys, tmp_path):
    """Every run's Sampler is built before training: its ValueError becomes the error line."""
    from fastsel.experiments import train
    real = train.make_sampler

    def refuse_tftb(spec, data):
        if spec.policy == "tftb":
            raise ValueError("tftb refuses\nthis budget")  # a two-line message becomes one line
        return real(spec, data)
    monkeypatch.setattr(train, "make_sampler", refuse_tftb)
    monkeypatch.setattr(compare, "run", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--policies", "uniform,tftb", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_argument_error(err, "run", "--policies")
    assert "tftb refuses this budget" in err


def test_errors_after_the_checks_are_not_swallowed(monkeypatch, tmp_path):
    """Only argument checking turns into exit 2: a failure while training or timing keeps its
    traceback (``bench`` used to report any ValueError or RuntimeError as a bad argument)."""
    def boom(*a, **k):
        raise RuntimeError("a genuine bug")
    monkeypatch.setattr(compare, "run", boom)
    with pytest.raises(RuntimeError, match="genuine bug"):
        main(["run", "--epochs", "1", "--seeds", "1", "--policies", "uniform", "--out", str(tmp_path / "r")])
    monkeypatch.setattr(bench, "run_loss_cost", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):
        main(["bench", "--backends", "reference", "--loss-only", "--min-run-time", "0.001"])


def test_console_script_argument_error_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "fastsel", "compare", "--backend", "bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert_argument_error(r.stderr, "compare", "--backend")


def test_help_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "fastsel", "backends"], capture_output=True, text=True,
                         check=True).stdout
    assert "reference" in out and "usable here" in out
    for cmd in ("run", "compare", "bench", "report"):
        h = subprocess.run([sys.executable, "-m", "fastsel", cmd, "--help"], capture_output=True, text=True,
                           check=True).stdout
        assert "usage: fastsel " + cmd in h


def test_verdict_needs_a_paired_gap_beyond_the_noise():
    def runs(accs):
        return [{"policy": p, "budget": "0.3", "seed": s, "accuracy": a / 100, "test_size": 1000, "wall_s": 1.0,
                 "selection_s": 0.0, "forward": 1, "backward": 1, "passes_full": 2, "entropy": 0.0}
                for p, xs in accs.items() for s, a in enumerate(xs)]
    clear = runs({"uniform": [90.0, 91.0, 92.0], "tftb": [92.0, 93.1, 93.9]})
    assert "better tftb (+2.00" in compare.verdict(compare.aggregate(clear), clear)
    noisy = runs({"uniform": [90.0, 91.0, 92.0], "tftb": [93.0, 90.0, 93.0]})
    text = compare.verdict(compare.aggregate(noisy), noisy)
    assert "level (the interval includes 0" in text and "No policy clearly beats uniform" in text
    tiny = runs({"uniform": [90.0, 91.0, 92.0], "tftb": [90.1, 91.1, 92.1]})  # one image per seed
    assert "No policy clearly beats uniform" in compare.verdict(compare.aggregate(tiny), tiny)
    worse = runs({"uniform": [90.0, 91.0, 92.0], "tftb": [80.0, 81.1, 81.9]})
    assert "worse tftb (−10.00" in compare.verdict(compare.aggregate(worse), worse)


def test_version_flag_prints_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastsel {fastsel.__version__}"


def test_backends_say_plainly_which_need_a_gpu_this_machine_lacks(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from fastsel.cli import backend_lines
    lines = backend_lines()
    assert lines["cpu"].startswith("usable here on cpu")
    assert lines["reference"].startswith("usable here on cpu")
    assert lines["cuda"].startswith("not usable here: it needs an NVIDIA GPU and this machine has none visible")
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name:<10} {line}" in out for name, line in lines.items())


def test_verdict_with_one_seed_says_it_cannot_judge():
    from fastsel.experiments.compare import aggregate, verdict
    runs = [dict(policy=p, budget="0.3", seed=0, accuracy=a, wall_s=1.0, selection_s=0.0, forward=1,
                 backward=1, passes_full=2, entropy=0.0, test_size=100)
            for p, a in (("uniform", 0.80), ("tftb", 0.85))]
    text = verdict(aggregate(runs), runs)
    assert "tftb has the best mean" in text and "with 1 seed(s) this cannot be judged" in text
    runs2 = runs + [dict(runs[0], seed=1, accuracy=0.81), dict(runs[1], seed=1, accuracy=0.87)]
    # gaps 5 and 6 points: 5.5 ± 12.706 · 0.707 / √2 = [−0.85, +11.85], so level, not better
    rows = aggregate(runs2)
    assert "level (the interval includes 0" in verdict(rows, runs2)
    assert "+5.50 [−0.85, +11.85]" in compare.format_table(rows)


def test_speedup_is_the_median_of_per_seed_ratios_with_its_range():
    from fastsel.experiments.compare import aggregate
    runs = [dict(policy=p, budget=b, seed=s, accuracy=0.5, wall_s=w, selection_s=0.0, forward=1, backward=1,
                 passes_full=2, entropy=0.0)
            for s, wf, wu in ((0, 10.0, 5.0), (1, 10.0, 2.0), (2, 10.0, 4.0))
            for p, b, w in (("full", "1", wf), ("uniform", "0.3", wu))]
    row = next(r for r in aggregate(runs) if r["policy"] == "uniform")
    assert row["speedup"] == 2.5 and row["speedup_range"] == (2.0, 5.0)


def test_run_and_compare_take_a_device(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = build_parser().parse_args(["compare", "--device", "cpu"])
    assert args.device == "cpu"
    for cmd in ("run", "compare"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--device", "cuda", "--no-progress"])
        assert e.value.code == 2
