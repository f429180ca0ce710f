"""The ``csrc`` implementation of the op family (``torch.ops.fastsel.*_csrc``, C++ in csrc/)
at the op level: ``torch.library.opcheck`` of every op on small inputs (schema and declared
mutations, fake kernel, autograd registration, AOT dispatch), and the step and observe
against the ``reference`` ops and ``F.cross_entropy``: loss, gradient through the registered
autograd formula, state, stats and errors, for every target form (class indices 2-D and
K-dim with ignore_index, class probabilities 2-D and K-dim), class weights, label
smoothing, each reduction, low-precision logits and targets, NaN/inf rows, sizes that are
not powers of two, duplicate indices, ``update=False`` and ``need_grad=False``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastsel import layout, ops

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


def step(impl, x, target, indices, state, *, cw=None, ii=-100, eps=0.0, ema=0.3, red="mean", strict=False,
         epoch=5, update=True, need_grad=True):
    """One ce_step on a copy of the state: (out, grad_scale output, d(out . g)/d(x), state)."""
    st = clone(state)
    xr = x.clone().requires_grad_(need_grad)
    out, grad, scale = ops.get("ce_step", impl)(xr, target, indices, *st, cw, ii, eps, ema, RED[red], strict,
                                                epoch, update, need_grad)
    gx = torch.autograd.grad(out, xr, grad_out(out))[0] if need_grad else None
    return out.detach(), scale, gx, st


def compare(x, target, indices, state, **kw):
    ro, rs, rg, rst = step("reference", x, target, indices, state, **kw)
    co, cs, cg, cst = step("csrc", x, target, indices, state, **kw)
    torch.testing.assert_close(co, ro, rtol=1e-5, atol=1e-6, equal_nan=True)
    if rg is not None:
        tol = {} if x.dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
        torch.testing.assert_close(cg, rg, equal_nan=True, **tol)
    assert cs.dtype == torch.float32 and cs.dim() == 0 and float(cs.detach()) == 1.0  # CPU grad comes scaled
    assert_states(rst, cst)
    return co, cg, cst


SHAPES = [(13, 7), (9, 5, 6), (5, 11, 3, 7), (6, 3, 1)]


# ---- opcheck --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,soft,weighted,eps,red,need_grad", [
    ((6, 5), False, False, 0.0, "mean", True),
    ((6, 5), False, True, 0.1, "sum", False),
    ((6, 5), True, True, 0.0, "none", True),
    ((4, 5, 3), False, True, 0.2, "none", True),
    ((4, 5, 3, 2), False, False, 0.0, "mean", True),
    ((4, 3, 5), True, False, 0.3, "mean", True),
    ((4, 3, 2, 2), True, True, 0.0, "sum", False),
])
def test_opcheck_ce_step(shape, soft, weighted, eps, red, need_grad):
    g = torch.Generator().manual_seed(len(shape) * 10 + int(soft))
    x = torch.randn(shape, generator=g, requires_grad=need_grad)
    t = make_target(g, shape, soft)
    idx = torch.tensor([0, 3, 3, 1, 7, 2][: shape[0]])  # a duplicate
    cw = torch.rand(shape[1], generator=g) + 0.5 if weighted else None
    args = (x, t, idx, *make_state(1), cw, -100, eps, 0.3, RED[red], False, 2, True, need_grad)
    torch.library.opcheck(ops.get("ce_step", "csrc").default, args)


@pytest.mark.parametrize("red,with_probs,dtype", [("mean", False, torch.float32), ("none", True, torch.float16),
                                                  ("sum", False, torch.float64)])
def test_opcheck_observe(red, with_probs, dtype):
    g = torch.Generator().manual_seed(3)
    losses = (torch.rand(7, generator=g) * 3).to(dtype).requires_grad_(True)
    probs = torch.rand(7, generator=g) if with_probs else None
    idx = torch.tensor([4, 4, 0, 9, 4, 2, 1])  # duplicates
    args = (losses, probs, idx, *make_state(2), 0.3, RED[red], False, 1, True)
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
    out, grad, scale = ops.get("ce_step", "csrc")(x, t, idx, *st, None, -100, 0.0, 0.3, RED["none"], False,
                                                  0, False, False)
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
                                             r"e.g. 3; those rows were left out of the per-sample state$"):
            ops.get("ce_step", impl)(x, t, torch.arange(5), *st, None, -100, 0.0, 0.3, 0, True, 0, True, True)
        with pytest.raises(IndexError, match=r"^indices: 1 sample index\(es\) outside \[0, 23\), e.g. 23;"):
            ops.get("ce_step", impl)(x, t, torch.tensor([0, 1, 23, 2, 3]), *st, None, -100, 0.0, 0.3, 0,
                                     True, 0, True, True)
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
        out, row_scale = ops.get("observe", impl)(lr, probs, idx, *st, 0.3, RED[red], False, 6, True)
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
    out, rs = ops.get("observe", "csrc")(losses, None, torch.tensor([0, 1, 1, 30]), *st, 0.3, RED["sum"], False,
                                         0, False)
    assert_states(before[:7], st[:7])
    assert st[7].tolist() == [1, 30, 0, 0]
    assert rs[3] == 0 and torch.equal(rs[:3], st[5][torch.tensor([0, 1, 1])])
    with pytest.raises(IndexError, match=r"^indices: 2 sample index\(es\) outside \[0, 23\), e.g. -1"):
        ops.get("observe", "csrc")(losses, None, torch.tensor([-1, 1, 99, 3]), *st, 0.3, 0, True, 0, True)
    assert st[7].tolist() == [1, 30, 0, 0]


def test_observe_of_cross_entropy_equals_the_fused_step():
    """observe(per-sample CE, p_true) folds the same state as the fused step."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(15, 8, generator=g)
    y = torch.randint(0, 8, (15,), generator=g)
    idx = torch.randint(0, 6, (15,), generator=g)
    _, _, _, st_step = step("csrc", x, y, idx, make_state(17), red="sum")
    losses = F.cross_entropy(x, y, reduction="none")
    st_obs = clone(make_state(17))
    ops.get("observe", "csrc")(losses, torch.exp(-losses), idx, *st_obs, 0.3, RED["sum"], False, 5, True)
    assert_states(st_step, st_obs)
