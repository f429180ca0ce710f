"""The op family (``torch.ops.fastsel.*``) at the op level, one suite for every implementation:
``csrc`` (C++ in csrc/, run on the CPU) and ``triton`` (fastsel/kernels/, under Triton's interpreter
without a GPU), each against the ``reference`` ops and ``F.cross_entropy`` on fresh random
inputs: ``torch.library.opcheck`` of every op (schema and declared mutations, fake kernel,
autograd registration, AOT dispatch; the reference's too); the step's loss, gradient through
the registered autograd formula, state, stats and errors for every target form (class
indices 2-D and K-dim with ignore_index, class probabilities 2-D and K-dim), class weights,
label smoothing, each reduction, bf16/fp16 logits and targets, NaN/inf rows, sizes that are
not powers of two, duplicate indices, int32 inputs, ``update=False``, ``need_grad=False``
and strict errors; observe the same way; which rows count (room and membership: strict
messages word for word with nothing written, the non-strict ROW_* counters, left-out rows);
the selection ops (select, uniform, shuffle). Then what one implementation has alone: the
C++ autograd (csrc/autograd.cpp) against ops.py's Python formula bit for bit and the profile
of a plain ``loss.backward()``; Triton's row-strided logits, the other target forms it hands
to the reference op, the radix select and the one-launch backward scaling.

Case lists are per implementation where the interpreter makes Triton slow: it runs the
cases it always ran (2-D class indices; soft and K-dim targets go to the reference op),
``csrc`` all of them. A ``csrc`` case skips when fastsel._C is not built, a ``triton`` one
when ``"triton" not in fastsel.backends.available(DEV)``.
"""
import types

import pytest
import torch
import torch.nn.functional as F

from fastsel import layout, ops
from fastsel.backends import available
from fastsel.rows import EpochRows, room_message, stray_message
import fastsel.backends.reference  # noqa: F401  (registers the reference ops)
from helpers import batch, make_state

try:
    from fastsel import _C  # noqa: F401  (registers the csrc kernels)
except ImportError:
    _C = None
DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in available(DEV)
if HAS_TRITON:
    import fastsel.backends.triton  # noqa: F401  (registers the triton ops)

SKIP = {"reference": None,
        "csrc": pytest.mark.skipif(_C is None, reason="fastsel._C is not built"),
        "triton": pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend not available on {DEV}")}
pytestmark = [
    # the interpreter's NumPy warns on the NaN/inf rows these tests feed on purpose
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


def impls(*names):
    """``impl`` parameters, each skipped where its implementation is missing."""
    return [pytest.param(n, marks=SKIP[n] or (), id=n) for n in names]


def cases(table):
    """``(impl, case)`` parameters from {impl: [case, ...]}."""
    return [pytest.param(impl, case, marks=SKIP[impl] or (), id=f"{impl}-{i}")
            for impl, cs in table.items() for i, case in enumerate(cs)]


def dev(impl):
    """Where an implementation's cases run: Triton's on DEV, the others' on the CPU."""
    return DEV if impl == "triton" else "cpu"


FIELDS = tuple(f"state_{f}" for f in layout.STEP_FIELDS) + ("state_weight", "stats", "errors")
RED = {name: code for code, name in enumerate(layout.REDUCTIONS)}
N = 23


def clone(state):
    return tuple(t.clone() for t in state)


def make_rows(seed, n=N, *, epoch=5, shard=None, trained=0, selected=0.7, open_=True, prior=False, device="cpu"):
    """An :class:`EpochRows` with a random selection (``selected`` of the N samples),
    ``trained`` of its ``shard`` rows done (shard None: room for any call); ``open_`` False:
    no epoch in progress; ``prior``: faults already counted (their first values must stay)."""
    g = torch.Generator().manual_seed(seed)
    r = EpochRows(n, device)
    sel = torch.randperm(n, generator=g)[: int(n * selected)]
    r.open(sel.to(device) if open_ else None, epoch, 10**6 if shard is None else shard, trained)
    if prior:
        r.counts[layout.ROW_STRAY_COUNT:] = torch.tensor([2, 17, 3, 40, 4], device=device)
    return r


def epoch_rows(n, selection, *, shard=100, position=0, epoch=4, device=DEV):
    """An epoch in progress over ``selection`` (None: no epoch), ``position`` of its
    ``shard`` rows trained."""
    r = EpochRows(n, device)
    r.open(None if selection is None else torch.as_tensor(selection, device=device), epoch, shard, position)
    return r


def row_args(rows, epoch, device="cpu"):
    """``member, rows, epoch`` as the ops take them, ``rows``' copied (None: every row counts)."""
    if rows is None:
        return None, None, torch.tensor(epoch, device=device)
    return rows.member.clone(), rows.counts.clone(), torch.tensor(epoch, device=rows.member.device)


def assert_states(a, b, exact=False):
    """Two op states equal field by field (floating ones within 1e-5 unless ``exact``)."""
    assert len(a) == len(b) == len(FIELDS)
    for name, x, y in zip(FIELDS, a, b):
        if x.is_floating_point() and not exact:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        else:
            assert torch.equal(x, y), (name, x, y)


def make_target(g, shape, soft, dtype=torch.float32, ignore=0.2):
    c = shape[1]
    if soft:
        return torch.softmax(torch.randn(shape, generator=g) * 2, 1).to(dtype)
    t = torch.randint(0, c, (shape[0],) + tuple(shape[2:]), generator=g)
    t[torch.rand(t.shape, generator=g) < ignore] = -100
    return t


def faulty_batch(gen, b, c, n, dtype=torch.float32, device=DEV):
    """Logits with duplicates of a few samples, ignored rows (1 and 6), a bad label (c + 3
    at row 4) and a bad index (-5 at row 7): what deferred mode masks and counts."""
    logits, labels, indices = batch(gen, b, c, n, dtype, pool=max(2, n // 3), device=device)
    labels[[1, 6]] = -100
    labels[4] = c + 3
    indices[7] = -5
    return logits, labels, indices


def grad_out(out):
    """A grad_output that differs per element (checks the per-element scaling of "none")."""
    return (torch.arange(out.numel(), dtype=torch.float32, device=out.device) % 7 / 6 + 0.5).reshape(out.shape)


def step(impl, x, target, indices, state, *, rows=None, cw=None, ii=-100, eps=0.0, ema=0.3, red="mean",
         strict=False, epoch=5, update=True, need_grad=True):
    """One ce_step on a copy of the state and of ``rows`` (an EpochRows, or None): (out,
    grad_scale output, d(out . g)/d(x), state, row counters)."""
    st = clone(state)
    member, counts, ep = row_args(rows, epoch, x.device)
    xr = x.clone().requires_grad_(need_grad)
    out, grad, scale = ops.get("ce_step", impl)(xr, target, indices, *st, member, counts, ep, cw, ii, eps, ema,
                                                RED[red], strict, update, need_grad)
    gx = torch.autograd.grad(out, xr, grad_out(out))[0] if need_grad else None
    return out.detach(), scale, gx, st, counts


def step3(*args, **kw):
    """``step``'s (out, gradient, state)."""
    out, _, gx, st, _ = step(*args, **kw)
    return out, gx, st


def observe(impl, losses, probs, indices, state, *, rows=None, ema=0.3, red="mean", strict=False, epoch=4,
            update=True):
    """One observe on copies: (out, d(out . g)/d(losses), row_scale, state, row counters)."""
    x = losses.clone().requires_grad_(True)
    st = clone(state)
    member, counts, ep = row_args(rows, epoch, losses.device)
    out, row_scale = ops.get("observe", impl)(x, probs, indices, *st, member, counts, ep, ema, RED[red], strict,
                                              update)
    gx, = torch.autograd.grad(out, x, grad_out(out))
    return out.detach(), gx, row_scale, st, counts


#: Gradient tolerance of low-precision logits, per implementation.
LOW_TOL = {"csrc": {"rtol": 1e-2, "atol": 1e-3}, "triton": {"rtol": 2e-2, "atol": 1e-3}}


def compare(impl, x, target, indices, state, **kw):
    """``step`` of ``impl`` and of the reference on the same input: the same loss, gradient
    (in the logits' dtype), state and row counters; the CPU's grad_scale output is 1 (the
    gradient comes scaled). Returns ``impl``'s (out, gradient, state)."""
    ro, rs, rg, rst, rc = step("reference", x, target, indices, state, **kw)
    co, cs, cg, cst, cc = step(impl, x, target, indices, state, **kw)
    torch.testing.assert_close(co, ro, rtol=1e-5, atol=1e-6, equal_nan=True)
    if rg is not None:
        assert cg.dtype == x.dtype
        tol = {"rtol": 1e-5, "atol": 1e-6} if x.dtype == torch.float32 else LOW_TOL[impl]
        torch.testing.assert_close(cg, rg, equal_nan=True, **tol)
    if impl == "csrc":
        assert cs.dtype == torch.float32 and cs.dim() == 0 and float(cs.detach()) == 1.0
    assert_states(rst, cst)
    if rc is not None:
        assert torch.equal(cc, rc), (cc.tolist(), rc.tolist())
    return co, cg, cst


def _keys(gen, n, device=DEV):
    """Heavy ties, NaN, +-inf, -0.0 and +0.0."""
    keys = torch.randint(-2, 3, (n,), generator=gen).float()
    r = torch.rand(n, generator=gen)
    keys[r < 0.1] = float("nan")
    keys[(r >= 0.1) & (r < 0.2)] = float("inf")
    keys[(r >= 0.2) & (r < 0.3)] = float("-inf")
    keys[(r >= 0.3) & (r < 0.4)] = -0.0
    return keys.to(device)


def _losses(gen, b, n, dtype, device=DEV):
    """Losses with NaN/inf rows and one bad index; probs with a NaN; duplicates."""
    losses = (torch.rand(b, generator=gen) * 3).to(dtype)
    losses[2] = float("nan")
    losses[5] = float("inf")
    probs = torch.rand(b, generator=gen)
    probs[8] = float("nan")
    indices = torch.randint(0, max(2, n // 3), (b,), generator=gen)
    indices[6] = n + 2
    return losses.to(device), probs.to(device), indices.to(device)


# ---- opcheck --------------------------------------------------------------------------------

#: (shape, soft, weighted, eps, reduction, need_grad, with_rows, update, faulty batch)
_OPCHECK_GRID = [
    ((6, 5), False, False, 0.0, "mean", True),
    ((6, 5), False, True, 0.1, "sum", False),
    ((6, 5), True, True, 0.0, "none", True),
    ((4, 5, 3), False, True, 0.2, "none", True),
    ((4, 5, 3, 2), False, False, 0.0, "mean", True),
    ((4, 3, 5), True, False, 0.3, "mean", True),
    ((4, 3, 2, 2), True, True, 0.0, "sum", False),
]
#: 2-D class indices with deferred faults; "sum" without rows and update=False.
_OPCHECK_FAULTY = [((9, 5), False, red == "mean", 0.1, red, True, red != "sum", red != "sum", True)
                   for red in ("mean", "sum", "none")]
OPCHECK_STEP = {
    "reference": [_OPCHECK_GRID[6] + (False, True, False)],
    "csrc": [c + (w, True, False) for c in _OPCHECK_GRID for w in (False, True)],
    "triton": _OPCHECK_FAULTY,
}


@pytest.mark.parametrize("impl,case", cases(OPCHECK_STEP))
def test_opcheck_ce_step(gen, impl, case):
    shape, soft, weighted, eps, red, need_grad, with_rows, update, faulty = case
    d = dev(impl)
    if faulty:
        x, t, idx = faulty_batch(gen, shape[0], shape[1], 8, device=d)
        x.requires_grad_(need_grad)
        cw = (torch.rand(shape[1], generator=gen) + 0.5).to(d) if weighted else None
        # opcheck calls the op many times: a shard with room for all of them
        rows = row_args(epoch_rows(8, [1, 3], shard=10**9, epoch=2, device=d) if with_rows else None, 2, d)
        state = make_state(8, gen, d)
    else:
        g = torch.Generator().manual_seed(len(shape) * 10 + int(soft))
        x = torch.randn(shape, generator=g, requires_grad=need_grad)
        t = make_target(g, shape, soft)
        idx = torch.tensor([0, 3, 3, 1, 7, 2][: shape[0]])  # a duplicate
        cw = torch.rand(shape[1], generator=g) + 0.5 if weighted else None
        rows = row_args(make_rows(1, selected=0.6) if with_rows else None, 2)  # some rows stray
        state = make_state(N, 1)
    args = (x, t, idx, *state, *rows, cw, -100, eps, 0.3, RED[red], False, update, need_grad)
    torch.library.opcheck(ops.get("ce_step", impl).default, args)


#: (reduction, probs, losses' dtype, with_rows, losses with NaN/inf and a bad index)
_OBS_GRID = [("mean", False, torch.float32), ("none", True, torch.float16), ("sum", False, torch.float64)]
_OBS_FAULTY = [("mean", False, torch.float32, True, True), ("none", True, torch.float32, True, True)]
OPCHECK_OBSERVE = {
    "reference": [_OBS_GRID[1] + (True, False)],
    "csrc": [c + (w, False) for c in _OBS_GRID for w in (False, True)],
    "triton": _OBS_FAULTY,
}


@pytest.mark.parametrize("impl,case", cases(OPCHECK_OBSERVE))
def test_opcheck_observe(gen, impl, case):
    red, with_probs, dtype, with_rows, faulty = case
    d = dev(impl)
    if faulty:
        losses, probs, idx = _losses(gen, 11, 10, dtype, d)
        losses = losses.nan_to_num(posinf=50.0).requires_grad_(True)  # opcheck compares without NaN
        probs = probs if with_probs else None
        rows = row_args(epoch_rows(10, [1], shard=10**9, epoch=2, device=d), 2, d)
        state = make_state(10, gen, d)
    else:
        g = torch.Generator().manual_seed(3)
        losses = (torch.rand(7, generator=g) * 3).to(dtype).requires_grad_(True)
        probs = torch.rand(7, generator=g) if with_probs else None
        idx = torch.tensor([4, 4, 0, 9, 4, 2, 1])  # duplicates
        rows = row_args(make_rows(2, selected=0.6) if with_rows else None, 1)
        state = make_state(N, 2)
    args = (losses, probs, idx, *state, *rows, 0.3, RED[red], False, True)
    torch.library.opcheck(ops.get("observe", impl).default, args)


def _selection_inputs_literal(gen, d):
    keys = torch.tensor([0.5, float("nan"), 2.0, -1.0, 2.0, float("inf")], device=d)
    return (keys, 3), (torch.arange(9, device=d), 7, 2), (torch.arange(9, dtype=torch.int32, device=d), 11)


def _selection_inputs_random(gen, d):
    return ((_keys(gen, 9, d), 4), (torch.arange(-3, 6, device=d), 12, 2),
            (torch.arange(7, device=d) * 3, 5))


SELECTION_INPUTS = {"reference": [_selection_inputs_literal],
                    "csrc": [_selection_inputs_literal], "triton": [_selection_inputs_random]}


@pytest.mark.parametrize("impl,inputs", cases(SELECTION_INPUTS))
def test_opcheck_selection_ops(gen, impl, inputs):
    for name, args in zip(("select", "uniform", "shuffle"), inputs(gen, dev(impl))):
        torch.library.opcheck(ops.get(name, impl).default, args)


# ---- the step against the reference op and F.cross_entropy ---------------------------------

SHAPES = [(13, 7), (9, 5, 6), (5, 11, 3, 7), (6, 3, 1)]


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_step_matches_reference_and_cross_entropy(impl, shape, soft, red):
    """Every target form, with and without class weights and label smoothing, policy weights
    of 1: the reference's loss, gradient and state, and F.cross_entropy's loss and gradient."""
    g = torch.Generator().manual_seed(hash((shape, soft, red)) % 1000)
    x = torch.randn(shape, generator=g) * 3
    t = make_target(g, shape, soft)
    idx = torch.randint(0, 5, (shape[0],), generator=g)  # many duplicates
    state = make_state(N, 4)
    state[5][:N] = 1.0  # policy weights of 1: the loss is F.cross_entropy's
    for cw, eps in ((None, 0.0), (torch.rand(shape[1], generator=g) + 0.2, 0.15)):
        out, gx, _ = compare(impl, x, t, idx, state, cw=cw, eps=eps, red=red)
        xf = x.clone().requires_grad_(True)
        ref = F.cross_entropy(xf, t, weight=cw, label_smoothing=eps, reduction=red)
        ref.backward(grad_out(ref))
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, xf.grad, rtol=1e-5, atol=1e-6)


FAULTY_CASES = {
    # B, C not powers of two; duplicates, ignore_index, a bad index and a bad label
    "fp32": dict(b=13, c=7, dtype=torch.float32),
    # class weights, label smoothing, bf16 logits, C above the smallest column chunk
    "bf16-weighted-smoothed": dict(b=11, c=37, dtype=torch.bfloat16, cw=True, eps=0.1),
    # fp16 logits; a NaN row, a +inf logit, -inf at the label (infinite loss), int32 inputs
    "fp16-nonfinite-int32": dict(b=9, c=5, dtype=torch.float16, nonfinite=True, i32=True),
}


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(FAULTY_CASES))
def test_step_with_deferred_faults_matches_reference(gen, impl, case, reduction):
    """2-D class indices with ignored rows, a bad index and a bad label: the reference's
    loss, gradient and state; the bad values counted, non-finite losses kept out."""
    p = FAULTY_CASES[case]
    n = 10
    d = dev(impl)
    logits, labels, indices = faulty_batch(gen, p["b"], p["c"], n, p["dtype"], d)
    if p.get("nonfinite"):
        logits[0, 2] = float("nan")
        logits[2, 1] = float("inf")
        logits[3, labels[3]] = float("-inf")
    if p.get("i32"):
        labels, indices = labels.to(torch.int32), indices.to(torch.int32)
    cw = (torch.rand(p["c"], generator=gen) + 0.5).to(d) if p.get("cw") else None
    state = make_state(n, gen, d)
    _, _, s1 = compare(impl, logits, labels, indices, state, cw=cw, eps=p.get("eps", 0.0), red=reduction)
    assert s1[-1].tolist() == [1, -5, 1, p["c"] + 3]     # the bad index and label, counted
    if p.get("nonfinite"):  # three non-finite losses stayed out of the state
        assert float(s1[6][layout.STAT_NONFINITE] - state[6][layout.STAT_NONFINITE]) == 3


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,soft", [((17, 9), False), ((17, 9), True), ((6, 9, 5), False), ((6, 9, 5), True)])
def test_low_precision_logits_and_targets(impl, dtype, shape, soft):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = make_target(g, shape, soft, dtype=dtype)
    idx = torch.randint(0, N, (shape[0],), generator=g)
    out, gx, _ = compare(impl, x, t, idx, make_state(N, 5), eps=0.1, red="none")
    assert gx.dtype == dtype
    # The loss is computed in float32 from the low-precision values.
    ref = F.cross_entropy(x.float(), t.float() if soft else t, label_smoothing=0.1, reduction="none")
    w = make_state(N, 5)[5][idx].reshape((-1,) + (1,) * (ref.dim() - 1))
    torch.testing.assert_close(out, w * ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("shape,soft", [((10, 6), False), ((10, 6), True), ((10, 6, 4), False), ((10, 6, 4), True)])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_nan_and_inf_rows(impl, shape, soft, red):
    """NaN, +inf, all -inf and -inf-on-one-class elements: the same loss, gradient (NaN where
    autograd through the reference gives NaN), nonfinite count and state."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g)
    x[0, 2] = float("nan")
    x[1, 1] = float("inf")
    x[2] = float("-inf")
    x[3, 0] = float("-inf")
    x[4, :, ...] = 1e4
    t = make_target(g, shape, soft, ignore=0.0)
    if not soft:
        t[3] = 0  # the -inf class is the label: an infinite loss
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 22])
    for eps in (0.0, 0.2):
        _, _, st = compare(impl, x, t, idx, make_state(N, 6), eps=eps, red=red)
        assert float(st[6][layout.STAT_NONFINITE]) > 1.0  # counted (started at 1)


@pytest.mark.parametrize("impl", impls("csrc"))
def test_duplicates_bad_values_and_policy_weights_kdim(impl):
    g = torch.Generator().manual_seed(10)
    shape = (12, 5, 4, 3)
    x = torch.randn(shape, generator=g)
    t = make_target(g, shape, False)
    t[1, 0, 0] = 9    # a bad label
    t[2, 1, 2] = -3   # another
    idx = torch.tensor([3, 3, 3, 8, 50, 8, -1, 0, 0, 22, 3, 5])
    for red in ("mean", "sum", "none"):
        for update in (True, False):
            _, _, st = compare(impl, x, t, idx, make_state(N, 7), red=red, update=update)
            assert st[7].tolist() == [2, 50, 2, 9]  # recorded with or without the update
            if not update:
                assert_states(make_state(N, 7)[:7] + st[7:], st)  # no state or stats write


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
def test_update_false_writes_only_errors(gen, impl):
    """update=False: the same loss and gradient as update=True and as the reference, no
    state or stats written; deferred errors are still counted, as the reference does."""
    n = 10
    logits, labels, indices = faulty_batch(gen, 13, 7, n, device=dev(impl))
    state = make_state(n, gen, dev(impl))
    for red in ("mean", "none"):
        o1, g1, s1 = compare(impl, logits, labels, indices, state, red=red, update=False)
        o3, g3, _ = step3(impl, logits, labels, indices, state, red=red)
        assert torch.equal(o1, o3) and torch.equal(g1, g3)
        assert_states(state[:-1] + s1[-1:], s1, exact=True)
        assert s1[-1].tolist() == [1, -5, 1, 10]


@pytest.mark.parametrize("impl", impls("csrc"))
def test_need_grad_false_and_no_update(impl):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 4, 5, generator=g)
    t = make_target(g, x.shape, False)
    idx = torch.randint(0, N, (9,), generator=g)
    st = make_state(N, 8)
    before = clone(st)
    out, grad, scale = ops.get("ce_step", impl)(x, t, idx, *st, *row_args(None, 0), None, -100, 0.0, 0.3,
                                                RED["none"], False, False, False)
    assert grad.shape == (0,) and grad.dtype == x.dtype and float(scale.detach()) == 1.0
    assert out.shape == (9, 5)
    assert_states(before, st)
    compare(impl, x, t, idx, make_state(N, 8), need_grad=False, red="sum")


@pytest.mark.parametrize("impl", impls("csrc"))
def test_strict_raises_inside_the_op_nothing_written(impl):
    x = torch.randn(5, 3, 4)
    t = torch.zeros(5, 4, dtype=torch.long)
    t[2, 3] = 3
    st = make_state(N, 9)
    before = clone(st)
    for name in ("reference", impl):
        with pytest.raises(IndexError, match=r"^labels: 1 label\(s\) outside \[0, 3\) and not ignore_index, "
                                             r"e.g. 3; those rows were left out of the per-sample state; if 3 "
                                             r"marks elements to ignore, pass fastsel.Sampler\(..., "
                                             r"ignore_index=3\)$"):
            ops.get("ce_step", name)(x, t, torch.arange(5), *st, *row_args(None, 0), None, -100, 0.0, 0.3, 0,
                                     True, True, True)
        with pytest.raises(IndexError, match=r"^indices: 1 sample index\(es\) outside \[0, 23\), e.g. 23;"):
            ops.get("ce_step", name)(x, t, torch.tensor([0, 1, 23, 2, 3]), *st, *row_args(None, 0), None, -100,
                                     0.0, 0.3, 0, True, True, True)
    assert_states(before, st)


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("update", [True, False])
def test_strict_errors_raise_reference_message_state_untouched(gen, impl, update):
    n = 10
    d = dev(impl)
    logits, labels, indices = faulty_batch(gen, 13, 7, n, device=d)
    state = make_state(n, gen, d)
    for bad in ("index", "label"):
        lab, idx = labels.clone(), indices.clone()
        lab[4] = 2
        idx[7] = 3
        if bad == "index":
            idx[[5, 9]] = torch.tensor([n, n + 4], device=d)
        else:
            lab[[3, 8]] = torch.tensor([-2, 7], device=d)
        msgs = []
        for name in (impl, "reference"):
            st = clone(state)
            with pytest.raises(IndexError) as e:
                ops.get("ce_step", name)(logits, lab, idx, *st, *row_args(None, 4, d), None, -100, 0.0, 0.3,
                                         RED["mean"], True, update, True)
            assert_states(st, state, exact=True)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]
        assert f"{bad}" in msgs[0] and ("e.g. " + (str(n) if bad == "index" else "-2")) in msgs[0]
    # no bad row: strict runs, and writes like the deferred mode
    lab, idx = labels.clone(), indices.clone()
    lab[4], idx[7] = 2, 3
    o1, g1, s1 = step3(impl, logits, lab, idx, state, strict=True, update=update)
    o2, g2, s2 = step3(impl, logits, lab, idx, state, update=update)
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert_states(s1, s2, exact=True)


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
def test_step_every_row_masked(gen, impl):
    """No active row: "mean" is 0/0 = NaN as F.cross_entropy; the state is untouched."""
    n = 6
    d = dev(impl)
    logits = torch.randn(5, 4, generator=gen).to(d)
    labels = torch.full((5,), -100, device=d)
    indices = torch.arange(5, device=d)
    state = make_state(n, gen, d)
    for red in ("mean", "sum"):
        o1, _, s1 = compare(impl, logits, labels, indices, state, red=red)
        assert_states(state[:5] + s1[5:], s1, exact=True)
        if red == "mean":
            assert torch.isnan(o1) and torch.isnan(F.cross_entropy(logits, labels))
        else:
            assert o1.item() == 0.0


@pytest.mark.parametrize("impl", impls("csrc"))
def test_many_rows_threads_and_blocks(impl):
    """Sizes that split into several parallel tasks and position blocks (a partial last
    block), with int32 indices and labels."""
    g = torch.Generator().manual_seed(12)
    for shape, soft in (((700, 301), False), ((3, 40, 37, 29), False), ((2, 33, 1031), True)):
        x = torch.randn(shape, generator=g)
        t = make_target(g, shape, soft)
        if not soft:
            t = t.int()
        idx = torch.randint(0, N, (shape[0],), generator=g).int()
        compare(impl, x, t, idx, make_state(N, 10), eps=0.05, red="mean")


# ---- observe against the reference op -------------------------------------------------------

@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_probs", [False, True])
def test_observe_matches_reference(impl, dtype, red, with_probs):
    """NaN/inf losses and probs, duplicates, a bad index high and low, probs in float32 and
    in the losses' dtype (Triton: the latter): the reference's out, row scale, gradient (in
    the losses' dtype), state, errors and non-finite count."""
    d = dev(impl)
    g = torch.Generator().manual_seed(13)
    losses = (torch.rand(19, generator=g) * 4).to(dtype)
    losses[4] = float("nan")
    losses[9] = float("inf")
    probs = torch.rand(19, generator=g) if with_probs else None
    if probs is not None:
        probs[11] = float("nan")
    idx = torch.randint(0, 6, (19,), generator=g)  # duplicates
    idx[7] = 40
    idx[8] = -2
    state = make_state(N, 14, d)
    losses, idx = losses.to(d), idx.to(d)
    for pd in ([None] if probs is None else [torch.float32, dtype] if impl != "triton" else [dtype]):
        pr = None if pd is None else probs.to(pd).to(d)
        o2, g2, r2, s2, _ = observe(impl, losses, pr, idx, state, red=red, epoch=6)
        o1, g1, r1, s1, _ = observe("reference", losses, pr, idx, state, red=red, epoch=6)
        torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(r2, r1, rtol=1e-6, atol=0)
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert g2.dtype == dtype
        assert_states(s1, s2)
        assert s2[7].tolist() == [2, 40, 0, 0]
        nonfinite = 2 + (pr is not None)
        assert float(s2[6][layout.STAT_NONFINITE] - state[6][layout.STAT_NONFINITE]) == nonfinite


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
def test_observe_update_false_and_strict(impl):
    d = dev(impl)
    st = make_state(N, 15, d)
    before = clone(st)
    losses = torch.rand(4, device=d)
    out, rs = ops.get("observe", impl)(losses, None, torch.tensor([0, 1, 1, 30], device=d), *st,
                                       *row_args(None, 0, d), 0.3, RED["sum"], False, False)
    assert_states(before[:7] + st[7:], st)
    assert st[7].tolist() == [1, 30, 0, 0]
    assert rs[3] == 0 and torch.equal(rs[:3], st[5][torch.tensor([0, 1, 1], device=d)])
    with pytest.raises(IndexError, match=r"^indices: 2 sample index\(es\) outside \[0, 23\), e.g. -1"):
        ops.get("observe", impl)(losses, None, torch.tensor([-1, 1, 99, 3], device=d), *st, *row_args(None, 0, d),
                                 0.3, 0, True, True)
    assert st[7].tolist() == [1, 30, 0, 0]


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
def test_observe_update_false_strict_and_no_active_row(gen, impl):
    n = 10
    d = dev(impl)
    losses, probs, indices = _losses(gen, 11, n, torch.float32, d)
    state = make_state(n, gen, d)
    o1, g1, r1, s1, _ = observe(impl, losses, probs, indices, state, update=False)
    o2, g2, r2, s2, _ = observe(impl, losses, probs, indices, state)
    for a, b in ((o1, o2), (g1, g2), (r1, r2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_states(state[:-1] + s1[-1:], s1, exact=True)
    assert s1[-1].tolist() == s2[-1].tolist() == [1, n + 2, 0, 0]
    for update in (True, False):
        for name in (impl, "reference"):
            st = clone(state)
            with pytest.raises(IndexError, match=f"indices: 1 sample index.*e.g. {n + 2}"):
                ops.get("observe", name)(losses, probs, indices, *st, *row_args(None, 4, d), 0.3, RED["mean"],
                                         True, update)
            assert_states(st, state, exact=True)
    # no active row under "mean": the spec's row scale 0 and out 0, no division by zero
    bad = torch.full((4,), -1, device=d)
    out, gx, row_scale, st, _ = observe(impl, losses[:4].nan_to_num(), None, bad, state)
    assert out.item() == 0 and row_scale.tolist() == [0.0] * 4 and gx.tolist() == [0.0] * 4
    assert_states(state[:-1] + st[-1:], st, exact=True)


@pytest.mark.parametrize("impl", impls("reference", "csrc"))
def test_observe_of_cross_entropy_equals_the_fused_step(impl):
    """observe(per-sample CE, p_true) folds the same state as the fused step."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(15, 8, generator=g)
    y = torch.randint(0, 8, (15,), generator=g)
    idx = torch.randint(0, 6, (15,), generator=g)
    _, _, _, st_step, _ = step(impl, x, y, idx, make_state(N, 17), red="sum")
    losses = F.cross_entropy(x, y, reduction="none")
    st_obs = clone(make_state(N, 17))
    ops.get("observe", impl)(losses, torch.exp(-losses), idx, *st_obs, *row_args(None, 5), 0.3, RED["sum"],
                             False, True)
    assert_states(st_step, st_obs)
    assert not torch.equal(st_obs[0], make_state(N, 17)[0])  # the fold wrote the state


# ---- which rows count: room and membership, against the reference ---------------------------

#: Room and membership cases: EpochRows arguments of make_rows (b: the batch).
ROW_CASES = {
    "room": lambda s, b: make_rows(s, shard=b + 3, trained=2),
    "room, faults already counted": lambda s, b: make_rows(s, shard=b + 3, trained=2, prior=True),
    "exactly full": lambda s, b: make_rows(s, shard=b + 4, trained=4, selected=1.0),
    "past the shard": lambda s, b: make_rows(s, shard=b + 2, trained=3),
    "past the shard, faults already counted": lambda s, b: make_rows(s, shard=b + 2, trained=3, prior=True),
    "no epoch": lambda s, b: make_rows(s, open_=False),
    "nothing selected": lambda s, b: make_rows(s, selected=0.0),
}


def attempt(impl, op, first, target, indices, state, rows, *, red, strict, update, epoch=5, probs=None, cw=None,
            eps=0.0):
    """One op call on copies of the state and the row counters: ("raised", type, message),
    after checking that nothing was written, or (out, d(out . g)/d(first), state, counters)."""
    st = clone(state)
    member, counts, ep = row_args(rows, epoch)
    before = clone(st) + (() if counts is None else (counts.clone(),))
    xr = first.clone().requires_grad_(True)
    try:
        if op == "ce_step":
            out = ops.get(op, impl)(xr, target, indices, *st, member, counts, ep, cw, -100, eps, 0.3, RED[red],
                                    strict, update, True)[0]
        else:
            out = ops.get(op, impl)(xr, probs, indices, *st, member, counts, ep, 0.3, RED[red], strict, update)[0]
    except (ValueError, IndexError) as e:
        after = st + (() if counts is None else (counts,))
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{impl} wrote before raising"
        return "raised", type(e), str(e)
    gx, = torch.autograd.grad(out, xr, grad_out(out))
    return out.detach(), gx, st, counts


def assert_same_outcome(ref, got):
    if ref[0] == "raised" or got[0] == "raised":
        assert ref == got
        return
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert_states(ref[2], got[2])
    assert torch.equal(got[3], ref[3]), (got[3].tolist(), ref[3].tolist())


def expected_counts(rows, indices, n=N, epoch=5):
    """The row counters after a non-strict update call, from the rules in fastsel/ops.py."""
    c = rows.counts.clone()
    b = indices.shape[0]
    trained, shard = int(c[layout.ROW_TRAINED]), int(c[layout.ROW_SHARD])
    if shard < 0 or trained + b > shard:
        if int(c[layout.ROW_OVER_COUNT]) == 0 and b > 0:
            c[layout.ROW_OVER_VALUE] = -1 if shard < 0 else trained + b
            c[layout.ROW_OVER_EPOCH] = epoch
        c[layout.ROW_OVER_COUNT] += b
        return c, None
    stray = [int(i) for i in indices.tolist() if 0 <= i < n and int(rows.member[i]) == 0]
    if stray and int(c[layout.ROW_STRAY_COUNT]) == 0:
        c[layout.ROW_STRAY_VALUE] = stray[0]
    c[layout.ROW_STRAY_COUNT] += len(stray)
    c[layout.ROW_TRAINED] += b
    c[layout.ROW_CALLS] += 1
    return c, stray


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("case", list(ROW_CASES))
@pytest.mark.parametrize("shape,soft", [((11, 6), False), ((7, 5, 4), False), ((9, 6), True), ((5, 4, 3, 2), True)])
@pytest.mark.parametrize("seed", range(3))
def test_step_rows_match_reference(impl, case, shape, soft, seed):
    """Fresh random inputs per seed: duplicates, int32 indices (odd seeds), bad indices and
    labels (seed 2); strict errors word for word with nothing written, non-strict counters,
    loss, gradient and state as the reference; the counters as fastsel/ops.py says."""
    g = torch.Generator().manual_seed(list(ROW_CASES).index(case) * 100 + len(shape) * 10 + soft * 5 + seed)
    b = shape[0]
    x = torch.randn(shape, generator=g) * 2
    t = make_target(g, shape, soft)
    idx = torch.randint(0, N, (b,), generator=g)
    idx[1] = idx[0]
    if seed == 2:
        idx[2] = N + 4
        if not soft:
            t.view(-1)[3] = shape[1] + 2
    if seed % 2:
        idx = idx.int()
    state = make_state(N, seed)
    for red in ("mean", "sum", "none"):
        for strict in (False, True):
            for update in (True, False):
                rows = ROW_CASES[case](seed, b)
                kw = dict(red=red, strict=strict, update=update, cw=torch.rand(shape[1], generator=g) + 0.5,
                          eps=0.1 * seed)
                ref = attempt("reference", "ce_step", x, t, idx, state, rows, **kw)
                got = attempt(impl, "ce_step", x, t, idx, state, rows, **kw)
                assert_same_outcome(ref, got)
                if strict or not update or got[0] == "raised":
                    continue
                want, stray = expected_counts(rows, idx)
                assert torch.equal(got[3], want), (got[3].tolist(), want.tolist())
                if stray is None:  # refused for room: no range error recorded, nothing trained
                    assert torch.equal(got[2][7], state[7]) and torch.equal(got[2][3], state[3])
                if stray is None or case == "nothing selected":  # every row left out
                    assert torch.all(got[1] == 0)  # an all-masked mean too: 0, not NaN


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("case", list(ROW_CASES))
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_observe_rows_match_reference(impl, case, with_probs, seed):
    g = torch.Generator().manual_seed(list(ROW_CASES).index(case) * 100 + with_probs * 10 + seed)
    b = 13
    losses = torch.rand(b, generator=g) * 3
    losses[5] = float("nan")
    probs = torch.rand(b, generator=g) if with_probs else None
    idx = torch.randint(0, N, (b,), generator=g)
    idx[4] = idx[3]
    if seed == 2:
        idx[6] = -3
    if seed % 2:
        idx = idx.int()
    state = make_state(N, seed + 40)
    for red in ("mean", "sum", "none"):
        for strict in (False, True):
            for update in (True, False):
                rows = ROW_CASES[case](seed, b)
                kw = dict(red=red, strict=strict, update=update, probs=probs)
                ref = attempt("reference", "observe", losses, None, idx, state, rows, **kw)
                got = attempt(impl, "observe", losses, None, idx, state, rows, **kw)
                assert_same_outcome(ref, got)
                if strict or not update or got[0] == "raised":
                    continue
                want, _ = expected_counts(rows, idx)
                assert torch.equal(got[3], want), (got[3].tolist(), want.tolist())


@pytest.mark.parametrize("impl", impls("csrc"))
def test_strict_rows_errors_in_order_and_words(impl):
    """Room first (both kinds), then the stray rows (the first in row order), then the range
    errors; ValueError with fastsel/rows.py's words; the same from both implementations."""
    x = torch.randn(6, 4)
    t = torch.tensor([0, 1, 2, 3, 9, 1])  # a bad label
    state = make_state(N, 50)
    rows = make_rows(50, shard=100, trained=10)
    member = rows.member
    out = [i for i in range(N) if int(member[i]) == 0][:2]
    inn = [i for i in range(N) if int(member[i]) == 1][:2]
    idx = torch.tensor([inn[0], out[1], N + 1, out[0], inn[1], out[1]])
    cases_ = [
        (make_rows(50, open_=False), ValueError, room_message(6, 5, 0, -1)),
        (make_rows(50, shard=14, trained=10), ValueError, room_message(6, 5, 10, 14)),
        (rows, ValueError, stray_message(3, 5, out[1])),
    ]
    for r, kind, msg in cases_:
        for name in ("reference", impl):
            got = attempt(name, "ce_step", x, t, idx, state, r, red="mean", strict=True, update=True)
            assert got == ("raised", kind, msg), (name, got)
            got = attempt(name, "observe", torch.rand(6), None, idx, state, r, red="sum", strict=True, update=True)
            assert got == ("raised", kind, msg), (name, got)
    idx[1] = idx[3] = idx[5] = inn[0]  # no stray row left: the range errors
    for name in ("reference", impl):
        got = attempt(name, "ce_step", x, t, idx, state, rows, red="mean", strict=True, update=True)
        assert got[:2] == ("raised", IndexError) and got[2].startswith("indices: 1 sample index(es)"), got
    # update=False: no room or membership check, every row counts.
    for name in ("reference", impl):
        got = attempt(name, "ce_step", x, torch.tensor([0, 1, 2, 3, 0, 1]), idx.clamp(max=N - 1),
                      state, make_rows(50, open_=False), red="mean", strict=True, update=False)
        assert got[0] != "raised" and torch.isfinite(got[0]).all()


# ---- which rows count over two calls, against the reference -------------------------------

ROWS_N, ROWS_B, ROWS_C = 11, 13, 7   # none a power of two


def _rows_batch(gen, n=ROWS_N, b=ROWS_B, c=ROWS_C, stray=1, device=DEV):
    """faulty_batch's rows (ignored rows, a bad index at row 7, a bad label at row 4) over
    indices in [0, n): with the even samples selected, members and strays, each duplicated
    (rows 0, 1 and 2 are member 0; rows 3 and 5 the odd sample ``stray``, the first stray row)."""
    logits, labels, _ = faulty_batch(gen, b, c, n, device=device)
    indices = torch.randint(0, n, (b,), generator=gen)
    indices[[0, 1, 2]] = 0
    indices[[3, 5]] = stray
    indices[7] = -5
    return logits, labels, indices.to(device)


#: Rows of the two calls of each case (the second smaller: its refusal reaches elsewhere).
ROWS_CALLS = (ROWS_B, ROWS_B - 4)
#: (selection, shard, position) of the epoch the two calls meet. "stray": room for both,
#: odd samples stray; "fits-once": the first call takes the shard to its end (admitted),
#: the second is refused; "past-shard" and "no-epoch": both refused.
TWO_CALL_CASES = {
    "stray": (range(0, ROWS_N, 2), 100, 5),
    "fits-once": (range(0, ROWS_N, 2), 2 * ROWS_B - 1, ROWS_B - 1),
    "past-shard": (range(ROWS_N), 20, 12),
    "no-epoch": (None, 100, 0),
}


def _two_calls(op, impl, batches, state, rows, **kw):
    """Two calls of ``op`` on one copy of ``state`` and ``rows``: ([(out, grad)] per call,
    state after, row counters after)."""
    st = clone(state)
    member, counts, ep = row_args(rows, 4)
    res = []
    for data in batches:
        x = data[0].clone().requires_grad_(True)
        if op == "ce_step":
            out = ops.get(op, impl)(x, data[1], data[2], *st, member, counts, ep, kw.get("cw"), -100,
                                    kw.get("eps", 0.0), 0.3, RED[kw["red"]], False, True, True)[0]
        else:
            out = ops.get(op, impl)(x, data[1], data[2], *st, member, counts, ep, 0.3, RED[kw["red"]],
                                    False, True)[0]
        gx, = torch.autograd.grad(out, x, grad_out(out))
        res.append((out.detach(), gx))
    return res, st, counts


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(TWO_CALL_CASES))
@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_counted_and_left_out_as_reference(gen, impl, op, case, reduction):
    """Non-strict: rows a refused call or a stray index leaves out add nothing to the loss,
    its gradient, the mean's divisor or the state; the ROW_* counters, state, stats and
    errors equal the reference's after two calls (the first stray sample and the first
    refused call's position are kept; a refused call's range errors are not recorded)."""
    d = dev(impl)
    sel, shard, position = TWO_CALL_CASES[case]
    rows = epoch_rows(ROWS_N, sel, shard=shard, position=position, device=d)
    state = make_state(ROWS_N, gen, d)
    batches = []
    for b, stray in zip(ROWS_CALLS, (1, 3)):
        logits, labels, indices = _rows_batch(gen, b=b, stray=stray, device=d)
        if op == "observe":
            probs = None if stray == 1 else torch.rand(b, generator=gen).to(d)
            batches.append((torch.rand(b, generator=gen).to(d) * 3, probs, indices))
        else:
            batches.append((logits, labels, indices))
    kw = dict(red=reduction)
    if op == "ce_step" and reduction == "mean":
        kw.update(cw=(torch.rand(ROWS_C, generator=gen) + 0.5).to(d), eps=0.1)
    (r1, s1, c1), (r2, s2, c2) = (_two_calls(op, name, batches, state, rows, **kw)
                                  for name in (impl, "reference"))
    for (o1, g1), (o2, g2) in zip(r1, r2):
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert_states(s1, s2)
    assert c1.tolist() == c2.tolist()
    c = c1.tolist()
    admitted = {"stray": 2, "fits-once": 1, "past-shard": 0, "no-epoch": 0}[case]
    assert c[layout.ROW_OVER_COUNT] == sum(ROWS_CALLS[admitted:])
    assert c[layout.ROW_CALLS] == admitted
    assert c[layout.ROW_TRAINED] == position + sum(ROWS_CALLS[:admitted])
    if admitted < 2:   # the first refused call's position and epoch
        assert c[layout.ROW_OVER_EPOCH] == 4
        assert c[layout.ROW_OVER_VALUE] == (-1 if sel is None else
                                            c[layout.ROW_TRAINED] + ROWS_CALLS[admitted])
    if admitted == 0:   # nothing written: no state, no stats, no errors
        assert_states(s1, state, exact=True)
    if admitted and case != "past-shard":  # odd samples are stray, sample 1 first
        assert c[layout.ROW_STRAY_VALUE] == 1 and c[layout.ROW_STRAY_COUNT] >= 2 * admitted


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_strict_messages_equal_reference_nothing_written(gen, impl, op):
    """Strict: a refused call (no epoch, past the shard) raises ``room_message``, a stray
    row ``stray_message`` (before the range checks: a batch with both raises the stray
    error), each the reference's text, with no state or counter written; a call without
    a fault writes like the non-strict one."""
    d = dev(impl)
    logits, labels, indices = _rows_batch(gen, device=d)
    data = (torch.rand(ROWS_B, generator=gen).to(d), None) if op == "observe" else (logits, labels)
    state = make_state(ROWS_N, gen, d)
    evens = range(0, ROWS_N, 2)
    cases_ = [(epoch_rows(ROWS_N, None, device=d), room_message(ROWS_B, 4, 0, -1)),
              (epoch_rows(ROWS_N, evens, shard=20, position=8, device=d), room_message(ROWS_B, 4, 8, 20)),
              (epoch_rows(ROWS_N, evens, device=d),
               stray_message(int(((indices >= 0) & (indices % 2 == 1)).sum()), 4, 1))]

    def call(name, st, member, counts, strict=True, idx=indices):
        ep = torch.tensor(4, device=d)
        if op == "ce_step":
            lab = data[1].clone()
            lab[4] = 0     # no bad label: only the stray rows and the bad index are faults
            return ops.get(op, name)(data[0], lab, idx, *st, member, counts, ep, None, -100, 0.0, 0.3,
                                     RED["mean"], strict, True, False)
        return ops.get(op, name)(data[0], None, idx, *st, member, counts, ep, 0.3, RED["mean"], strict, True)

    for rows, want in cases_:
        msgs = []
        for name in (impl, "reference"):
            st = clone(state)
            member, counts, _ = row_args(rows, 4)
            with pytest.raises(ValueError) as e:
                call(name, st, member, counts)
            assert_states(st, state, exact=True)
            assert torch.equal(counts, rows.counts)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] == want
    # no fault: strict writes what the non-strict call writes
    members = indices.clamp(min=0) // 2 * 2    # selected samples only, none out of range
    member_rows = epoch_rows(ROWS_N, evens, device=d)
    got = []
    for strict in (True, False):
        st = clone(state)
        member, counts, _ = row_args(member_rows, 4)
        out = call(impl, st, member, counts, strict, members)[0]
        got.append((out, st, counts))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][2], got[1][2])
    assert_states(got[0][1], got[1][1], exact=True)
    assert got[0][2].tolist()[:layout.ROW_CALLS + 1] == [ROWS_B, 100, 1]


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_update_false_neither_checked_nor_counted(gen, impl, op):
    """update=False with an epoch's rows: no check (strict raises nothing for the stray
    rows, or with no epoch in progress), no count, the same loss and gradient as without
    rows (every row counts)."""
    d = dev(impl)
    logits, labels, indices = _rows_batch(gen, device=d)
    labels[4], indices[7] = 0, 3     # no range error: strict would raise those
    state = make_state(ROWS_N, gen, d)
    losses = torch.rand(ROWS_B, generator=gen).to(d)
    for rows in (epoch_rows(ROWS_N, range(0, ROWS_N, 2), device=d), epoch_rows(ROWS_N, None, device=d)):
        res = []
        for given in (rows, None):
            if op == "ce_step":
                o, _, g, st, counts = step(impl, logits, labels, indices, state, rows=given, epoch=4,
                                           update=False, strict=True)
            else:
                o, g, _, st, counts = observe(impl, losses, None, indices, state, rows=given,
                                              update=False, strict=True)
            res.append((o, g, st))
            if given is not None:
                assert torch.equal(counts, rows.counts)
        torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(res[0][1], res[1][1])
        assert_states(res[0][2], res[1][2], exact=True)


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_empty_call(gen, impl, op):
    """A call of no rows: admitted (one call, no rows) in an epoch in progress, refused
    without one (nothing kept: the first refused call's position waits for one with rows),
    as the reference."""
    d = dev(impl)
    state = make_state(ROWS_N, gen, d)
    idx = torch.zeros(0, dtype=torch.int64, device=d)
    data = ((torch.zeros(0, device=d), None) if op == "observe"
            else (torch.zeros(0, ROWS_C, device=d), torch.zeros(0, dtype=torch.int64, device=d)))
    for sel in (range(3), None):
        rows = epoch_rows(ROWS_N, sel, shard=5, position=5, device=d)
        got = [_two_calls(op, name, [(data[0], data[1], idx)], state, rows, red="sum")
               for name in (impl, "reference")]
        assert got[0][2].tolist() == got[1][2].tolist()
        assert_states(got[0][1], got[1][1], exact=True)
        assert got[0][2][layout.ROW_CALLS] == (1 if sel is not None else 0)
        assert got[0][2][layout.ROW_OVER_COUNT] == 0


# ---- the selection ops ----------------------------------------------------------------------

#: What a k past the keys raises, per implementation.
K_ERROR = {"csrc": RuntimeError, "triton": ValueError}


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
@pytest.mark.parametrize("n", [1, 5, 77, 8193])  # 8193: above Triton's in-batch top-k, radix select
def test_select_equals_reference(gen, impl, n):
    keys = _keys(gen, n, dev(impl))
    for k in sorted({0, 1, n // 3, n - 1, n}):
        assert torch.equal(ops.get("select", impl)(keys, k), ops.get("select", "reference")(keys, k)), k
    with pytest.raises(K_ERROR[impl], match=r"k must be in \[0, "):
        ops.get("select", impl)(keys, n + 1)


@pytest.mark.parametrize("impl", impls("csrc", "triton"))
def test_uniform_and_shuffle_equal_reference(impl):
    d = dev(impl)
    idx = torch.tensor([[0, 7, 2**31 + 3], [-4, 5, 2**40]], device=d)
    for key, stream in ((0, 1), (2**31 - 1, 3)):
        assert torch.equal(ops.get("uniform", impl)(idx, key, stream),
                           ops.get("uniform", "reference")(idx, key, stream))
    chosen = torch.tensor([9, 4, 4, 0, 17, 3], device=d)
    assert torch.equal(ops.get("shuffle", impl)(chosen, 12), ops.get("shuffle", "reference")(chosen, 12))
    assert ops.get("shuffle", impl)(chosen[:0], 12).numel() == 0


# ---- csrc alone: the C++ autograd (csrc/autograd.cpp) -----------------------------------------

@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,soft", [((9, 6), False), ((5, 4, 3), False), ((7, 5), True)])
def test_cpp_step_backward_is_the_python_formula(impl, dtype, red, shape, soft):
    """Bit for bit: ops.py's _ce_step_backward on the same saved grad and grad_scale, for
    grad_output 1 (grad itself where the formula returns it) and others."""
    g = torch.Generator().manual_seed(60)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_(True)
    t = make_target(g, shape, soft, dtype=dtype)
    idx = torch.randint(0, N, (shape[0],), generator=g)
    out, grad, scale = ops.get("ce_step", impl)(x, t, idx, *make_state(N, 60), *row_args(make_rows(60), 1), None,
                                                -100, 0.1, 0.3, RED[red], False, True, True)
    assert out.grad_fn is not None and not grad.requires_grad and not scale.requires_grad
    ctx = types.SimpleNamespace(saved_tensors=(grad, scale), per_row=red == "none", impl=impl)
    for go in (torch.ones_like(out), grad_out(out), torch.full_like(out, -2.5)):
        cpp, = torch.autograd.grad(out, x, go, retain_graph=True)
        py = ops._ce_step_backward(ctx, go)[0]
        assert cpp.dtype == dtype and torch.equal(cpp, py)
    x.grad = None
    out.backward(None if out.dim() == 0 else torch.ones_like(out))  # a scalar's: the engine's host 1
    assert torch.equal(x.grad, ops._ce_step_backward(ctx, torch.ones_like(out))[0])


@pytest.mark.parametrize("impl", impls("csrc"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_cpp_observe_backward_is_the_python_formula(impl, dtype, red):
    g = torch.Generator().manual_seed(61)
    losses = (torch.rand(11, generator=g) * 3).to(dtype).requires_grad_(True)
    idx = torch.randint(0, N, (11,), generator=g)
    out, row_scale = ops.get("observe", impl)(losses, None, idx, *make_state(N, 61), *row_args(make_rows(61), 1),
                                              0.3, RED[red], False, True)
    assert out.grad_fn is not None and not row_scale.requires_grad
    ctx = types.SimpleNamespace(saved_tensors=(row_scale,), dtype=dtype)
    for go in (torch.ones_like(out), grad_out(out)):
        cpp, = torch.autograd.grad(out, losses, go, retain_graph=True)
        py = ops._observe_backward(ctx, go)[0]
        assert cpp.dtype == dtype and torch.equal(cpp, py)


@pytest.mark.parametrize("impl", impls("csrc"))
def test_autograd_kernel_wraps_only_what_needs_a_gradient(impl):
    x, t, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3])
    op = ops.get("ce_step", impl)

    def call(xx):
        return op(xx, t, idx, *make_state(N, 62), *row_args(None, 0), None, -100, 0.0, 0.3, 0, False, True, True)
    assert call(x)[0].grad_fn is None                       # no input requires grad
    with torch.no_grad():
        assert call(x.clone().requires_grad_(True))[0].grad_fn is None
    out, grad, scale = call(x.clone().requires_grad_(True))
    assert out.requires_grad and not grad.requires_grad and not scale.requires_grad
    for op_name in ("ce_step_csrc", "observe_csrc"):
        autograd = [line for line in torch._C._dispatch_dump(f"fastsel::{op_name}").splitlines()
                    if line.startswith("Autograd[alias]:")]
        assert len(autograd) == 1 and "csrc/autograd.cpp" in autograd[0], autograd


def top_level(fn):
    """The aten/fastsel ops ``fn()`` dispatches that no other aten/fastsel op (or a leaf's
    AccumulateGrad) dispatched (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()

    def ours(name):
        return name.startswith(("aten::", "fastsel::"))
    top = []
    for e in prof.events():
        p = e.cpu_parent
        while p is not None and not ours(p.name) and "AccumulateGrad" not in p.name:
            p = p.cpu_parent
        if ours(e.name) and p is None:
            top.append(e.name)
    return sorted(top)


@pytest.mark.parametrize("impl", impls("csrc"))
def test_plain_backward_dispatches_only_the_op_and_ones_like(impl):
    """loss.backward() on a leaf: the forward's one op and the engine's own ones_like, no op
    of the backward formula (a host 1 read without .item()); AccumulateGrad's own if any.
    observe's backward of float32 losses: one multiplication."""
    g = torch.Generator().manual_seed(63)
    x = torch.randn(16, 7, generator=g, requires_grad=True)
    t = torch.randint(0, 7, (16,), generator=g)
    idx = torch.randint(0, N, (16,), generator=g)
    st = make_state(N, 63)
    args = (*row_args(make_rows(63), 3), None, -100, 0.0, 0.3, RED["mean"], False, True, True)
    op = ops.get("ce_step", impl).default
    top = top_level(lambda: op(x, t, idx, *st, *args)[0].backward())
    assert top == ["aten::ones_like", "fastsel::ce_step_csrc"], top
    ref = x.detach().clone().requires_grad_(True)
    ops.get("ce_step", "reference")(ref, t, idx, *make_state(N, 63), *args)[0].backward()
    torch.testing.assert_close(x.grad, ref.grad)

    losses = torch.rand(16, generator=g, requires_grad=True)
    obs = ops.get("observe", impl).default
    obs_args = (*row_args(make_rows(63), 3), 0.3, RED["mean"], False, True)
    top = top_level(lambda: obs(losses, None, idx, *st, *obs_args)[0].backward())
    assert top == ["aten::mul", "aten::ones_like", "fastsel::observe_csrc"], top


@pytest.mark.parametrize("impl", impls("csrc"))
def test_backward_under_a_dispatch_mode_runs_the_formula(impl):
    """With a dispatch mode active the host 1 is not read: the formula runs as is, seen by the
    mode, with the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    x = torch.randn(6, 4, requires_grad=True)
    t, idx = torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6)
    loss = ops.get("ce_step", impl)(x, t, idx, *make_state(N, 64), *row_args(None, 0), None, -100, 0.0, 0.3, 0,
                                    False, True, True)[0]
    plain, = torch.autograd.grad(loss, x, torch.ones(()), retain_graph=True)
    seen = Seen()
    with seen:
        gx, = torch.autograd.grad(loss, x, torch.ones(()))
    assert "aten.mul.Tensor" in seen.ops
    assert torch.equal(gx, plain)


# ---- triton alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", impls("triton"))
def test_step_row_strided_logits(gen, impl):
    """Logits whose rows are strided (a column slice) are read in place, as if contiguous."""
    n = 8
    big = torch.randn(9, 16, generator=gen).to(DEV)
    _, labels, indices = faulty_batch(gen, 9, 7, n)
    state = make_state(n, gen, DEV)
    assert not big[:, 3:10].is_contiguous()
    o1, g1, s1 = step3(impl, big[:, 3:10], labels, indices, state, red="none")
    o2, g2, s2 = step3(impl, big[:, 3:10].contiguous(), labels, indices, state, red="none")
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    assert_states(s1, s2, exact=True)


@pytest.mark.parametrize("impl", impls("triton"))
def test_step_other_target_forms_run_on_reference(gen, impl):
    """Soft targets and K-dim logits given to the triton op directly run the reference op."""
    n = 5
    state = make_state(n, gen, DEV)
    idx = torch.tensor([0, 3, 3], device=DEV)
    soft = torch.softmax(torch.randn(3, 4, generator=gen), 1).to(DEV)
    kdim = torch.randint(0, 4, (3, 2), generator=gen).to(DEV)
    for logits, target in ((torch.randn(3, 4, generator=gen).to(DEV), soft),
                           (torch.randn(3, 4, 2, generator=gen).to(DEV), kdim)):
        o1, g1, s1 = step3(impl, logits, target, idx, state, eps=0.05)
        o2, g2, s2 = step3("reference", logits, target, idx, state, eps=0.05)
        assert torch.equal(o1, o2) and torch.equal(g1, g2)
        assert_states(s1, s2, exact=True)


@pytest.mark.parametrize("impl", impls("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_is_bit_identical_to_the_autograd_formula(gen, impl, dtype):
    """``scale_grad`` (one launch, grad_output and scale read on the device) gives the bits
    of ``fastsel.ops``' formula: a 0-d grad_output, one per row, and a stride-0 expanded one
    (``out.sum().backward()`` under reduction "none")."""
    from fastsel.backends.triton import scale_grad
    grad = (torch.randn(13, 7, generator=gen) * 3).to(dtype).to(DEV)
    scale = torch.tensor(1.0 / 3.0, device=DEV)
    for per_row, g in ((False, torch.tensor(0.7)), (True, torch.rand(13, generator=gen)),
                       (True, torch.ones(()).expand(13)), (False, torch.tensor(1.0))):
        g = g.to(DEV)
        s = g.to(torch.float32) * scale
        s = s.unsqueeze(1) if per_row else s
        want = grad * s if dtype == torch.float32 else (grad.to(torch.float32) * s).to(dtype)
        got = scale_grad(grad, g, scale, per_row)
        assert got.dtype == dtype
        if DEV == "cpu" and dtype == torch.bfloat16:  # the interpreter's float32 -> bf16
            # rounding is approximate (the GPU's cvt.rn is exact): within one bf16 ulp
            torch.testing.assert_close(got.float(), want.float(), rtol=2.0 ** -7, atol=0)
        else:
            assert torch.equal(got, want), (per_row, g.shape)
    assert scale_grad(grad[:0], torch.tensor(1.0, device=DEV), scale, False).numel() == 0
