"""The ``triton`` implementation of the op family (``torch.ops.fastsel.*_triton``) at the op
level: ``torch.library.opcheck`` of every op (schema, mutations, fake kernel, autograd
registration, AOT dispatch), and every op against the ``reference`` op on the same inputs:
loss, gradient (through the registered autograd formula) and the resulting state, stats and
errors, with duplicates, NaN/inf rows, low-precision logits and losses, sizes that are not
powers of two, ignore_index, ``update=False`` and strict errors.

Inputs are tiny: without a GPU the kernels run under Triton's interpreter (conftest).
"""
import pytest
import torch
import torch.nn.functional as F

from fastsel import layout, ops
from fastsel.backends import available
import fastsel.backends.reference  # noqa: F401  (registers the reference ops)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = "triton" in available(DEV)
pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason=f"triton backend not available on {DEV}"),
    # the interpreter's NumPy warns on the NaN/inf rows these tests feed on purpose
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
if HAS_TRITON:
    import fastsel.backends.triton  # noqa: F401  (registers the triton ops)

NAMES = tuple(f"state_{f}" for f in layout.STEP_FIELDS) + ("state_weight", "stats", "errors")
RED = {r: layout.REDUCTIONS.index(r) for r in layout.REDUCTIONS}


def _op(name, impl="triton"):
    return ops.get(name, impl)


def _state(gen, n):
    """The op schemas' state tensors (N + 1 entries, slot N the neutral scratch slot), from
    a non-trivial start: some samples seen before (the EMA branch), others never (the first
    observation), stats not zero, policy weights not one."""
    seen = torch.randint(0, 3, (n + 1,), generator=gen, dtype=torch.int32)
    seen[n] = 0
    was = seen > 0
    loss = torch.rand(n + 1, generator=gen) * 2 * was
    var = torch.rand(n + 1, generator=gen) * 0.1 * was
    p = torch.rand(n + 1, generator=gen) * was
    last = torch.where(was, 1, -1).to(torch.int32)
    weight = torch.rand(n + 1, generator=gen) + 0.5
    weight[n] = 1.0
    stats = torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64)
    errors = torch.zeros(layout.ERR_SIZE, dtype=torch.int64)
    return tuple(t.to(DEV) for t in (loss, var, p, seen, last, weight, stats, errors))


def _clone(state):
    return tuple(t.clone() for t in state)


def _assert_state(a, b, exact=False):
    for name, x, y in zip(NAMES, a, b):
        if x.is_floating_point() and not exact:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(x, y), (name, x, y)


def _g_out(out):
    """A grad_output that differs per row (checks the per-row scaling of "none")."""
    return (torch.arange(out.numel(), dtype=torch.float32, device=out.device) % 5 / 4 + 0.5
            ).reshape(out.shape)


def _step(impl, logits, target, indices, state, *, cw=None, ii=-100, eps=0.0, ema=0.3,
          red="mean", strict=False, epoch=4, update=True):
    """One ce_step on a copy of ``state``: (out, d(out . g)/d(logits), state after)."""
    x = logits.clone().requires_grad_(True)
    st = _clone(state)
    out, _, _ = _op("ce_step", impl)(x, target, indices, *st, cw, ii, eps, ema, RED[red],
                                     strict, epoch, update, True)
    gx, = torch.autograd.grad(out, x, _g_out(out))
    return out.detach(), gx, st


def _observe(impl, losses, probs, indices, state, *, ema=0.3, red="mean", strict=False,
             epoch=4, update=True):
    x = losses.clone().requires_grad_(True)
    st = _clone(state)
    out, row_scale = _op("observe", impl)(x, probs, indices, *st, ema, RED[red], strict, epoch,
                                          update)
    gx, = torch.autograd.grad(out, x, _g_out(out))
    return out.detach(), gx, row_scale, st


def _batch(gen, b, c, n, dtype=torch.float32):
    """Logits with duplicates of a few samples, ignored rows, one bad index and one bad
    label (deferred mode masks and counts them)."""
    logits = (torch.randn(b, c, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, c, (b,), generator=gen)
    labels[[1, 6]] = -100
    labels[4] = c + 3
    indices = torch.randint(0, max(2, n // 3), (b,), generator=gen)  # duplicates
    indices[7] = -5
    return logits.to(DEV), labels.to(DEV), indices.to(DEV)


CASES = {
    # B, C not powers of two; duplicates, ignore_index, a bad index and a bad label
    "fp32": dict(b=13, c=7, dtype=torch.float32),
    # class weights, label smoothing, bf16 logits, C above the smallest column chunk
    "bf16-weighted-smoothed": dict(b=11, c=37, dtype=torch.bfloat16, cw=True, eps=0.1),
    # fp16 logits; a NaN row, a +inf logit, -inf at the label (infinite loss), int32 inputs
    "fp16-nonfinite-int32": dict(b=9, c=5, dtype=torch.float16, nonfinite=True, i32=True),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_ce_step_matches_reference(gen, case, reduction):
    p = CASES[case]
    n = 10
    logits, labels, indices = _batch(gen, p["b"], p["c"], n, p["dtype"])
    if p.get("nonfinite"):
        logits[0, 2] = float("nan")
        logits[2, 1] = float("inf")
        logits[3, labels[3]] = float("-inf")
    if p.get("i32"):
        labels, indices = labels.to(torch.int32), indices.to(torch.int32)
    cw = (torch.rand(p["c"], generator=gen) + 0.5).to(DEV) if p.get("cw") else None
    state = _state(gen, n)
    kw = dict(cw=cw, eps=p.get("eps", 0.0), red=reduction)
    o1, g1, s1 = _step("triton", logits, labels, indices, state, **kw)
    o2, g2, s2 = _step("reference", logits, labels, indices, state, **kw)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert g1.dtype == logits.dtype
    tol = dict(rtol=1e-5, atol=1e-6) if p["dtype"] == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g1, g2, equal_nan=True, **tol)
    _assert_state(s1, s2)
    assert s1[-1].tolist() == [1, -5, 1, p["c"] + 3]     # the bad index and label, counted
    if p.get("nonfinite"):  # three non-finite losses stayed out of the state
        assert float(s1[6][layout.STAT_NONFINITE] - state[6][layout.STAT_NONFINITE]) == 3


def test_ce_step_update_false_writes_only_errors(gen):
    """update=False: the same loss and gradient, no state or stats written; deferred errors
    are still counted, as the reference does."""
    n = 10
    logits, labels, indices = _batch(gen, 13, 7, n)
    state = _state(gen, n)
    for red in ("mean", "none"):
        o1, g1, s1 = _step("triton", logits, labels, indices, state, red=red, update=False)
        o2, g2, s2 = _step("reference", logits, labels, indices, state, red=red, update=False)
        o3, g3, _ = _step("triton", logits, labels, indices, state, red=red)
        assert torch.equal(o1, o3) and torch.equal(g1, g3)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        _assert_state(s1[:-1], state[:-1], exact=True)
        assert torch.equal(s1[-1], s2[-1]) and s1[-1].tolist() == [1, -5, 1, 10]


@pytest.mark.parametrize("update", [True, False])
def test_strict_errors_raise_reference_message_state_untouched(gen, update):
    n = 10
    logits, labels, indices = _batch(gen, 13, 7, n)
    state = _state(gen, n)
    for bad in ("index", "label"):
        lab, idx = labels.clone(), indices.clone()
        lab[4] = 2
        idx[7] = 3
        if bad == "index":
            idx[[5, 9]] = torch.tensor([n, n + 4], device=DEV)
        else:
            lab[[3, 8]] = torch.tensor([-2, 7], device=DEV)
        msgs = []
        for impl in ("triton", "reference"):
            st = _clone(state)
            with pytest.raises(IndexError) as e:
                _op("ce_step", impl)(logits, lab, idx, *st, None, -100, 0.0, 0.3, RED["mean"],
                                     True, 4, update, True)
            _assert_state(st, state, exact=True)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]
        assert (f"{bad}" in msgs[0]) and ("e.g. " + (str(n) if bad == "index" else "-2")) in msgs[0]
    # no bad row: strict runs, and writes like the deferred mode
    lab, idx = labels.clone(), indices.clone()
    lab[4], idx[7] = 2, 3
    o1, g1, s1 = _step("triton", logits, lab, idx, state, strict=True, update=update)
    o2, g2, s2 = _step("triton", logits, lab, idx, state, update=update)
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    _assert_state(s1, s2, exact=True)


def test_ce_step_every_row_masked(gen):
    """No active row: "mean" is 0/0 = NaN as F.cross_entropy; the state is untouched."""
    n = 6
    logits = torch.randn(5, 4, generator=gen).to(DEV)
    labels = torch.full((5,), -100, device=DEV)
    indices = torch.arange(5, device=DEV)
    state = _state(gen, n)
    for red in ("mean", "sum"):
        o1, g1, s1 = _step("triton", logits, labels, indices, state, red=red)
        o2, g2, s2 = _step("reference", logits, labels, indices, state, red=red)
        torch.testing.assert_close(o1, o2, equal_nan=True)
        torch.testing.assert_close(g1, g2, equal_nan=True)
        _assert_state(s1, s2)
        _assert_state(s1[:5], state[:5], exact=True)
        if red == "mean":
            assert torch.isnan(o1) and torch.isnan(F.cross_entropy(logits, labels))
        else:
            assert o1.item() == 0.0


def test_ce_step_row_strided_logits(gen):
    """Logits whose rows are strided (a column slice) are read in place, as if contiguous."""
    n = 8
    big = torch.randn(9, 16, generator=gen).to(DEV)
    _, labels, indices = _batch(gen, 9, 7, n)
    state = _state(gen, n)
    o1, g1, s1 = _step("triton", big[:, 3:10], labels, indices, state, red="none")
    o2, g2, s2 = _step("triton", big[:, 3:10].contiguous(), labels, indices, state, red="none")
    assert torch.equal(o1, o2) and torch.equal(g1, g2)
    _assert_state(s1, s2, exact=True)


def test_ce_step_other_target_forms_run_on_reference(gen):
    """Soft targets and K-dim logits given to the triton op directly run the reference op."""
    n = 5
    state = _state(gen, n)
    idx = torch.tensor([0, 3, 3], device=DEV)
    soft = torch.softmax(torch.randn(3, 4, generator=gen), 1).to(DEV)
    kdim = torch.randint(0, 4, (3, 2), generator=gen).to(DEV)
    for logits, target in ((torch.randn(3, 4, generator=gen).to(DEV), soft),
                           (torch.randn(3, 4, 2, generator=gen).to(DEV), kdim)):
        o1, g1, s1 = _step("triton", logits, target, idx, state, eps=0.05)
        o2, g2, s2 = _step("reference", logits, target, idx, state, eps=0.05)
        assert torch.equal(o1, o2) and torch.equal(g1, g2)
        _assert_state(s1, s2, exact=True)


def test_direct_calls_with_bad_metadata_are_refused_unchanged(gen):
    """A direct op call whose tensors the kernels would index out of bounds is refused with
    the argument named, before anything is written."""
    n = 6
    logits, labels, indices = _batch(gen, 9, 5, n)
    state = _state(gen, n)
    args = dict(cw=None, ii=-100, eps=0.0, ema=0.3, red=RED["mean"], strict=False, epoch=1,
                update=True, need_grad=False)

    def call(logits=logits, labels=labels, indices=indices, state=state, **kw):
        a = dict(args, **kw)
        return _op("ce_step")(logits, labels, indices, *state, a["cw"], a["ii"], a["eps"],
                              a["ema"], a["red"], a["strict"], a["epoch"], a["update"],
                              a["need_grad"])

    bad_state = list(_clone(state))
    bad_state[3] = bad_state[3].float()
    for kw, match in ((dict(cw=torch.ones(4, device=DEV)), "class_weight must be a 1-D tensor of 5"),
                      (dict(red=7), "reduction must be one of"),
                      (dict(indices=indices[:-1]), r"indices must be .* of shape \(9,\)"),
                      (dict(labels=labels[:-1]), r"target of class indices .* shape \(9,\)"),
                      (dict(logits=logits.double()), "logits must be float32, float16 or bfloat16"),
                      (dict(state=tuple(bad_state)), "state_seen must be a contiguous 1-D torch.int32"),
                      (dict(state=state[:-1] + (state[-1][:3],)), "errors must be .* of 4 entries")):
        before = _clone(kw.get("state", state))
        with pytest.raises(ValueError, match=match):
            call(**kw)
        _assert_state(kw.get("state", state), before, exact=True)
    with pytest.raises(ValueError, match=r"losses must be a 1-D floating tensor"):
        _op("observe")(labels, None, indices, *state, 0.3, RED["sum"], False, 1, True)
    with pytest.raises(ValueError, match=r"probs must be None or a floating tensor of shape \(9,\)"):
        _op("observe")(logits[:, 0], logits[:3, 0], indices, *state, 0.3, RED["sum"], False, 1, True)


# ---- observe -------------------------------------------------------------------------------

def _losses(gen, b, n, dtype):
    """Losses with NaN/inf rows and one bad index; probs with a NaN; duplicates."""
    losses = (torch.rand(b, generator=gen) * 3).to(dtype)
    losses[2] = float("nan")
    losses[5] = float("inf")
    probs = torch.rand(b, generator=gen)
    probs[8] = float("nan")
    indices = torch.randint(0, max(2, n // 3), (b,), generator=gen)
    indices[6] = n + 2
    return losses.to(DEV), probs.to(DEV), indices.to(DEV)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_observe_matches_reference(gen, dtype, reduction):
    n = 10
    losses, probs, indices = _losses(gen, 11, n, dtype)
    state = _state(gen, n)
    for pr in (None, probs.to(dtype) if dtype != torch.float32 else probs):
        o1, g1, r1, s1 = _observe("triton", losses, pr, indices, state, red=reduction)
        o2, g2, r2, s2 = _observe("reference", losses, pr, indices, state, red=reduction)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert g1.dtype == dtype
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1, r2, rtol=1e-6, atol=1e-7)
        _assert_state(s1, s2)
        assert s1[-1].tolist() == [1, n + 2, 0, 0]
        nonfinite = 2 + (pr is not None)
        assert float(s1[6][layout.STAT_NONFINITE] - state[6][layout.STAT_NONFINITE]) == nonfinite


def test_observe_update_false_strict_and_no_active_row(gen):
    n = 10
    losses, probs, indices = _losses(gen, 11, n, torch.float32)
    state = _state(gen, n)
    o1, g1, r1, s1 = _observe("triton", losses, probs, indices, state, update=False)
    o2, g2, r2, s2 = _observe("triton", losses, probs, indices, state)
    for a, b in ((o1, o2), (g1, g2), (r1, r2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    _assert_state(s1[:-1], state[:-1], exact=True)
    assert s1[-1].tolist() == s2[-1].tolist() == [1, n + 2, 0, 0]
    for update in (True, False):
        for impl in ("triton", "reference"):
            st = _clone(state)
            with pytest.raises(IndexError, match=f"indices: 1 sample index.*e.g. {n + 2}"):
                _op("observe", impl)(losses, probs, indices, *st, 0.3, RED["mean"], True, 4, update)
            _assert_state(st, state, exact=True)
    # no active row under "mean": the spec's row scale 0 and out 0, no division by zero
    bad = torch.full((4,), -1, device=DEV)
    out, gx, row_scale, st = _observe("triton", losses[:4].nan_to_num(), None, bad, state)
    assert out.item() == 0 and row_scale.tolist() == [0.0] * 4 and gx.tolist() == [0.0] * 4
    _assert_state(st[:-1], state[:-1], exact=True)


# ---- the selection pass ----------------------------------------------------------------------

def _keys(gen, n):
    """Heavy ties, NaN, +-inf, -0.0 and +0.0."""
    keys = torch.randint(-2, 3, (n,), generator=gen).float()
    r = torch.rand(n, generator=gen)
    keys[r < 0.1] = float("nan")
    keys[(r >= 0.1) & (r < 0.2)] = float("inf")
    keys[(r >= 0.2) & (r < 0.3)] = float("-inf")
    keys[(r >= 0.3) & (r < 0.4)] = -0.0
    return keys.to(DEV)


@pytest.mark.parametrize("n", [1, 5, 77, 8193])  # 8193: above the in-batch top-k, radix select
def test_select_equals_reference(gen, n):
    keys = _keys(gen, n)
    for k in sorted({0, 1, n // 3, n - 1, n}):
        k = max(0, k)
        assert torch.equal(_op("select")(keys, k), _op("select", "reference")(keys, k)), k
    with pytest.raises(ValueError, match=r"k must be in \[0, "):
        _op("select")(keys, n + 1)


def test_uniform_and_shuffle_equal_reference():
    idx = torch.tensor([[0, 7, 2**31 + 3], [-4, 5, 2**40]], device=DEV)
    for key, stream in ((0, 1), (2**31 - 1, 3)):
        assert torch.equal(_op("uniform")(idx, key, stream),
                           _op("uniform", "reference")(idx, key, stream))
    chosen = torch.tensor([9, 4, 4, 0, 17, 3], device=DEV)
    assert torch.equal(_op("shuffle")(chosen, 12), _op("shuffle", "reference")(chosen, 12))
    assert _op("shuffle")(chosen[:0], 12).numel() == 0


# ---- opcheck -------------------------------------------------------------------------------

def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_ce_step(gen, reduction):
    logits, labels, indices = _batch(gen, 9, 5, 8)
    x = logits.requires_grad_(True)
    cw = (torch.rand(5, generator=gen) + 0.5).to(DEV) if reduction == "mean" else None
    update = reduction != "sum"
    _opcheck(_op("ce_step"), (x, labels, indices, *_state(gen, 8), cw, -100, 0.1, 0.3,
                              RED[reduction], False, 2, update, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_observe(gen, reduction):
    losses, probs, indices = _losses(gen, 11, 10, torch.float32)
    x = losses.nan_to_num(posinf=50.0).requires_grad_(True)  # opcheck compares without NaN
    p = probs if reduction == "none" else None
    _opcheck(_op("observe"), (x, p, indices, *_state(gen, 10), 0.3, RED[reduction], False, 2,
                              True))


def test_opcheck_selection_ops(gen):
    _opcheck(_op("select"), (_keys(gen, 9), 4))
    _opcheck(_op("uniform"), (torch.arange(-3, 6, device=DEV), 12, 2))
    _opcheck(_op("shuffle"), (torch.arange(7, device=DEV) * 3, 5))


# ---- the one-launch backward scaling (for an autograd hook in fastsel.ops) -----------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_is_bit_identical_to_the_autograd_formula(gen, dtype):
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
