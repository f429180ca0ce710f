"""The README's example runs as written, and its commands are the ones CI uses."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", readme(), re.S)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    s = scope["sampler"]
    assert s.summary()["passes"] == 10 * 300
    assert "passes_saved" in capsys.readouterr().out


def test_readme_selective_step_example_runs(tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "SelectiveStep" in b)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    summary = scope["step"].summary()
    assert scope["sampler"].summary()["passes"] == 4 * 300
    assert 0 < summary["backward_passes"] < summary["forward_passes"]


def test_ci_runs_the_readme_test_command():
    text = readme()
    assert "make run" in text and "make test" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()


def test_readme_loss_examples_run(tmp_path, monkeypatch):
    """The segmentation, mixup, focal-loss (observe) and torch.compile examples run as written."""
    marks = ("ignore_index=255", "Beta(0.4, 0.4)", "sampler.observe(focal", "torch.compile(")
    blocks = [next(b for b in python_blocks() if m in b) for m in marks]
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope = {}
        exec(compile(block, "README.md", "exec"), scope)
        s = scope["sampler"]
        assert s.summary()["passes"] == s.summary()["passes_full_training"] // 2
        assert int((s.state.seen > 0).sum()) > 0


def test_readme_evaluation_with_update_false_runs(tmp_path, monkeypatch):
    """The contract's evaluation snippet, after the first example: it counts nothing."""
    import textwrap
    import torch
    blocks = python_blocks()
    snippet = textwrap.dedent(next(b for b in blocks if "update=False)   # counts nothing" in b))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    s = scope["sampler"]
    before = (s.position, s.summary()["passes"], s.state.seen.clone())
    scope.update(xv=scope["x"][:50], yv=scope["y"][:50], iv=torch.arange(50))
    exec(compile(snippet, "README.md", "exec"), scope)
    assert torch.isfinite(scope["val_loss"])
    assert (s.position, s.summary()["passes"]) == before[:2] and torch.equal(s.state.seen, before[2])


def test_readme_lightning_and_accelerate_examples_run(tmp_path, monkeypatch):
    """The Lightning example keeps the budget with max_epochs above it; the Accelerate recipe
    trains the budget and saves every rank's sampler state with the rest."""
    import pytest
    pytest.importorskip("lightning")
    accelerate = pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(next(b for b in python_blocks() if "SamplerCallback(sampler)" in b), "README.md", "exec"), scope)
    assert scope["trainer"].current_epoch == 10 and scope["sampler"].summary()["passes"] == 10 * 300
    assert scope["trainer"].optimizers[0].param_groups[0]["lr"] == 0.0
    scope = {}
    try:
        exec(compile(next(b for b in python_blocks() if "accelerator.prepare(" in b), "README.md", "exec"), scope)
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
        accelerate.state.GradientState._reset_state()
        accelerate.state.PartialState._reset_state()
    assert scope["sampler"].summary()["passes"] == 10 * 300
    assert (tmp_path / "checkpoint" / "custom_checkpoint_0.pkl").exists()
