"""The command line: the main job end to end on a tiny setting, and refused arguments."""
import subprocess
import sys

import pytest

from fastsel.cli import build_parser, main
from fastsel.job import format_table, run_job


def test_main_job_tiny_run_prints_a_table(capsys):
    assert main(["run", "--epochs", "2", "--seeds", "2", "--policies", "uniform,tftb", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.split() and l.split()[0] in ("full", "uniform", "tftb")]
    assert len(lines) == 3
    full = lines[0].split()
    assert full[1] == "1.00" and full[-2] == "0%"
    uni = lines[1].split()
    assert uni[1] == "0.30" and uni[-2] == "70%" and "±" in lines[1]


def test_job_results_are_real_training():
    res = run_job(policies=["uniform"], budget=0.5, epochs=3, show_progress=False)
    full, uni = res
    assert full.passes == full.passes_full and uni.passes == round(0.5 * full.passes_full)
    assert full.accuracy > 0.8  # three epochs on digits learn something
    assert "uniform" in format_table(res)


@pytest.mark.parametrize("argv,msg", [
    (["run", "--budget", "0"], "budget must be in (0, 1]"),
    (["run", "--budget", "x"], "budget must be a number"),
    (["run", "--epochs", "-1"], "positive integer"),
    (["run", "--policies", "uniform,bogus"], "unknown policy"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_refused(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_python_dash_m_backends():
    out = subprocess.run([sys.executable, "-m", "fastsel", "backends"], capture_output=True, text=True,
                         check=True).stdout
    assert "reference" in out and "available" in out
