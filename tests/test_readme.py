"""The README's and docs/'s examples run as written, and the README's commands are the ones
CI uses. Each example block is found by a marker it contains, wherever it lives (README.md or
a page of docs/), and every `python` block of those files is run by some test."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def readme():
    return read("README.md")


def blocks_of(page):
    return re.findall(r"```python\n(.*?)```", read(page), re.S)


def python_blocks():
    """The README's blocks first (its first is the quick start), then docs/'s, page by page."""
    return [b for page in PAGES for b in blocks_of(page)]


def page_of(block):
    return next(page for page in PAGES if block in blocks_of(page))


def find(mark):
    return next(b for b in python_blocks() if mark in b)


#: The marker of each block the tests below run, and the blocks run elsewhere.
RUN_HERE = ('ckpt = {"model": model.state_dict(), "sampler": sampler.state_dict()}', "SelectiveStep(model, \"sb\"", "ignore_index=255)", "Beta(0.4, 0.4)",
            "sampler.observe(focal", "torch.compile(", "update=False)   # counts nothing",
            "SamplerCallback(sampler)", "accelerator.prepare(")
RUN_ELSEWHERE = {
    "order.sampler_ids(ids)": "tests/test_ffcv.py runs docs/ffcv.md's subset example on a small .beton",
    "write_beton(train_set": "needs the user's train_set, model and a GPU: the API is run by tests/test_ffcv.py",
    'policy="rs2"': "tests/test_rs2.py::test_the_policies_page_example_runs",
    "SamplerTrainer(sampler=sampler": "tests/test_transformers.py::test_docs_example_runs",
}


def test_every_python_block_is_run():
    """Each marker names exactly one block (a marker shared by two would run only the first),
    and every block holds a marker."""
    assert len(PAGES) > 10
    marks = RUN_HERE + tuple(RUN_ELSEWHERE)
    blocks = python_blocks()
    for mark in marks:
        assert sum(mark in b for b in blocks) == 1, mark
    for page in PAGES:
        for block in blocks_of(page):
            assert any(m in block for m in marks), (page, block[:200])


def test_docs_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", read(page)):
            assert os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))), (page, target)


def test_readme_is_short_and_the_quick_start_uses_the_default_policy():
    assert len(readme().splitlines()) <= 250
    quick = blocks_of("README.md")[0]
    assert "policy=\"tftb\"" not in quick and "fastsel.Sampler(train, budget=" in quick


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
    block = find("SelectiveStep(model, \"sb\"")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, page_of(block), "exec"), scope)
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
    blocks = [find(m) for m in marks]
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope = {}
        exec(compile(block, page_of(block), "exec"), scope)
        s = scope["sampler"]
        assert s.summary()["passes"] == s.summary()["passes_full_training"] // 2
        assert int((s.state.seen > 0).sum()) > 0


def test_readme_evaluation_with_update_false_runs(tmp_path, monkeypatch):
    """The contract's evaluation snippet, after the first example: it counts nothing."""
    import textwrap
    import torch
    blocks = python_blocks()
    snippet = textwrap.dedent(find("update=False)   # counts nothing"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    s = scope["sampler"]
    before = (s.position, s.summary()["passes"], s.state.seen.clone())
    scope.update(xv=scope["x"][:50], yv=scope["y"][:50], iv=torch.arange(50))
    exec(compile(snippet, os.path.join("docs", "contract.md"), "exec"), scope)
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
    block = find("SamplerCallback(sampler)")
    exec(compile(block, page_of(block), "exec"), scope)
    assert scope["trainer"].current_epoch == 10 and scope["sampler"].summary()["passes"] == 10 * 300
    assert scope["trainer"].optimizers[0].param_groups[0]["lr"] == 0.0
    scope = {}
    try:
        block = find("accelerator.prepare(")
        exec(compile(block, page_of(block), "exec"), scope)
    finally:
        accelerate.state.AcceleratorState._reset_state(True)
        accelerate.state.GradientState._reset_state()
        accelerate.state.PartialState._reset_state()
    assert scope["sampler"].summary()["passes"] == 10 * 300
    assert (tmp_path / "checkpoint" / "custom_checkpoint_0.pkl").exists()
