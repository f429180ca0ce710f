"""Triton-backend checks the shared suite (test_backends.py) and the op-level checks
(test_ops_triton.py) do not make, through the backend's methods (``step``, ``observe``,
``select``, ``uniform``, ``shuffle`` and the two selection paths).

In-batch top-k against ``torch.sort``; the radix selection on N not a power of two with
heavy ties; C above one column chunk; the GPU tile configurations (forced under the
interpreter) for the step and observe, and for which rows count (an epoch's ``rows``:
stray rows across programs, a refused call, strict); int32 inputs and strided logits; the
error vector and stats against the reference backend; the noise on extreme indices; the
stats/errors/rows slots read from ``fastsel.layout``; the launch structure (the step and
observe are two launches forward, with or without the epoch's rows, the merge a grid over
the rows with no loop, no torch op that launches work besides the kernels; the selection
four launches with a multi-block look-back); the
scratch buffers left zero; and the AOT build of every kernel at every launcher
configuration for sm_80 and sm_90, in a subprocess without TRITON_INTERPRET. Without a GPU
everything but the AOT build runs under ``TRITON_INTERPRET=1`` (conftest).
"""
import glob
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

from fastsel import layout, rng
from fastsel.backends import available, get_backend
from fastsel.config import LossConfig
from fastsel.state import SampleState
from helpers import batch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in available(DEV)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend not available on {DEV}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tb():
    return get_backend("triton", DEV)


def _ref():
    return get_backend("reference", DEV)


def _tie_keys(gen, n, values=5):
    """Few distinct values (heavy ties), NaN, +-inf and -0.0 / +0.0 mixed in."""
    keys = torch.randint(-2, values - 2, (n,), generator=gen).float()
    r = torch.rand(n, generator=gen)
    keys[r < 0.05] = float("nan")
    keys[(r >= 0.05) & (r < 0.08)] = float("inf")
    keys[(r >= 0.08) & (r < 0.11)] = float("-inf")
    keys[(r >= 0.11) & (r < 0.2)] = -0.0
    return keys.to(DEV)


def _sorted_order(keys):
    k = torch.nan_to_num(keys.float(), nan=float("-inf"))
    return torch.sort(k, descending=True, stable=True).indices


# ---- in-batch top-k ---------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("b", [1, 7, 255, 1000, 4097])
def test_batch_topk_matches_sort_with_ties_by_index(gen, b):
    keys = _tie_keys(gen, b)
    order = _sorted_order(keys)
    for k in sorted({1, max(1, b // 3), b}):
        assert torch.equal(_tb().topk_batch(keys, k), order[:k]), k


@needs_triton
def test_batch_topk_largest_batch_and_limits(gen):
    b = 8192
    keys = torch.randn(b, generator=gen).round(decimals=1).to(DEV)  # ties
    assert torch.equal(_tb().topk_batch(keys, 100), _sorted_order(keys)[:100])
    assert _tb().topk_batch(keys, 0).numel() == 0
    with pytest.raises(ValueError, match="8192"):
        _tb().topk_batch(torch.zeros(b + 1, device=DEV), 3)


# ---- selection over N -------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("n", [1, 3, 4097, 12289])
def test_radix_select_non_power_of_two_heavy_ties(gen, n):
    keys = _tie_keys(gen, n, values=3)
    ref = _ref().select(keys, n)
    for k in sorted({1, 2, max(1, n // 3), max(1, n - 1), n} - {0}):
        k = min(k, n)
        assert torch.equal(_tb().select_radix(keys, k), ref[:k]), k
        assert torch.equal(_tb().select(keys, k), ref[:k]), k


@needs_triton
def test_select_edge_cases(gen):
    n = 9001  # above the in-batch size: select() takes the radix path
    same = torch.full((n,), 0.25, device=DEV)  # one value: every block holds ties
    for k in (1, 4096, 4097, n):
        assert torch.equal(_tb().select(same, k), torch.arange(k, device=DEV))
    keys = torch.randn(n, generator=gen, dtype=torch.float64).to(DEV)
    assert torch.equal(_tb().select(keys, 77), _ref().select(keys, 77))
    assert _tb().select(keys, 0).numel() == 0
    assert torch.equal(_tb().select(keys, n + 5), _ref().select(keys, n + 5))
    nan = torch.full((n,), float("nan"), device=DEV)
    assert torch.equal(_tb().select(nan, 10), torch.arange(10, device=DEV))


@needs_triton
def test_noise_bit_exact_on_extreme_indices():
    idx = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**40 + 3, -1, -7],
                       device=DEV)
    for key in (0, 1, 12345, 2**31 - 2):
        for stream in (rng.STREAM_SELECT, rng.STREAM_SHUFFLE, rng.STREAM_EXPLORE):
            assert torch.equal(_tb().uniform(idx, key, stream), rng.uniform(idx, key, stream))
    i32 = torch.arange(-50, 3000, dtype=torch.int32, device=DEV)
    assert torch.equal(_tb().uniform(i32, 99, 1), rng.uniform(i32, 99, 1))


# ---- the fused step ---------------------------------------------------------------------

def _both(logits, labels, indices, n, cfg, steps=1, epoch=0, weight=None):
    """Run the Triton and reference backends on the same input; return both
    (output, grad, state)."""
    res = []
    for be in (_tb(), _ref()):
        st = SampleState(n, DEV)
        if weight is not None:
            st.weight.copy_(weight)
        for s in range(steps):
            x = logits.clone().requires_grad_(True)
            out = be.step(x, labels, indices, st, cfg, epoch + s)
            out.backward(torch.ones_like(out))
        res.append((out.detach(), x.grad, st))
    return res


def _assert_states_close(a, b, exact_counts=True):
    for f in ("loss", "loss_var", "p_true"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6, msg=f)
    for f in ("seen", "last_epoch"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    torch.testing.assert_close(a.stats, b.stats, rtol=1e-6, atol=1e-6)
    assert torch.equal(a.errors, b.errors)


@needs_triton
@pytest.mark.parametrize("c", [2049, 5000])
def test_many_classes_loop_over_column_chunks(gen, c):
    """C above the largest column chunk: online softmax over chunks, second sweep for the
    smoothing sums and the gradient; class weights, smoothing, bf16."""
    n = 40
    logits, labels, indices = batch(gen, 9, c, n, pool=3, ignore=0.1, device=DEV)
    w = (torch.rand(c, generator=gen) + 0.5).to(DEV)
    for dtype in (torch.float32, torch.bfloat16):
        cfg = LossConfig(label_smoothing=0.1, class_weight=w)
        (o1, g1, s1), (o2, g2, s2) = _both(logits.to(dtype), labels, indices, n, cfg)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(g1.float(), g2.float(), **tol)
        _assert_states_close(s1, s2)


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
@pytest.mark.parametrize("c", [2, 10, 100, 1001, 3000])
def test_gpu_tile_configurations_under_interpreter(gen, monkeypatch, c):
    """The launcher's GPU block sizes (rows per program, column chunk, merge tiles) give the
    reference's results: the interpreter normally runs larger tiles."""
    import importlib
    tmod = importlib.import_module("fastsel.backends.triton")  # fastsel.backends is also a function
    monkeypatch.setattr(tmod, "interpreting", lambda: False)
    n = 60
    b = 300 if c <= 100 else 70  # 300 rows: duplicates across the merge's 256-row programs
    logits, labels, indices = batch(gen, b, c, n, pool=max(1, b // 3), ignore=0.1, device=DEV)
    logits[3, 0] = float("nan")
    weight = torch.rand(n, generator=gen) * 2
    for red in ("mean", "none"):
        cfg = LossConfig(label_smoothing=0.05, reduction=red, strict=False)
        (o1, g1, s1), (o2, g2, s2) = _both(logits, labels, indices, n, cfg, steps=2, weight=weight)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, equal_nan=True)
        _assert_states_close(s1, s2)
    keys = _tie_keys(gen, 300)
    assert torch.equal(_tb().topk_batch(keys, 100), _sorted_order(keys)[:100])


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
def test_observe_gpu_tiles_under_interpreter(gen, monkeypatch):
    """observe at the launcher's GPU block sizes (per-row block, merge programs) equals the
    reference: duplicates across the merge's 256-row programs, a NaN loss, a bad index, and
    an update=False call that writes no state."""
    import importlib
    tmod = importlib.import_module("fastsel.backends.triton")
    monkeypatch.setattr(tmod, "interpreting", lambda: False)
    n, b = 60, 300
    _, _, indices = batch(gen, b, 3, n, pool=max(1, b // 3), ignore=0.1, device=DEV)
    weight = torch.rand(n, generator=gen) * 2
    losses = torch.rand(b, generator=gen).to(DEV) * 3
    losses[5] = float("nan")
    bad = indices.clone()
    bad[9] = n
    cfg = LossConfig(reduction="mean", strict=False)
    res = []
    for be in (_tb(), _ref()):
        st = SampleState(n, DEV)
        st.weight.copy_(weight)
        x = losses.clone().requires_grad_(True)
        out = be.observe(x, bad, st, cfg, 1)
        out.backward()
        with torch.no_grad():  # update=False writes no state
            o_again = be.observe(losses, bad, st, cfg, 2, update=False)
        res.append((out.detach(), x.grad, o_again, st))
    (o1, g1, a1, s1), (o2, g2, a2, s2) = res
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    _assert_states_close(s1, s2)
    assert torch.equal(s1.last_epoch.max(), torch.tensor(1, dtype=torch.int32, device=DEV))


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the refused call's 1/0
def test_epoch_rows_at_gpu_tiles_equal_reference(gen, monkeypatch):
    """Which rows count, at the launcher's GPU block sizes (64-row step programs, 256-row
    merge programs), through ``Backend.step``/``observe`` with ``rows``: the first stray row
    in the second merge program and stray duplicates across programs, then a call refused
    for room; the row counters, state, loss and gradient equal the reference's, the merge
    scratch is zero after each call; a strict call with a stray row raises the reference's
    text, writes nothing and leaves the scratch zero."""
    from fastsel.rows import EpochRows
    monkeypatch.setattr(_tmod(), "interpreting", lambda: False)
    n, c, b = 90, 10, 600
    logits, labels, _ = batch(gen, b, c, n, pool=max(1, b // 3), ignore=0.1, device=DEV)
    selection = torch.arange(0, n, 3)               # every third sample
    indices = selection[torch.randint(0, len(selection), (b,), generator=gen)]
    indices[[300, 520, 599]] = 1                    # stray sample 1 (merge programs 1 and 2)
    indices[[310, 40 + 256]] = torch.tensor([5, 7])  # ... then 5 and 7, before it in row 296
    indices[[7, 8]] = torch.tensor([-1, n])         # out of range: errors, not stray
    indices = indices.to(DEV)
    losses = (torch.rand(b, generator=gen) * 3).to(DEV)
    weight = torch.rand(n, generator=gen) * 2
    res = []
    for be in (_tb(), _ref()):
        st = SampleState(n, DEV)
        st.weight.copy_(weight)
        rows = EpochRows(n, DEV)
        rows.open(selection, 3, 2 * b + 100, 0)     # room for two calls of b rows
        got = []
        for red in ("mean", "none"):
            x = logits.clone().requires_grad_(True)
            out = be.step(x, labels, indices, st, LossConfig(reduction=red, strict=False),
                          rows.epoch, rows=rows)
            out.backward(torch.ones_like(out))
            got.append((out.detach(), x.grad))
        got.append((be.observe(losses, indices, st, LossConfig(strict=False), rows.epoch,
                               rows=rows), None))  # refused: no room
        if be.name == "triton":
            assert _scratch_is_zero(st, n)
        res.append((got, st, rows.counts.clone()))
    (g1, s1, c1), (g2, s2, c2) = res
    for (o1, x1), (o2, x2) in zip(g1, g2):
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
        if x1 is not None:
            torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-6, equal_nan=True)
    _assert_states_close(s1, s2)
    assert c1.tolist() == c2.tolist()
    assert c1[layout.ROW_STRAY_VALUE] == 7 and c1[layout.ROW_STRAY_COUNT] == 2 * 5
    assert c1[layout.ROW_TRAINED] == 2 * b and c1[layout.ROW_CALLS] == 2
    assert c1[layout.ROW_OVER_COUNT] == b and c1[layout.ROW_OVER_VALUE] == 3 * b
    msgs = []
    for be in (_tb(), _ref()):
        st = SampleState(n, DEV)
        rows = EpochRows(n, DEV)
        rows.open(selection, 3, 2 * b, 0)
        with pytest.raises(ValueError) as e:
            be.step(logits, labels, indices, st, LossConfig(strict=True), rows.epoch, rows=rows)
        msgs.append(str(e.value))
        assert int(st.seen.sum()) == 0 and rows.counts[layout.ROW_TRAINED] == 0
        if be.name == "triton":
            assert _scratch_is_zero(st, n)
    assert msgs[0] == msgs[1] and "5 row(s) are samples epoch 3 did not select, e.g. 7" in msgs[0]


@needs_triton
def test_int32_inputs_strided_logits_and_no_grad(gen):
    n, c = 50, 33
    logits0, labels, indices = batch(gen, 64, c, n, pool=21, ignore=0.1, device=DEV)
    big = torch.randn(64, 2 * c, generator=gen).to(DEV)
    logits = big[:, 5:5 + c]                      # row stride 2C, column stride 1
    cols = big[:, ::2][:, :c]                     # column stride 2: copied first
    for x in (logits, cols):
        lab, idx = labels.to(torch.int32), indices.to(torch.int32)
        (o1, g1, s1), (o2, g2, s2) = _both(x, lab, idx, n, LossConfig(reduction="sum"))
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        _assert_states_close(s1, s2)
    st1, st2 = SampleState(n, DEV), SampleState(n, DEV)
    with torch.no_grad():
        o1 = _tb().step(logits, labels, indices, st1, LossConfig(), 3)
        o2 = _ref().step(logits, labels, indices, st2, LossConfig(), 3)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    _assert_states_close(st1, st2)


@needs_triton
def test_deferred_errors_and_stats_equal_reference_over_steps(gen):
    """The error vector keeps the FIRST offending value across steps; counts add up."""
    n, c = 30, 6
    st1, st2 = SampleState(n, DEV), SampleState(n, DEV)
    cfg = LossConfig(strict=False, ema=0.5)
    for step, (bad_i, bad_l) in enumerate([(n + 3, 7), (-4, -9), (n, c)]):
        logits, labels, indices = batch(gen, 20, c, n, pool=6, ignore=0.1, device=DEV)
        indices[[2, 11]] = bad_i
        labels[[4, 15]] = bad_l
        labels[5] = -100
        indices[5] = -1   # bad index on an ignored row still counts (as the reference)
        for be, st in ((_tb(), st1), (_ref(), st2)):
            be.step(logits, labels, indices, st, cfg, step)
    _assert_states_close(st1, st2)
    assert st1.errors.tolist() == [9, n + 3, 6, 7]


@needs_triton
def test_strict_error_leaves_stats_and_errors_untouched(gen):
    n, c = 30, 6
    st = SampleState(n, DEV)
    logits, labels, indices = batch(gen, 20, c, n, pool=6, ignore=0.1, device=DEV)
    _tb().step(logits, labels, indices, st, LossConfig(), 0)
    before = (st.stats.clone(), st.errors.clone(), st.seen.clone())
    labels[3] = c + 2
    with pytest.raises(IndexError, match=f"labels: 1 label.*e.g. {c + 2}"):
        _tb().step(logits, labels, indices, st, LossConfig(strict=True), 1)
    for a, b in zip(before, (st.stats, st.errors, st.seen)):
        assert torch.equal(a, b)


def test_kernels_read_the_state_layout_from_fastsel_layout():
    """The stats/errors/rows slots are fastsel.layout's (one definition): the kernels index
    them by its names, never by a number; the merge's partials fit the launcher's
    workspace."""
    from fastsel.backends.triton import load_kernels
    for path in glob.glob(os.path.join(ROOT, "fastsel", "kernels", "*.py")):
        assert not re.search(r"(stats|errors|rows)_ptr \+ \d", open(path).read()), path
    if HAS_TRITON:
        merge, admit = load_kernels("merge"), load_kernels("admit")
        for mod, names in ((merge, ("STAT_NONFINITE", "STAT_EPOCH_LOSS", "STAT_EPOCH_COUNT",
                                    "ERR_INDEX_COUNT", "ERR_INDEX_VALUE", "ERR_LABEL_COUNT",
                                    "ERR_LABEL_VALUE", "REDUCTION_MEAN", "STATE_MAX")),
                           (admit, ("ROW_TRAINED", "ROW_SHARD", "ROW_CALLS", "ROW_STRAY_COUNT",
                                    "ROW_STRAY_VALUE", "ROW_OVER_COUNT", "ROW_OVER_VALUE",
                                    "ROW_OVER_EPOCH"))):
            for name in names:
                assert getattr(mod, name).value == getattr(layout, name), name
        assert merge.P_STRIDE.value == load_kernels("configs").MERGE_PARTIALS


# ---- launch structure and scratch (the two-launch step, the four-launch selection) --------

def _tmod():
    import importlib
    return importlib.import_module("fastsel.backends.triton")  # fastsel.backends is also a function


class _Launches:
    """Records every launch of the named kernels, each patched in the module that defines it
    (``kernel[grid](...)``), and whether a launch is under way (the interpreter issues torch
    ops of its own)."""

    def __init__(self, monkeypatch, names):
        self.log, self.inside, self.kernels = [], False, {}
        modules = _tmod().load_kernels("aot").KERNEL_MODULES
        for name in names:
            mod = _tmod().load_kernels(modules[name])
            self.kernels[name] = getattr(mod, name)
            monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, kernel):
        rec = self

        class Wrapped:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    rec.log.append((name, tuple(grid)))
                    rec.inside = True
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        rec.inside = False
                return run
        return Wrapped()

    def names(self):
        return [n for n, _ in self.log]


STEP_KERNELS = ("ce_step_kernel", "observe_rows_kernel", "merge_update_kernel")
SELECT_KERNELS = ("radix_first_kernel", "radix_filter_kernel", "radix_cand_kernel",
                  "select_compact_kernel", "batch_topk_kernel")
#: Torch ops that launch no device work: allocation without fill, views.
NO_LAUNCH = {"aten.empty.memory_format", "aten.slice.Tensor", "aten.select.int",
             "aten.view.dtype", "aten.view.default", "aten.alias.default", "aten.detach.default"}


def _torch_ops_outside(rec, fn):
    """The aten ops ``fn`` issues outside the recorded kernel launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not rec.inside:
                self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as mode:
        out = fn()
    return mode.ops, out


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
def test_step_is_two_launches_and_the_merge_a_grid_over_rows(gen, monkeypatch):
    """Forward = the rows kernel + the merge kernel, whatever the reduction or update, with
    or without the epoch's rows (the room and membership checks and the row counts happen
    inside those two launches); the merge's grid is cdiv(B, MERGE_BLOCK) programs with no
    loop over the batch (O(B) work, no pairwise pass); no torch op besides allocations and
    views (no fill, no copy, no sync) once the state's merge scratch exists; observe is two
    launches too. The calls with rows are checked (stray rows counted, the epoch written)."""
    from fastsel.backends.base import state_args
    from fastsel.rows import EpochRows
    tmod = _tmod()
    cf = tmod.load_kernels("configs")
    monkeypatch.setattr(tmod, "interpreting", lambda: False)
    rec = _Launches(monkeypatch, STEP_KERNELS)
    n, c = 700, 10
    st = SampleState(n, DEV)
    tmod.merge_scratch(st._seen, n)   # made (zeroed) once per state, on its first step
    rows = EpochRows(n, DEV)
    rows.open(torch.arange(0, n, 2, device=DEV), 6, 10**6, 0)
    calls = 0
    for b in (1, 300, 1100):
        logits, labels, indices = batch(gen, b, c, n, pool=max(1, b // 3), ignore=0.1, device=DEV)
        br = cf.step_blocks(c)[0]
        for epoch_rows in (None, rows):
            args = state_args(st, 6, epoch_rows)   # outside: state_args makes the epoch tensor
            for red, update in ((0, True), (2, False), (1, True)):
                rec.log.clear()
                ops, _ = _torch_ops_outside(rec, lambda: tmod.ce_step(
                    logits, labels, indices, *args, None, -100, 0.0, 0.3, red, False, update,
                    True))
                assert rec.log == [("ce_step_kernel", (-(-b // br),)),
                                   ("merge_update_kernel", (-(-b // cf.MERGE_BLOCK),))], rec.log
                assert ops <= NO_LAUNCH, ops - NO_LAUNCH
                calls += bool(update and epoch_rows is not None)
            rec.log.clear()
            losses = logits[:, 0].contiguous()
            ops, _ = _torch_ops_outside(rec, lambda: tmod.observe(
                losses, None, indices, *args, 0.3, 1, False, True))
            assert rec.names() == ["observe_rows_kernel", "merge_update_kernel"]
            assert ops <= NO_LAUNCH, ops - NO_LAUNCH
            calls += epoch_rows is not None
    src = inspect.getsource(rec.kernels["merge_update_kernel"].fn)
    assert not re.search(r"^\s*(for|while)\b", src, re.M)   # one lane per row, no sweep
    counts = rows.counts.tolist()
    assert counts[layout.ROW_CALLS] == calls and counts[layout.ROW_STRAY_COUNT] > 0
    assert counts[layout.ROW_TRAINED] == 3 * (1 + 300 + 1100)
    assert int(st.last_epoch.max()) == 6


def _scratch_is_zero(st, n):
    return int(_tmod().merge_scratch(st._seen, n).abs().sum()) == 0


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
def test_all_one_index_batch_of_4096_rows_and_scratch_left_zero(gen, monkeypatch):
    """4096 rows of one index across 16 merge programs: one observation of their mean,
    seen += 4096, as the reference; the merge scratch (counts and the totals' ticket) is
    zero after every call: update, update=False, observe, and a strict error."""
    monkeypatch.setattr(_tmod(), "interpreting", lambda: False)
    n, c, b = 9, 10, 4096
    logits, labels, _ = batch(gen, b, c, n, pool=max(1, b // 3), ignore=0.1, device=DEV)
    logits[7, 2] = float("nan")
    idx = torch.full((b,), 4, device=DEV)
    cfg = LossConfig(ema=0.3)
    (o1, g1, s1), (o2, g2, s2) = _both(logits, labels, idx, n, cfg, steps=2)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, equal_nan=True)
    _assert_states_close(s1, s2)
    assert int(s1.seen[4]) == int(s2.seen[4]) > 2 * 3000
    assert _scratch_is_zero(s1, n)
    st = SampleState(n, DEV)
    _tb().step(logits, labels, idx, st, LossConfig(), 0, update=False)
    assert _scratch_is_zero(st, n) and int(st.seen.sum()) == 0
    _tb().observe(torch.rand(b, generator=gen).to(DEV), idx, st, LossConfig(), 0)
    assert _scratch_is_zero(st, n) and int(st.seen[4]) == b
    bad = labels.clone()
    bad[100] = c + 1
    with pytest.raises(IndexError):
        _tb().step(logits, bad, idx, st, LossConfig(strict=True), 1)
    assert _scratch_is_zero(st, n) and int(st.seen[4]) == b


@needs_triton
@pytest.mark.skipif(DEV != "cpu", reason="forces GPU tile sizes under the interpreter")
def test_radix_select_four_launches_multi_block_lookback(gen, monkeypatch):
    """At the GPU block size (4096 keys), N = 20011 spans five compaction blocks: the
    look-back carries the counts above and at the threshold across blocks, so ties that
    straddle blocks go to the lower index. Four launches; the scratch is left zero; denormals
    and heavy ties (every key a candidate) equal the reference."""
    tmod = _tmod()
    cf = tmod.load_kernels("configs")
    monkeypatch.setattr(tmod, "interpreting", lambda: False)
    rec = _Launches(monkeypatch, SELECT_KERNELS)
    n = 20011
    tiny = torch.finfo(torch.float32).tiny
    cases = [_tie_keys(gen, n, values=3),
             torch.full((n,), 0.5, device=DEV),                               # one value
             torch.tensor([tiny / 4, -tiny / 8, 0.0, -0.0, tiny], device=DEV)[  # denormals
                 torch.randint(0, 5, (n,), generator=gen).to(DEV)],
             torch.randn(n, generator=gen).to(DEV)]
    tmod.select_scratch(torch.device(DEV), -(-n // cf.SELECT_BLOCK))  # zeroed once, reused
    for keys in cases:
        ref = _ref().select(keys, n)
        for k in (1, 4096, 4097, 9000, n - 1, n):
            rec.log.clear()
            ops, got = _torch_ops_outside(rec, lambda: _tb().select_radix(keys, k))
            assert torch.equal(got, ref[:k]), k
            grid = -(-n // cf.SELECT_BLOCK)
            assert rec.log == [("radix_first_kernel", (grid,)), ("radix_filter_kernel", (grid,)),
                               ("radix_cand_kernel", (min(grid, cf.SELECT_CAND_PROGRAMS),)),
                               ("select_compact_kernel", (grid,))], rec.log
            assert ops - NO_LAUNCH <= {"aten.sort.stable", "aten.index.Tensor"}, ops
    ctrl, hist, status = tmod.select_scratch(torch.device(DEV), 1)
    assert int(ctrl.abs().sum()) == 0 and int(hist.abs().sum()) == 0
    assert int(status.abs().sum()) == 0


@needs_triton
def test_radix_select_beyond_packed_counts_falls_back(gen, monkeypatch):
    """Above SELECT_MAX_N keys (the compaction packs 30-bit counts) the reference select
    runs; below it the kernels do."""
    cf = _tmod().load_kernels("configs")
    keys = _tie_keys(gen, 300)
    monkeypatch.setattr(cf, "SELECT_MAX_N", 100)
    assert torch.equal(_tb().select_radix(keys, 50), _ref().select(keys, 50))


# ---- import hygiene and the AOT build ---------------------------------------------------

def test_import_fastsel_does_not_import_triton_and_auto_skips_interpreter():
    code = ("import sys, fastsel; from fastsel.backends import get_backend; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "print(get_backend('auto', 'cpu').name)")
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != "triton"


@needs_triton
def test_aot_compiles_every_kernel_at_every_launcher_config_sm80_sm90():
    """Every (kernel, constexprs, num_warps) the launcher can choose on a GPU compiles to a
    cubin for sm_80 and sm_90, in a process where TRITON_INTERPRET is unset (under the
    interpreter ``@triton.jit`` yields interpreted functions that cannot be compiled)."""
    from fastsel.backends.triton import load_kernels
    aot, cf = load_kernels("aot"), load_kernels("configs")
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            aot.compile_all()
    report = aot.run_subprocess(["--no-resources"])
    got = {(r["target"], r["kernel"], r["dtype"], r["index"], r["num_warps"],
            tuple(sorted(r["constexprs"].items()))) for r in report["kernels"]}
    want = {(f"cuda:sm_{a}", c["kernel"], c.get("dtype", "fp32"), c.get("index", "i64"),
             c["num_warps"], tuple(sorted(c["constexprs"].items())))
            for a in (80, 90) for c in cf.gpu_configs()}
    # every block size the launcher can choose for the fused step is among them
    steps = {(r["constexprs"]["BLOCK_R"], r["constexprs"]["BLOCK_C"], r["constexprs"]["SINGLE"],
              r["num_warps"]) for r in report["kernels"] if r["kernel"] == "ce_step_kernel"}
    for c in list(range(2, 300)) + [511, 512, 513, 1000, 1001, 2048, 2049, 32768]:
        assert cf.step_blocks(c) in steps, c
    assert got == want
    assert all(r["cubin_bytes"] > 0 for r in report["kernels"])
    kernels = {r["kernel"] for r in report["kernels"]}
    assert kernels == set(aot.SIGNATURES)


def test_the_ce_step_backward_is_the_one_launch_scale_grad_kernel(monkeypatch):
    """Through the sampler, backward runs ``scale_grad`` (one launch) and gives the
    reference's gradient, for a device grad_output (per-row and reduced)."""
    import fastsel
    from fastsel import ops
    from fastsel.backends import triton as tb
    calls = []
    fn, devices = ops._SCALE_GRAD["triton"]
    monkeypatch.setitem(ops._SCALE_GRAD, "triton", (lambda *a: calls.append(1) or fn(*a), devices))
    g = torch.Generator().manual_seed(0)
    for reduction in ("none", "mean"):
        grads = []
        for backend in ("triton", "reference"):
            s = fastsel.Sampler(40, budget=1.0, epochs=1, backend=backend, reduction=reduction)
            iter(s)
            x = torch.randn(6, 7, generator=g).requires_grad_(True) if backend == "triton" else x.detach().clone().requires_grad_(True)
            idx = torch.tensor(s.epoch_indices()[:6])
            out = s.loss(x, idx % 7, idx)
            out.backward(torch.full_like(out, 0.5) * (torch.arange(out.numel()).reshape(out.shape) + 1))
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1])
    assert len(calls) == 2
