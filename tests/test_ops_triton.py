"""The ``triton`` implementation of the op family (``torch.ops.fastsel.*_triton``) at the op
level: ``torch.library.opcheck`` of every op (schema, mutations, fake kernel, autograd
registration, AOT dispatch), and every op against the ``reference`` op on the same inputs:
loss, gradient (through the registered autograd formula) and the resulting state, stats and
errors, with duplicates, NaN/inf rows, low-precision logits and losses, sizes that are not
powers of two, ignore_index, ``update=False`` and strict errors; and which rows count
(``fastsel.ops``: the room and membership checks on an epoch's ``member`` and ``rows``):
strict messages identical, the non-strict row counters, state, loss and gradient equal.

Inputs are tiny: without a GPU the kernels run under Triton's interpreter (conftest).
"""
import pytest
import torch
import torch.nn.functional as F

from fastsel import layout, ops
from fastsel.backends import available
from fastsel.rows import EpochRows, room_message, stray_message
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


def _rows(rows=None, epoch=4):
    """``member, rows, epoch`` as the ops take them: copies of an :class:`EpochRows`' (None:
    every row counts) and ``epoch`` as a 0-d int64 tensor on the device."""
    if rows is None:
        return None, None, torch.tensor(epoch, device=DEV)
    return rows.member.clone(), rows.counts.clone(), torch.tensor(epoch, device=DEV)


def _epoch_rows(n, selection, *, shard=100, position=0, epoch=4):
    """An epoch in progress over ``selection`` (None: no epoch), ``position`` of its
    ``shard`` rows trained."""
    r = EpochRows(n, DEV)
    r.open(None if selection is None else torch.as_tensor(selection, device=DEV), epoch, shard,
           position)
    return r


def _step_rows(impl, logits, target, indices, state, rows=None, *, cw=None, ii=-100, eps=0.0,
               ema=0.3, red="mean", strict=False, epoch=4, update=True):
    """One ce_step on copies of ``state`` and ``rows``: (out, d(out . g)/d(logits), state
    after, row counters after (None without rows))."""
    x = logits.clone().requires_grad_(True)
    st = _clone(state)
    member, counts, ep = _rows(rows, epoch)
    out, _, _ = _op("ce_step", impl)(x, target, indices, *st, member, counts, ep, cw, ii, eps,
                                     ema, RED[red], strict, update, True)
    gx, = torch.autograd.grad(out, x, _g_out(out))
    return out.detach(), gx, st, counts


def _step(*args, **kw):
    """``_step_rows`` without rows: (out, gradient, state after)."""
    return _step_rows(*args, **kw)[:3]


def _observe_rows(impl, losses, probs, indices, state, rows=None, *, ema=0.3, red="mean",
                  strict=False, epoch=4, update=True):
    """One observe on copies: (out, d(out . g)/d(losses), row_scale, state, row counters)."""
    x = losses.clone().requires_grad_(True)
    st = _clone(state)
    member, counts, ep = _rows(rows, epoch)
    out, row_scale = _op("observe", impl)(x, probs, indices, *st, member, counts, ep, ema,
                                          RED[red], strict, update)
    gx, = torch.autograd.grad(out, x, _g_out(out))
    return out.detach(), gx, row_scale, st, counts


def _observe(*args, **kw):
    return _observe_rows(*args, **kw)[:4]


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
                _op("ce_step", impl)(logits, lab, idx, *st, *_rows(), None, -100, 0.0, 0.3,
                                     RED["mean"], True, update, True)
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
    rows = _epoch_rows(n, range(n))
    args = dict(cw=None, ii=-100, eps=0.0, ema=0.3, red=RED["mean"], strict=False,
                update=True, need_grad=False, rows=rows.args())

    def call(logits=logits, labels=labels, indices=indices, state=state, **kw):
        a = dict(args, **kw)
        return _op("ce_step")(logits, labels, indices, *state, *a["rows"], a["cw"], a["ii"],
                              a["eps"], a["ema"], a["red"], a["strict"], a["update"],
                              a["need_grad"])

    bad_state = list(_clone(state))
    bad_state[3] = bad_state[3].float()
    for kw, match in ((dict(cw=torch.ones(4, device=DEV)), "class_weight must be a 1-D tensor of 5"),
                      (dict(red=7), "reduction must be one of"),
                      (dict(indices=indices[:-1]), r"indices must be .* of shape \(9,\)"),
                      (dict(labels=labels[:-1]), r"target of class indices .* shape \(9,\)"),
                      (dict(logits=logits.double()), "logits must be float32, float16 or bfloat16"),
                      (dict(state=tuple(bad_state)), "state_seen must be a contiguous 1-D torch.int32"),
                      (dict(state=state[:-1] + (state[-1][:3],)), "errors must be .* of 4 entries"),
                      (dict(rows=(None,) + rows.args()[1:]), "member and rows must be given together"),
                      (dict(rows=(rows.member[:-1],) + rows.args()[1:]),
                       r"member must be a contiguous torch.uint8 tensor of shape \(7,\)"),
                      (dict(rows=(rows.member, rows.counts.int(), rows.epoch)),
                       "rows must be a contiguous torch.int64 tensor of shape"),
                      (dict(rows=(rows.member, rows.counts, rows.epoch.reshape(1))),
                       r"epoch must be a contiguous torch.int64 tensor of shape \(\)")):
        before = _clone(kw.get("state", state))
        counts = rows.counts.clone()
        with pytest.raises(ValueError, match=match):
            call(**kw)
        _assert_state(kw.get("state", state), before, exact=True)
        assert torch.equal(rows.counts, counts)
    with pytest.raises(ValueError, match=r"losses must be a 1-D floating tensor"):
        _op("observe")(labels, None, indices, *state, *_rows(), 0.3, RED["sum"], False, True)
    with pytest.raises(ValueError, match=r"probs must be None or a floating tensor of shape \(9,\)"):
        _op("observe")(logits[:, 0], logits[:3, 0], indices, *state, *_rows(), 0.3, RED["sum"],
                       False, True)


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
                _op("observe", impl)(losses, probs, indices, *st, *_rows(), 0.3, RED["mean"],
                                     True, update)
            _assert_state(st, state, exact=True)
    # no active row under "mean": the spec's row scale 0 and out 0, no division by zero
    bad = torch.full((4,), -1, device=DEV)
    out, gx, row_scale, st = _observe("triton", losses[:4].nan_to_num(), None, bad, state)
    assert out.item() == 0 and row_scale.tolist() == [0.0] * 4 and gx.tolist() == [0.0] * 4
    _assert_state(st[:-1], state[:-1], exact=True)


# ---- which rows count: the room and membership checks (fastsel.ops) -----------------------

ROWS_N, ROWS_B, ROWS_C = 11, 13, 7   # none a power of two


def _rows_batch(gen, n=ROWS_N, b=ROWS_B, c=ROWS_C, stray=1):
    """_batch's rows (ignored rows, a bad index at row 7, a bad label at row 4) over indices
    in [0, n): with the even samples selected, members and strays, each duplicated (rows 0,
    1 and 2 are member 0; rows 3 and 5 the odd sample ``stray``, the first stray row)."""
    logits, labels, _ = _batch(gen, b, c, n)
    indices = torch.randint(0, n, (b,), generator=gen)
    indices[[0, 1, 2]] = 0
    indices[[3, 5]] = stray
    indices[7] = -5
    return logits, labels, indices.to(DEV)


#: Rows of the two calls of each case (the second smaller: its refusal reaches elsewhere).
ROWS_CALLS = (ROWS_B, ROWS_B - 4)
#: (selection, shard, position) of the epoch the two calls meet. "stray": room for both,
#: odd samples stray; "fits-once": the first call takes the shard to its end (admitted),
#: the second is refused; "past-shard" and "no-epoch": both refused.
ROWS_CASES = {
    "stray": (range(0, ROWS_N, 2), 100, 5),
    "fits-once": (range(0, ROWS_N, 2), 2 * ROWS_B - 1, ROWS_B - 1),
    "past-shard": (range(ROWS_N), 20, 12),
    "no-epoch": (None, 100, 0),
}


def _two_calls(op, impl, gen_batches, state, rows, **kw):
    """Two calls of ``op`` on one copy of ``state`` and ``rows``: ([(out, grad)] per call,
    state after, row counters after)."""
    st = _clone(state)
    member, counts, ep = _rows(rows)
    res = []
    for data in gen_batches:
        x = data[0].clone().requires_grad_(True)
        if op == "ce_step":
            out = _op(op, impl)(x, data[1], data[2], *st, member, counts, ep, kw.get("cw"), -100,
                                kw.get("eps", 0.0), 0.3, RED[kw["red"]], False, True, True)[0]
        else:
            out = _op(op, impl)(x, data[1], data[2], *st, member, counts, ep, 0.3, RED[kw["red"]],
                                False, True)[0]
        gx, = torch.autograd.grad(out, x, _g_out(out))
        res.append((out.detach(), gx))
    return res, st, counts


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(ROWS_CASES))
@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_counted_and_left_out_as_reference(gen, op, case, reduction):
    """Non-strict: rows a refused call or a stray index leaves out add nothing to the loss,
    its gradient, the mean's divisor or the state; the ROW_* counters, state, stats and
    errors equal the reference's after two calls (the first stray sample and the first
    refused call's position are kept; a refused call's range errors are not recorded)."""
    sel, shard, position = ROWS_CASES[case]
    rows = _epoch_rows(ROWS_N, sel, shard=shard, position=position)
    state = _state(gen, ROWS_N)
    batches = []
    for b, stray in zip(ROWS_CALLS, (1, 3)):
        logits, labels, indices = _rows_batch(gen, b=b, stray=stray)
        if op == "observe":
            probs = None if stray == 1 else torch.rand(b, generator=gen).to(DEV)
            batches.append((torch.rand(b, generator=gen).to(DEV) * 3, probs, indices))
        else:
            batches.append((logits, labels, indices))
    kw = dict(red=reduction)
    if op == "ce_step" and reduction == "mean":
        kw.update(cw=(torch.rand(ROWS_C, generator=gen) + 0.5).to(DEV), eps=0.1)
    (r1, s1, c1), (r2, s2, c2) = (_two_calls(op, impl, batches, state, rows, **kw)
                                  for impl in ("triton", "reference"))
    for (o1, g1), (o2, g2) in zip(r1, r2):
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6, equal_nan=True)
    _assert_state(s1, s2)
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
        _assert_state(s1, state, exact=True)
    if admitted and case != "past-shard":  # odd samples are stray, sample 1 first
        assert c[layout.ROW_STRAY_VALUE] == 1 and c[layout.ROW_STRAY_COUNT] >= 2 * admitted


@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_strict_messages_equal_reference_nothing_written(gen, op):
    """Strict: a refused call (no epoch, past the shard) raises ``room_message``, a stray
    row ``stray_message`` (before the range checks: a batch with both raises the stray
    error), each the reference's text, with no state or counter written; a call without
    a fault writes like the non-strict one."""
    logits, labels, indices = _rows_batch(gen)
    data = (torch.rand(ROWS_B, generator=gen).to(DEV), None) if op == "observe" else (logits, labels)
    state = _state(gen, ROWS_N)
    evens = range(0, ROWS_N, 2)
    cases = [(_epoch_rows(ROWS_N, None), room_message(ROWS_B, 4, 0, -1)),
             (_epoch_rows(ROWS_N, evens, shard=20, position=8), room_message(ROWS_B, 4, 8, 20)),
             (_epoch_rows(ROWS_N, evens),
              stray_message(int(((indices >= 0) & (indices % 2 == 1)).sum()), 4, 1))]

    def call(impl, st, member, counts, strict=True, idx=indices):
        ep = torch.tensor(4, device=DEV)
        if op == "ce_step":
            lab = data[1].clone()
            lab[4] = 0     # no bad label: only the stray rows and the bad index are faults
            return _op(op, impl)(data[0], lab, idx, *st, member, counts, ep, None, -100, 0.0, 0.3,
                                 RED["mean"], strict, True, False)
        return _op(op, impl)(data[0], None, idx, *st, member, counts, ep, 0.3, RED["mean"],
                             strict, True)

    for rows, want in cases:
        msgs = []
        for impl in ("triton", "reference"):
            st = _clone(state)
            member, counts, _ = _rows(rows)
            with pytest.raises(ValueError) as e:
                call(impl, st, member, counts)
            _assert_state(st, state, exact=True)
            assert torch.equal(counts, rows.counts)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] == want
    # no fault: strict writes what the non-strict call writes
    members = indices.clamp(min=0) // 2 * 2    # selected samples only, none out of range
    member_rows = _epoch_rows(ROWS_N, evens)
    got = []
    for strict in (True, False):
        st = _clone(state)
        member, counts, _ = _rows(member_rows)
        out = call("triton", st, member, counts, strict, members)[0]
        got.append((out, st, counts))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][2], got[1][2])
    _assert_state(got[0][1], got[1][1], exact=True)
    assert got[0][2].tolist()[:layout.ROW_CALLS + 1] == [ROWS_B, 100, 1]


@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_update_false_neither_checked_nor_counted(gen, op):
    """update=False with an epoch's rows: no check (strict raises nothing for the stray
    rows, or with no epoch in progress), no count, the same loss and gradient as without
    rows (every row counts)."""
    logits, labels, indices = _rows_batch(gen)
    labels[4], indices[7] = 0, 3     # no range error: strict would raise those
    state = _state(gen, ROWS_N)
    losses = torch.rand(ROWS_B, generator=gen).to(DEV)
    for rows in (_epoch_rows(ROWS_N, range(0, ROWS_N, 2)), _epoch_rows(ROWS_N, None)):
        res = []
        for given in (rows, None):
            if op == "ce_step":
                o, g, st, counts = _step_rows("triton", logits, labels, indices, state, given,
                                              update=False, strict=True)
            else:
                o, g, _, st, counts = _observe_rows("triton", losses, None, indices, state, given,
                                                    update=False, strict=True)
            res.append((o, g, st))
            if given is not None:
                assert torch.equal(counts, rows.counts)
        torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(res[0][1], res[1][1])
        _assert_state(res[0][2], res[1][2], exact=True)


@pytest.mark.parametrize("op", ["ce_step", "observe"])
def test_rows_empty_call(gen, op):
    """A call of no rows: admitted (one call, no rows) in an epoch in progress, refused
    without one (nothing kept: the first refused call's position waits for one with rows),
    as the reference."""
    state = _state(gen, ROWS_N)
    idx = torch.zeros(0, dtype=torch.int64, device=DEV)
    data = ((torch.zeros(0, device=DEV), None) if op == "observe"
            else (torch.zeros(0, ROWS_C, device=DEV), torch.zeros(0, dtype=torch.int64, device=DEV)))
    for sel in (range(3), None):
        rows = _epoch_rows(ROWS_N, sel, shard=5, position=5)
        got = [_two_calls(op, impl, [(data[0], data[1], idx)], state, rows, red="sum")
               for impl in ("triton", "reference")]
        assert got[0][2].tolist() == got[1][2].tolist()
        _assert_state(got[0][1], got[1][1], exact=True)
        assert got[0][2][layout.ROW_CALLS] == (1 if sel is not None else 0)
        assert got[0][2][layout.ROW_OVER_COUNT] == 0


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
    # opcheck calls the op many times: a shard with room for all of them
    rows = _rows(_epoch_rows(8, [1, 3], shard=10**9, epoch=2) if update else None, 2)
    _opcheck(_op("ce_step"), (x, labels, indices, *_state(gen, 8), *rows, cw, -100, 0.1, 0.3,
                              RED[reduction], False, update, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_observe(gen, reduction):
    losses, probs, indices = _losses(gen, 11, 10, torch.float32)
    x = losses.nan_to_num(posinf=50.0).requires_grad_(True)  # opcheck compares without NaN
    p = probs if reduction == "none" else None
    rows = _rows(_epoch_rows(10, [1], shard=10**9, epoch=2), 2)
    _opcheck(_op("observe"), (x, p, indices, *_state(gen, 10), *rows, 0.3, RED[reduction], False,
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
