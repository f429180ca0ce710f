"""The ``csrc`` implementation of the op family (``torch.ops.fastsel.*_csrc``, C++ in csrc/)
at the op level: ``torch.library.opcheck`` of every op on small inputs (schema and declared
mutations, fake kernel, autograd registration, AOT dispatch), and the step and observe
against the ``reference`` ops and ``F.cross_entropy``: loss, gradient through the registered
autograd formula, state, stats and errors, for every target form (class indices 2-D and
K-dim with ignore_index, class probabilities 2-D and K-dim), class weights, label
smoothing, each reduction, low-precision logits and targets, NaN/inf rows, sizes that are
not powers of two, duplicate indices, ``update=False`` and ``need_grad=False``; which rows
count (room, membership: strict errors, counters, left-out rows) against the reference; the
C++ autograd (csrc/autograd.cpp) against ops.py's Python formula, bit for bit, and the
profile of a plain ``loss.backward()``.
"""
import types

import pytest
import torch
import torch.nn.functional as F

from fastsel import layout, ops
from fastsel.rows import EpochRows

try:
    from fastsel import _C  # noqa: F401  (registers the csrc kernels)
    import fastsel.backends.reference  # noqa: F401  (registers the reference ops)
except ImportError:
    _C = None
pytestmark = pytest.mark.skipif(_C is None, reason="fastsel._C is not built")

FIELDS = tuple(f"state_{f}" for f in layout.STEP_FIELDS) + ("state_weight", "stats", "errors")
RED = {name: code for code, name in enumerate(layout.REDUCTIONS)}
N = 23


def make_state(seed, n=N):
    """The ops' state tensors (N + 1 entries, the last the scratch slot) from a non-trivial
    start: some samples already seen, policy weights other than 1, stats not zero."""
    g = torch.Generator().manual_seed(seed)
    seen = torch.randint(0, 3, (n + 1,), generator=g, dtype=torch.int32)
    seen[n] = 0
    was = seen > 0
    return (torch.rand(n + 1, generator=g) * 2 * was, torch.rand(n + 1, generator=g) * 0.2 * was,
            torch.rand(n + 1, generator=g) * was, seen, torch.where(was, 2, -1).to(torch.int32),
            torch.cat([torch.rand(n, generator=g) + 0.5, torch.ones(1)]),
            torch.tensor([1.0, 4.5, 3.0], dtype=torch.float64), torch.zeros(layout.ERR_SIZE, dtype=torch.int64))


def clone(state):
    return tuple(t.clone() for t in state)


def make_rows(seed, n=N, *, epoch=5, shard=None, trained=0, selected=0.7, open_=True, prior=False):
    """An :class:`EpochRows` with a random selection (``selected`` of the N samples),
    ``trained`` of its ``shard`` rows done (shard None: room for any call); ``open_`` False:
    no epoch in progress; ``prior``: faults already counted (their first values must stay)."""
    g = torch.Generator().manual_seed(seed)
    r = EpochRows(n)
    sel = torch.randperm(n, generator=g)[: int(n * selected)]
    r.open(sel if open_ else None, epoch, 10**6 if shard is None else shard, trained)
    if prior:
        r.counts[layout.ROW_STRAY_COUNT:] = torch.tensor([2, 17, 3, 40, 4])
    return r


def row_args(rows, epoch):
    """``member, rows, epoch`` as the ops take them, ``rows``' copied (None: every row counts)."""
    if rows is None:
        return None, None, torch.tensor(epoch)
    return rows.member.clone(), rows.counts.clone(), torch.tensor(epoch)


def assert_states(a, b):
    for name, x, y in zip(FIELDS, a, b):
        if x.is_floating_point():
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


def grad_out(out):
    """A grad_output that differs per element (checks the per-element scaling of "none")."""
    return (torch.arange(out.numel(), dtype=torch.float32) % 7 / 6 + 0.5).reshape(out.shape)


def step(impl, x, target, indices, state, *, rows=None, cw=None, ii=-100, eps=0.0, ema=0.3, red="mean",
         strict=False, epoch=5, update=True, need_grad=True):
    """One ce_step on a copy of the state and of ``rows`` (an EpochRows, or None): (out,
    grad_scale output, d(out . g)/d(x), state, row counters)."""
    st = clone(state)
    member, counts, ep = row_args(rows, epoch)
    xr = x.clone().requires_grad_(need_grad)
    out, grad, scale = ops.get("ce_step", impl)(xr, target, indices, *st, member, counts, ep, cw, ii, eps, ema,
                                                RED[red], strict, update, need_grad)
    gx = torch.autograd.grad(out, xr, grad_out(out))[0] if need_grad else None
    return out.detach(), scale, gx, st, counts


def compare(x, target, indices, state, **kw):
    ro, rs, rg, rst, rc = step("reference", x, target, indices, state, **kw)
    co, cs, cg, cst, cc = step("csrc", x, target, indices, state, **kw)
    torch.testing.assert_close(co, ro, rtol=1e-5, atol=1e-6, equal_nan=True)
    if rg is not None:
        tol = {} if x.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
        torch.testing.assert_close(cg, rg, equal_nan=True, **tol)
    assert cs.dtype == torch.float32 and cs.dim() == 0 and float(cs.detach()) == 1.0  # CPU grad comes scaled
    assert_states(rst, cst)
    if rc is not None:
        assert torch.equal(cc, rc), (cc.tolist(), rc.tolist())
    return co, cg, cst


SHAPES = [(13, 7), (9, 5, 6), (5, 11, 3, 7), (6, 3, 1)]


# ---- opcheck --------------------------------------------------------------------------------

@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("shape,soft,weighted,eps,red,need_grad", [
    ((6, 5), False, False, 0.0, "mean", True),
    ((6, 5), False, True, 0.1, "sum", False),
    ((6, 5), True, True, 0.0, "none", True),
    ((4, 5, 3), False, True, 0.2, "none", True),
    ((4, 5, 3, 2), False, False, 0.0, "mean", True),
    ((4, 3, 5), True, False, 0.3, "mean", True),
    ((4, 3, 2, 2), True, True, 0.0, "sum", False),
])
def test_opcheck_ce_step(shape, soft, weighted, eps, red, need_grad, with_rows):
    g = torch.Generator().manual_seed(len(shape) * 10 + int(soft))
    x = torch.randn(shape, generator=g, requires_grad=need_grad)
    t = make_target(g, shape, soft)
    idx = torch.tensor([0, 3, 3, 1, 7, 2][: shape[0]])  # a duplicate
    cw = torch.rand(shape[1], generator=g) + 0.5 if weighted else None
    rows = make_rows(1, selected=0.6) if with_rows else None  # some rows stray
    args = (x, t, idx, *make_state(1), *row_args(rows, 2), cw, -100, eps, 0.3, RED[red], False, True, need_grad)
    torch.library.opcheck(ops.get("ce_step", "csrc").default, args)


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("red,with_probs,dtype", [("mean", False, torch.float32), ("none", True, torch.float16),
                                                  ("sum", False, torch.float64)])
def test_opcheck_observe(red, with_probs, dtype, with_rows):
    g = torch.Generator().manual_seed(3)
    losses = (torch.rand(7, generator=g) * 3).to(dtype).requires_grad_(True)
    probs = torch.rand(7, generator=g) if with_probs else None
    idx = torch.tensor([4, 4, 0, 9, 4, 2, 1])  # duplicates
    rows = make_rows(2, selected=0.6) if with_rows else None
    args = (losses, probs, idx, *make_state(2), *row_args(rows, 1), 0.3, RED[red], False, True)
    torch.library.opcheck(ops.get("observe", "csrc").default, args)


def test_opcheck_select_uniform_shuffle():
    keys = torch.tensor([0.5, float("nan"), 2.0, -1.0, 2.0, float("inf")])
    torch.library.opcheck(ops.get("select", "csrc").default, (keys, 3))
    torch.library.opcheck(ops.get("uniform", "csrc").default, (torch.arange(9), 7, 2))
    torch.library.opcheck(ops.get("shuffle", "csrc").default, (torch.arange(9, dtype=torch.int32), 11))


# ---- the step against the reference op and F.cross_entropy ---------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_step_matches_reference_and_cross_entropy(shape, soft, red):
    g = torch.Generator().manual_seed(hash((shape, soft, red)) % 1000)
    x = torch.randn(shape, generator=g) * 3
    t = make_target(g, shape, soft)
    idx = torch.randint(0, 5, (shape[0],), generator=g)  # many duplicates
    state = make_state(4)
    state[5][:N] = 1.0  # policy weights of 1: the loss is F.cross_entropy's
    for cw, eps in ((None, 0.0), (torch.rand(shape[1], generator=g) + 0.2, 0.15)):
        out, gx, _ = compare(x, t, idx, state, cw=cw, eps=eps, red=red)
        xf = x.clone().requires_grad_(True)
        ref = F.cross_entropy(xf, t, weight=cw, label_smoothing=eps, reduction=red)
        ref.backward(grad_out(ref))
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, xf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,soft", [((17, 9), False), ((17, 9), True), ((6, 9, 5), False), ((6, 9, 5), True)])
def test_low_precision_logits_and_targets(dtype, shape, soft):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = make_target(g, shape, soft, dtype=dtype)
    idx = torch.randint(0, N, (shape[0],), generator=g)
    out, gx, _ = compare(x, t, idx, make_state(5), eps=0.1, red="none")
    assert gx.dtype == dtype
    # The loss is computed in float32 from the low-precision values.
    ref = F.cross_entropy(x.float(), t.float() if soft else t, label_smoothing=0.1, reduction="none")
    w = make_state(5)[5][idx].reshape((-1,) + (1,) * (ref.dim() - 1))
    torch.testing.assert_close(out, w * ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,soft", [((10, 6), False), ((10, 6), True), ((10, 6, 4), False), ((10, 6, 4), True)])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_nan_and_inf_rows(shape, soft, red):
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
        _, _, st = compare(x, t, idx, make_state(6), eps=eps, red=red)
        assert float(st[6][layout.STAT_NONFINITE]) > 1.0  # counted (started at 1)


def test_duplicates_bad_values_and_policy_weights_kdim():
    g = torch.Generator().manual_seed(10)
    shape = (12, 5, 4, 3)
    x = torch.randn(shape, generator=g)
    t = make_target(g, shape, False)
    t[1, 0, 0] = 9    # a bad label
    t[2, 1, 2] = -3   # another
    idx = torch.tensor([3, 3, 3, 8, 50, 8, -1, 0, 0, 22, 3, 5])
    for red in ("mean", "sum", "none"):
        for update in (True, False):
            _, _, st = compare(x, t, idx, make_state(7), red=red, update=update)
            assert st[7].tolist() == [2, 50, 2, 9]  # recorded with or without the update
            if not update:
                assert_states(make_state(7)[:7], st[:7])  # no state or stats write


def test_need_grad_false_and_no_update():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 4, 5, generator=g)
    t = make_target(g, x.shape, False)
    idx = torch.randint(0, N, (9,), generator=g)
    st = make_state(8)
    before = clone(st)
    out, grad, scale = ops.get("ce_step", "csrc")(x, t, idx, *st, *row_args(None, 0), None, -100, 0.0, 0.3,
                                                  RED["none"], False, False, False)
    assert grad.shape == (0,) and grad.dtype == x.dtype and float(scale.detach()) == 1.0
    assert out.shape == (9, 5)
    assert_states(before, st)
    compare(x, t, idx, make_state(8), need_grad=False, red="sum")


def test_strict_raises_inside_the_op_nothing_written():
    x = torch.randn(5, 3, 4)
    t = torch.zeros(5, 4, dtype=torch.long)
    t[2, 3] = 3
    st = make_state(9)
    before = clone(st)
    for impl in ("reference", "csrc"):
        with pytest.raises(IndexError, match=r"^labels: 1 label\(s\) outside \[0, 3\) and not ignore_index, "
                                             r"e.g. 3; those rows were left out of the per-sample state; if 3 "
                                             r"marks elements to ignore, pass fastsel.Sampler\(..., "
                                             r"ignore_index=3\)$"):
            ops.get("ce_step", impl)(x, t, torch.arange(5), *st, *row_args(None, 0), None, -100, 0.0, 0.3, 0,
                                     True, True, True)
        with pytest.raises(IndexError, match=r"^indices: 1 sample index\(es\) outside \[0, 23\), e.g. 23;"):
            ops.get("ce_step", impl)(x, t, torch.tensor([0, 1, 23, 2, 3]), *st, *row_args(None, 0), None, -100,
                                     0.0, 0.3, 0, True, True, True)
    assert_states(before, st)


def test_many_rows_threads_and_blocks():
    """Sizes that split into several parallel tasks and position blocks (a partial last
    block), with int32 indices and labels."""
    g = torch.Generator().manual_seed(12)
    for shape, soft in (((700, 301), False), ((3, 40, 37, 29), False), ((2, 33, 1031), True)):
        x = torch.randn(shape, generator=g)
        t = make_target(g, shape, soft)
        if not soft:
            t = t.int()
        idx = torch.randint(0, N, (shape[0],), generator=g).int()
        compare(x, t, idx, make_state(10), eps=0.05, red="mean")


# ---- observe against the reference op -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_probs", [False, True])
def test_observe_matches_reference(dtype, red, with_probs):
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
    state = make_state(14)
    res = {}
    for impl in ("reference", "csrc"):
        st = clone(state)
        lr = losses.clone().requires_grad_(True)
        out, row_scale = ops.get("observe", impl)(lr, probs, idx, *st, *row_args(None, 6), 0.3, RED[red], False,
                                                  True)
        gl, = torch.autograd.grad(out, lr, grad_out(out))
        res[impl] = (out.detach(), row_scale, gl, st)
    (o1, r1, g1, s1), (o2, r2, g2, s2) = res["reference"], res["csrc"]
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(r2, r1, rtol=1e-6, atol=0)
    torch.testing.assert_close(g2, g1, equal_nan=True)
    assert g2.dtype == dtype
    assert_states(s1, s2)
    assert s2[7].tolist() == [2, 40, 0, 0]


def test_observe_update_false_and_strict():
    st = make_state(15)
    before = clone(st)
    losses = torch.rand(4)
    out, rs = ops.get("observe", "csrc")(losses, None, torch.tensor([0, 1, 1, 30]), *st, *row_args(None, 0), 0.3,
                                         RED["sum"], False, False)
    assert_states(before[:7], st[:7])
    assert st[7].tolist() == [1, 30, 0, 0]
    assert rs[3] == 0 and torch.equal(rs[:3], st[5][torch.tensor([0, 1, 1])])
    with pytest.raises(IndexError, match=r"^indices: 2 sample index\(es\) outside \[0, 23\), e.g. -1"):
        ops.get("observe", "csrc")(losses, None, torch.tensor([-1, 1, 99, 3]), *st, *row_args(None, 0), 0.3, 0,
                                   True, True)
    assert st[7].tolist() == [1, 30, 0, 0]


def test_observe_of_cross_entropy_equals_the_fused_step():
    """observe(per-sample CE, p_true) folds the same state as the fused step."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(15, 8, generator=g)
    y = torch.randint(0, 8, (15,), generator=g)
    idx = torch.randint(0, 6, (15,), generator=g)
    _, _, _, st_step, _ = step("csrc", x, y, idx, make_state(17), red="sum")
    losses = F.cross_entropy(x, y, reduction="none")
    st_obs = clone(make_state(17))
    ops.get("observe", "csrc")(losses, torch.exp(-losses), idx, *st_obs, *row_args(None, 5), 0.3, RED["sum"],
                               False, True)
    assert_states(st_step, st_obs)


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


@pytest.mark.parametrize("case", list(ROW_CASES))
@pytest.mark.parametrize("shape,soft", [((11, 6), False), ((7, 5, 4), False), ((9, 6), True), ((5, 4, 3, 2), True)])
@pytest.mark.parametrize("seed", range(3))
def test_step_rows_match_reference(case, shape, soft, seed):
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
    state = make_state(seed)
    for red in ("mean", "sum", "none"):
        for strict in (False, True):
            for update in (True, False):
                rows = ROW_CASES[case](seed, b)
                kw = dict(red=red, strict=strict, update=update, cw=torch.rand(shape[1], generator=g) + 0.5,
                          eps=0.1 * seed)
                ref = attempt("reference", "ce_step", x, t, idx, state, rows, **kw)
                got = attempt("csrc", "ce_step", x, t, idx, state, rows, **kw)
                assert_same_outcome(ref, got)
                if strict or not update or got[0] == "raised":
                    continue
                want, stray = expected_counts(rows, idx)
                assert torch.equal(got[3], want), (got[3].tolist(), want.tolist())
                if stray is None:  # refused for room: no range error recorded, nothing trained
                    assert torch.equal(got[2][7], state[7]) and torch.equal(got[2][3], state[3])
                if stray is None or case == "nothing selected":  # every row left out
                    assert torch.all(got[1] == 0)  # an all-masked mean too: 0, not NaN


@pytest.mark.parametrize("case", list(ROW_CASES))
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_observe_rows_match_reference(case, with_probs, seed):
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
    state = make_state(seed + 40)
    for red in ("mean", "sum", "none"):
        for strict in (False, True):
            for update in (True, False):
                rows = ROW_CASES[case](seed, b)
                kw = dict(red=red, strict=strict, update=update, probs=probs)
                ref = attempt("reference", "observe", losses, None, idx, state, rows, **kw)
                got = attempt("csrc", "observe", losses, None, idx, state, rows, **kw)
                assert_same_outcome(ref, got)
                if strict or not update or got[0] == "raised":
                    continue
                want, _ = expected_counts(rows, idx)
                assert torch.equal(got[3], want), (got[3].tolist(), want.tolist())


def test_strict_rows_errors_in_order_and_words():
    """Room first (both kinds), then the stray rows (the first in row order), then the range
    errors; ValueError with fastsel/rows.py's words; the same from both implementations."""
    from fastsel.rows import room_message, stray_message
    x = torch.randn(6, 4)
    t = torch.tensor([0, 1, 2, 3, 9, 1])  # a bad label
    state = make_state(50)
    rows = make_rows(50, shard=100, trained=10)
    member = rows.member
    out = [i for i in range(N) if int(member[i]) == 0][:2]
    inn = [i for i in range(N) if int(member[i]) == 1][:2]
    idx = torch.tensor([inn[0], out[1], N + 1, out[0], inn[1], out[1]])
    cases = [
        (make_rows(50, open_=False), ValueError, room_message(6, 5, 0, -1)),
        (make_rows(50, shard=14, trained=10), ValueError, room_message(6, 5, 10, 14)),
        (rows, ValueError, stray_message(3, 5, out[1])),
    ]
    for r, kind, msg in cases:
        for impl in ("reference", "csrc"):
            got = attempt(impl, "ce_step", x, t, idx, state, r, red="mean", strict=True, update=True)
            assert got == ("raised", kind, msg), (impl, got)
            got = attempt(impl, "observe", torch.rand(6), None, idx, state, r, red="sum", strict=True, update=True)
            assert got == ("raised", kind, msg), (impl, got)
    idx[1] = idx[3] = idx[5] = inn[0]  # no stray row left: the range errors
    for impl in ("reference", "csrc"):
        got = attempt(impl, "ce_step", x, t, idx, state, rows, red="mean", strict=True, update=True)
        assert got[:2] == ("raised", IndexError) and got[2].startswith("indices: 1 sample index(es)"), got
    # update=False: no room or membership check, every row counts.
    for impl in ("reference", "csrc"):
        got = attempt(impl, "ce_step", x, torch.tensor([0, 1, 2, 3, 0, 1]), idx.clamp(max=N - 1),
                      state, make_rows(50, open_=False), red="mean", strict=True, update=False)
        assert got[0] != "raised" and torch.isfinite(got[0]).all()


def test_rows_arguments_are_checked():
    x, t, idx = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    st = make_state(51)
    member, counts, ep = row_args(make_rows(51), 1)
    op = ops.get("ce_step", "csrc")

    def call(m, r, e):
        return op(x, t, idx, *st, m, r, e, None, -100, 0.0, 0.3, 0, False, True, False)
    for (m, r, e), match in [
        ((member, None, ep), r"member and rows are given together .* got member given and rows None"),
        ((None, counts, ep), "got member None and rows given"),
        ((member.bool(), counts, ep), r"member must be a contiguous uint8 vector of N \+ 1 = 24 entries"),
        ((member[:-1], counts, ep), r"got uint8 of shape \[23\]; build it with fastsel.rows.EpochRows\(N\)"),
        ((member, counts[:5], ep), r"rows must be a contiguous int64 vector of 8 entries \(the slots ROW_\*"),
        ((member, counts.int(), ep), "got int32 of shape"),
        ((member, counts, ep.int()), r"epoch must be a 0-d int64 tensor .* got int32 of shape \[\]"),
        ((member, counts, ep.reshape(1)), r"epoch must be a 0-d int64 tensor .* got int64 of shape \[1\]"),
        ((None, None, torch.tensor(2**40)), "epoch must fit in int32"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call(m, r, e)
    assert torch.equal(counts, make_rows(51).counts)


# ---- the C++ autograd (csrc/autograd.cpp) -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,soft", [((9, 6), False), ((5, 4, 3), False), ((7, 5), True)])
def test_cpp_step_backward_is_the_python_formula(dtype, red, shape, soft):
    """Bit for bit: ops.py's _ce_step_backward on the same saved grad and grad_scale, for
    grad_output 1 (grad itself where the formula returns it) and others."""
    g = torch.Generator().manual_seed(60)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_(True)
    t = make_target(g, shape, soft, dtype=dtype)
    idx = torch.randint(0, N, (shape[0],), generator=g)
    out, grad, scale = ops.get("ce_step", "csrc")(x, t, idx, *make_state(60), *row_args(make_rows(60), 1), None,
                                                  -100, 0.1, 0.3, RED[red], False, True, True)
    assert out.grad_fn is not None and not grad.requires_grad and not scale.requires_grad
    ctx = types.SimpleNamespace(saved_tensors=(grad, scale), per_row=red == "none", impl="csrc")
    for go in (torch.ones_like(out), grad_out(out), torch.full_like(out, -2.5)):
        cpp, = torch.autograd.grad(out, x, go, retain_graph=True)
        py = ops._ce_step_backward(ctx, go)[0]
        assert cpp.dtype == dtype and torch.equal(cpp, py)
    x.grad = None
    out.backward(None if out.dim() == 0 else torch.ones_like(out))  # a scalar's: the engine's host 1
    assert torch.equal(x.grad, ops._ce_step_backward(ctx, torch.ones_like(out))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_cpp_observe_backward_is_the_python_formula(dtype, red):
    g = torch.Generator().manual_seed(61)
    losses = (torch.rand(11, generator=g) * 3).to(dtype).requires_grad_(True)
    idx = torch.randint(0, N, (11,), generator=g)
    out, row_scale = ops.get("observe", "csrc")(losses, None, idx, *make_state(61), *row_args(make_rows(61), 1), 0.3,
                                                RED[red], False, True)
    assert out.grad_fn is not None and not row_scale.requires_grad
    ctx = types.SimpleNamespace(saved_tensors=(row_scale,), dtype=dtype)
    for go in (torch.ones_like(out), grad_out(out)):
        cpp, = torch.autograd.grad(out, losses, go, retain_graph=True)
        py = ops._observe_backward(ctx, go)[0]
        assert cpp.dtype == dtype and torch.equal(cpp, py)


def test_autograd_kernel_wraps_only_what_needs_a_gradient():
    x, t, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3])
    op = ops.get("ce_step", "csrc")

    def call(xx):
        return op(xx, t, idx, *make_state(62), *row_args(None, 0), None, -100, 0.0, 0.3, 0, False, True, True)
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


def test_plain_backward_dispatches_only_the_op_and_ones_like():
    """loss.backward() on a leaf: the forward's one op and the engine's own ones_like, no op
    of the backward formula (a host 1 read without .item()); AccumulateGrad's own if any.
    observe's backward of float32 losses: one multiplication."""
    g = torch.Generator().manual_seed(63)
    x = torch.randn(16, 7, generator=g, requires_grad=True)
    t = torch.randint(0, 7, (16,), generator=g)
    idx = torch.randint(0, N, (16,), generator=g)
    st = make_state(63)
    args = (*row_args(make_rows(63), 3), None, -100, 0.0, 0.3, RED["mean"], False, True, True)
    op = ops.get("ce_step", "csrc").default
    top = top_level(lambda: op(x, t, idx, *st, *args)[0].backward())
    assert top == ["aten::ones_like", "fastsel::ce_step_csrc"], top
    ref = x.detach().clone().requires_grad_(True)
    ops.get("ce_step", "reference")(ref, t, idx, *make_state(63), *args)[0].backward()
    torch.testing.assert_close(x.grad, ref.grad)

    losses = torch.rand(16, generator=g, requires_grad=True)
    obs = ops.get("observe", "csrc").default
    obs_args = (*row_args(make_rows(63), 3), 0.3, RED["mean"], False, True)
    top = top_level(lambda: obs(losses, None, idx, *st, *obs_args)[0].backward())
    assert top == ["aten::mul", "aten::ones_like", "fastsel::observe_csrc"], top


def test_backward_under_a_dispatch_mode_runs_the_formula():
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
    loss = ops.get("ce_step", "csrc")(x, t, idx, *make_state(64), *row_args(None, 0), None, -100, 0.0, 0.3, 0,
                                      False, True, True)[0]
    plain, = torch.autograd.grad(loss, x, torch.ones(()), retain_graph=True)
    seen = Seen()
    with seen:
        gx, = torch.autograd.grad(loss, x, torch.ones(()))
    assert "aten.mul.Tensor" in seen.ops
    assert torch.equal(gx, plain)
