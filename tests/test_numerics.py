"""Numerics (fastsel/state.py, "finite in, finite state"): no finite input puts inf or NaN
into the per-sample state, on every backend; large logits lose no precision.

* Huge but finite logits (1e30, -1e30, mixes; float32, bfloat16, and float16 at its own
  range) and huge finite observed losses (up to float32's largest value, and float64 ones
  beyond it) leave every state field and stat finite, also when observed again and again:
  the fold runs in float64 and each stored value saturates at float32's largest value,
  where float32 arithmetic made the variance of observations 0 and 1e30 +inf.
* The state equals the float64 oracle (tests/oracle.py) that saturates the same way.
* A finite observation is folded: the default p_true exp(-loss) of a very negative loss
  saturates instead of turning the row into a non-finite one.
* Logits of 1e4 give F.cross_entropy's loss and gradient to float32 rounding in every
  target form (the log-sum-exp relative to the row's max, not max + log(sum)).

Every backend on every device it runs on here (``backend_name``, tests/conftest.py); the
loss calls go through ``fastsel.Sampler`` as a training loop makes them.
"""
import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel import layout
from fastsel.backends import get_backend
from fastsel.config import LossConfig
from fastsel.state import STAT_NONFINITE, SampleState
from oracle import OracleState

F32_MAX = torch.finfo(torch.float32).max
HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}  # finite in each dtype
EMA = 0.3


def dev(name):
    return getattr(name, "device", "cpu")


def sampler(backend_name, n, **kw):
    """A sampler whose first epoch (all n samples: budget 1.0) is in progress, so loss calls
    of up to n rows in all count towards it."""
    s = fastsel.Sampler(n, budget=1.0, epochs=1, backend=str(backend_name), ema=EMA, **kw)
    iter(s)
    return s


def assert_finite_state(state):
    for name, buf in state.buffers().items():
        if buf.is_floating_point():
            assert torch.isfinite(buf).all(), (name, buf)
    assert torch.isfinite(state.stats).all(), state.stats


def assert_matches_oracle(state, oracle):
    s = state.to("cpu")
    for got, want, rtol in ((s.loss, oracle.loss, 1e-5), (s.loss_var, oracle.var, 1e-4), (s.p_true, oracle.p, 1e-5)):
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=1e-6)
    assert s.seen.tolist() == oracle.seen


def huge_logits(form, dtype, b, c, gen):
    """Logits of +-HUGE and 0 in several patterns (one huge class, one tiny class, both,
    all equal and huge), with the target of ``form``; rows cycle through the patterns."""
    h = HUGE[dtype]
    d = 3 if form != "hard" else 1
    x = torch.zeros(b, c, d)
    for r in range(b):
        k = r % 5
        if k == 0:
            x[r, 0] = h               # the target (class 1, 2, ...) is far below the max
        elif k == 1:
            x[r, 1] = -h              # one class far below the rest
        elif k == 2:
            x[r, 0], x[r, 1] = h, -h  # both: a loss of 2 * HUGE for class 1
        elif k == 3:
            x[r] = h                  # all equal and huge
        else:
            x[r] = torch.randn(c, d, generator=gen)  # an ordinary row
    labels = torch.arange(b * d).reshape(b, d) % c
    if form == "hard":
        x, labels = x[:, :, 0], labels[:, 0]
        return x.to(dtype), labels
    if form == "kdim":
        return x.to(dtype), labels
    probs = torch.softmax(torch.randn(b, c, d, generator=gen), dim=1)
    return x[:, :, 0].to(dtype), probs[:, :, 0]


def ce_and_grad(logits, target, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = F.cross_entropy(x.float(), target, **kw)
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("form", ["hard", "kdim", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_logits_keep_the_state_finite(backend_name, gen, form, dtype, smoothing):
    """Steps with logits of +-1e30 between ordinary ones (the loss jumps from ~2 to 1e30 and
    back): every state field stays finite and equals the oracle, whose variance of those
    jumps saturates at float32's largest value; loss and gradient are F.cross_entropy's."""
    n, b, c = 40, 10, 7
    d = dev(backend_name)
    s = sampler(backend_name, n, label_smoothing=smoothing, reduction="none")
    oracle = OracleState(n)
    idx = torch.arange(b)
    for step in range(4):
        if step % 2 == 0:
            logits, target = huge_logits(form, dtype, b, c, gen)
        else:  # ordinary logits for the same samples: a jump of ~1e30 in their loss
            logits, target = huge_logits(form, dtype, b, c, gen)
            logits = torch.randn(logits.shape, generator=gen).to(dtype)
        x = logits.to(d).requires_grad_(True)
        out = s.loss(x, target.to(d), idx.to(d))
        out.sum().backward()
        ref, ref_grad = ce_and_grad(logits, target, reduction="none", label_smoothing=smoothing)
        torch.testing.assert_close(out.detach().cpu(), ref, rtol=1e-5, atol=1e-6)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(x.grad.cpu().float(), ref_grad.float(), **tol)
        oracle.step_any(logits, target, idx, epoch=0, ema=EMA, label_smoothing=smoothing)
        assert_finite_state(s.state)
    assert int(s.state.stats[STAT_NONFINITE]) == 0
    assert_matches_oracle(s.state, oracle)
    if dtype != torch.float16:  # float16's largest logit gives losses whose square fits float32
        assert float(s.state.loss_var.max()) == F32_MAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("given_p", [False, True])
def test_huge_finite_observed_losses_keep_the_state_finite(backend_name, gen, dtype, given_p):
    """observe() of the largest finite losses of each dtype (float64: beyond float32's
    range, which saturates), of both signs, with duplicates, over many calls: every row is
    folded (none counted non-finite) and the state is finite and the oracle's."""
    n, b = 64, 8
    fin = torch.finfo(dtype)
    big = fin.max
    d = dev(backend_name)
    s = sampler(backend_name, n, reduction="sum")
    oracle = OracleState(n)
    idx = torch.tensor([0, 1, 2, 3, 3, 4, 5, 5])
    for step in range(n // b):
        sign = 1.0 if step % 2 == 0 else -1.0
        vals = [sign * big, -sign * big, sign * min(big, 1e30), 0.0, sign * big, -1e4, big, big]
        losses = torch.tensor(vals, dtype=torch.float64).to(dtype)
        p = torch.tensor([big, -big, 0.5, 2.0, big, -big, 0.0, 1.0], dtype=torch.float64).to(dtype)
        p = p if given_p else None
        s.observe(losses.to(d), idx.to(d), p_true=None if p is None else p.to(d))
        assert oracle.observe(losses, idx, epoch=0, ema=EMA, p_true=p) == 0
        assert_finite_state(s.state)
    assert int(s.state.stats[STAT_NONFINITE]) == 0
    assert_matches_oracle(s.state, oracle)


def test_repeated_huge_observations_stay_finite_and_decay(backend_name):
    """A sample observed at +-float32's largest loss again and again: its variance
    saturates and stays there (never inf); ordinary observations afterwards bring its EMA
    and, once that is small enough, its variance back down, as the oracle's."""
    n = 4
    state, oracle = SampleState(n), OracleState(n)
    backend = get_backend(str(backend_name), dev(backend_name))
    cfg = LossConfig(ema=EMA)
    idx = torch.arange(n)
    state.to(dev(backend_name))
    try:
        for step in range(200):
            if step < 30:
                sign = 1.0 if step % 2 == 0 else -1.0
                losses = torch.tensor([sign * F32_MAX, -sign * F32_MAX, sign * 1e30, 3.0])
            else:
                losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
            backend.observe(losses.to(state.device), idx.to(state.device), state, cfg, epoch=step)
            oracle.observe(losses, idx, epoch=step, ema=EMA)
            assert_finite_state(state)
            if step == 29:
                assert state.loss_var.cpu()[:3].tolist() == [F32_MAX] * 3
    finally:
        state.to("cpu")
    assert int(state.stats[STAT_NONFINITE]) == 0
    assert_matches_oracle(state, oracle)
    assert float(state.loss_var[0]) < F32_MAX * 1e-3  # it decays again


def test_the_fold_is_the_same_bits_on_every_backend(backend_name, gen):
    """Given the same float32 observations (p_true given: no exp), every backend stores the
    same bits as the reference: the same float64 operations in the same order."""
    n = 30
    states = {}
    for name in (str(backend_name), "reference"):
        g = torch.Generator().manual_seed(7)
        state = SampleState(n).to(dev(backend_name))
        backend = get_backend(name, dev(backend_name))
        for step in range(6):
            losses = torch.rand(50, generator=g) * 10 ** float(step % 3 * 10)
            p = torch.rand(50, generator=g)
            idx = torch.randint(0, n, (50,), generator=g)
            backend.observe(losses.to(state.device), idx.to(state.device), state, LossConfig(ema=EMA),
                            epoch=step, probs=p.to(state.device))
        states[name] = state.to("cpu")
    for f in ("loss", "loss_var", "p_true", "seen"):
        assert torch.equal(getattr(states[str(backend_name)], f), getattr(states["reference"], f)), f


def test_cross_entropy_overflowing_float32_is_a_counted_nonfinite_observation(backend_name):
    """Logits +-3e38 apart: the cross-entropy itself overflows float32 (F.cross_entropy's is
    inf too), so the row is a non-finite observation: counted, not folded; the state stays
    finite."""
    n = 8
    d = dev(backend_name)
    s = sampler(backend_name, n, reduction="none")
    logits = torch.tensor([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([1, 0])
    out = s.loss(logits.to(d), labels.to(d), torch.tensor([0, 1]).to(d))
    ref = F.cross_entropy(logits, labels, reduction="none")
    assert torch.isinf(ref[0]) and torch.isinf(out[0].cpu())
    torch.testing.assert_close(out[1].cpu(), ref[1])
    assert_finite_state(s.state)
    assert int(s.state.stats[STAT_NONFINITE]) == 1
    assert s.state.seen.cpu()[:2].tolist() == [0, 1]


LARGE_FORMS = ["hard", "hard-smooth", "hard-weight", "kdim", "kdim-smooth-weight", "soft",
               "soft-smooth-weight", "soft-kdim"]


@pytest.mark.parametrize("form", LARGE_FORMS)
@pytest.mark.parametrize("c", [7, 1000])
@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_large_logits_match_cross_entropy_to_float32_rounding(backend_name, gen, form, c, spread):
    """All logits 1e4 (spread 0) or 1e4 + N(0, 1): the loss (returned and observed) and its
    gradient are F.cross_entropy's to float32 rounding in every target form; max + log(sum)
    would round to 1e4's ulp (1.946289 for log 7 = 1.945910)."""
    b = 6
    d = dev(backend_name)
    kdim = "kdim" in form
    shape = (b, c, 5) if kdim else (b, c)
    logits = 1e4 + spread * torch.randn(shape, generator=gen)
    if form.startswith("soft"):
        target = torch.softmax(torch.randn(shape, generator=gen), dim=1)
    else:
        target = torch.randint(0, c, (b, 5) if kdim else (b,), generator=gen)
    eps = 0.1 if "smooth" in form else 0.0
    w = torch.rand(c, generator=gen) + 0.5 if "weight" in form else None
    s = sampler(backend_name, b, label_smoothing=eps, class_weight=w, reduction="none")
    x = logits.to(d).requires_grad_(True)
    out = s.loss(x, target.to(d), torch.arange(b).to(d))
    out.sum().backward()
    ref, ref_grad = ce_and_grad(logits, target, reduction="none", label_smoothing=eps, weight=w)
    torch.testing.assert_close(out.detach().cpu(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    # The observation (smoothed, without class weights), per sample the mean over positions.
    obs, _ = ce_and_grad(logits, target, reduction="none", label_smoothing=eps)
    obs = obs.reshape(b, -1).mean(1)
    torch.testing.assert_close(s.state.loss.cpu(), obs, rtol=1e-6, atol=1e-6)


def test_state_max_is_float32s_largest_value():
    assert layout.STATE_MAX == F32_MAX
