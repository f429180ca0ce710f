"""The fused step: per-row cross-entropy, p_true and d(loss)/d(logits) in one pass over the
logits (``ce_step_kernel``), then the per-sample state update with duplicates merged
(``state_update_kernel``). ``observe`` (per-sample losses of any loss function) builds the
same per-row arrays with ``observe_rows_kernel`` and reuses ``state_update_kernel``, so the
update has one definition on Triton.

Why two launches: duplicates of a sample in one batch are ONE observation of their mean
loss, so the update needs every row's loss first; a grid-wide barrier does not exist in
Triton, so the merge is a second (small, O(B) reads per program) launch. It resolves
duplicates without atomics or sorting: each row compares its index against every row of
the batch, the lowest row of a group owns it, sums its group in float64 in row order, and
alone writes the state. The result is deterministic and never races.

The slots of ``stats`` and ``errors`` come from ``fastsel.layout`` (module-level constexprs).
"""
import triton
import triton.language as tl

from fastsel import layout

# Slots of the state's stats (float64) and errors (int64) vectors, defined in fastsel.layout.
STAT_NONFINITE = tl.constexpr(layout.STAT_NONFINITE)
STAT_EPOCH_LOSS = tl.constexpr(layout.STAT_EPOCH_LOSS)
STAT_EPOCH_COUNT = tl.constexpr(layout.STAT_EPOCH_COUNT)
ERR_INDEX_COUNT = tl.constexpr(layout.ERR_INDEX_COUNT)
ERR_INDEX_VALUE = tl.constexpr(layout.ERR_INDEX_VALUE)
ERR_LABEL_COUNT = tl.constexpr(layout.ERR_LABEL_COUNT)
ERR_LABEL_VALUE = tl.constexpr(layout.ERR_LABEL_VALUE)

# Per-row flags written by ce_step_kernel / observe_rows_kernel, read by state_update_kernel.
FLAG_ACTIVE = tl.constexpr(1)     # label not ignored, index and label in range
FLAG_FINITE = tl.constexpr(2)     # the row's loss and p_true are finite
FLAG_BAD_INDEX = tl.constexpr(4)
FLAG_BAD_LABEL = tl.constexpr(8)
FLAG_OBSERVED = tl.constexpr(3)   # FLAG_ACTIVE | FLAG_FINITE: the row enters the state

REDUCTION_MEAN = tl.constexpr(layout.REDUCTION_MEAN)
# float32's largest finite value: every state value saturates there (fastsel/state.py).
STATE_MAX = tl.constexpr(layout.STATE_MAX)


@triton.jit
def ce_step_kernel(logits_ptr, stride_row, labels_ptr, indices_ptr, pweight_ptr, cweight_ptr,
                   loss_ptr, ptrue_ptr, row_ptr, wy_ptr, flags_ptr, grad_ptr,
                   B, C, N, ignore_index, eps, one_m_eps,
                   HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
    """BLOCK_R rows per program: online softmax in fp32 over BLOCK_C-column chunks.

    Writes per row the state loss (smoothed, no class weight), p_true, the policy-weighted
    loss for the reduction, the class weight of active rows and the flags; with WRITE_GRAD,
    d(policy weight * weighted loss)/d(logits) (the reduction's scale is applied in backward).
    Rows left out get gradient 0 * softmax, like autograd through ``F.cross_entropy``: NaN
    when the row's logits hold a NaN (or +inf), else 0.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    idx = tl.load(indices_ptr + rows, mask=rmask, other=0).to(tl.int64)
    bad_index = rmask & ((idx < 0) | (idx >= N))
    not_ign = lab != ignore_index
    bad_label = rmask & not_ign & ((lab < 0) | (lab >= C))
    active = rmask & not_ign & (~bad_label) & (~bad_index)
    y = tl.where(active, lab, 0)
    sidx = tl.where(active, idx, N)
    pw = tl.load(pweight_ptr + sidx, mask=rmask, other=1.0)
    row_off = rows.to(tl.int64) * stride_row
    x_y = tl.load(logits_ptr + row_off + y, mask=rmask, other=0.0).to(tl.float32)
    if HAS_CW:
        w_y = tl.load(cweight_ptr + y, mask=rmask, other=0.0).to(tl.float32)
    else:
        w_y = tl.full([BLOCK_R], 1.0, tl.float32)
    cols = tl.arange(0, BLOCK_C)
    sum_w = 0.0
    if SINGLE:
        cmask = cols < C
        m2 = rmask[:, None] & cmask[None, :]
        ptrs = logits_ptr + row_off[:, None] + cols[None, :]
        x = tl.load(ptrs, mask=m2, other=float("-inf")).to(tl.float32)
        mx = tl.max(x, axis=1)
        mx = tl.where(rmask & (mx != float("-inf")), mx, 0.0)
        s = tl.sum(tl.exp(x - mx[:, None]), axis=1)
        s = tl.where(rmask, s, 1.0)
        log_s = tl.log(s)
        logp = (x - mx[:, None]) - log_s[:, None]
        if SMOOTH:
            sum_logp = tl.sum(tl.where(m2, logp, 0.0), axis=1)
            if HAS_CW:
                wc = tl.load(cweight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                sum_w = tl.sum(wc, axis=0)
                sum_wlogp = tl.sum(tl.where(m2, logp, 0.0) * wc[None, :], axis=1)
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            m2 = rmask[:, None] & (cc < C)[None, :]
            xc = tl.load(logits_ptr + row_off[:, None] + cc[None, :], mask=m2,
                         other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(xc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(xc - m_safe[:, None]), axis=1)
            m = m_new
        mx = tl.where(rmask & (m != float("-inf")), m, 0.0)
        s = tl.where(rmask, s, 1.0)
        log_s = tl.log(s)
        sum_logp = tl.zeros([BLOCK_R], tl.float32)
        sum_wlogp = tl.zeros([BLOCK_R], tl.float32)
        if SMOOTH:
            if HAS_CW:
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + cols
                    sum_w += tl.sum(tl.load(cweight_ptr + cc, mask=cc < C, other=0.0).to(tl.float32), axis=0)
    nll = -((x_y - mx) - log_s)
    p_true = tl.exp(-nll)
    if not SINGLE:
        if SMOOTH or WRITE_GRAD:
            # Second sweep: the smoothing sums need lse; the gradient needs the softmax.
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                cm = cc < C
                m2 = rmask[:, None] & cm[None, :]
                xc = tl.load(logits_ptr + row_off[:, None] + cc[None, :], mask=m2,
                             other=float("-inf")).to(tl.float32)
                lp = (xc - mx[:, None]) - log_s[:, None]
                if SMOOTH:
                    sum_logp += tl.sum(tl.where(m2, lp, 0.0), axis=1)
                    if HAS_CW:
                        wcc = tl.load(cweight_ptr + cc, mask=cm, other=0.0).to(tl.float32)
                        sum_wlogp += tl.sum(tl.where(m2, lp, 0.0) * wcc[None, :], axis=1)
                if WRITE_GRAD:
                    p = tl.exp(lp)
                    hot = tl.where(cc[None, :] == y[:, None], 1.0, 0.0)
                    if HAS_CW:
                        wcg = tl.load(cweight_ptr + cc, mask=cm, other=0.0).to(tl.float32)
                    else:
                        wcg = 1.0
                    g = _grad_coef(p, hot, w_y, wcg, sum_w, pw, eps, one_m_eps, C, HAS_CW, SMOOTH)
                    g = tl.where(active[:, None], g, p * 0.0)  # NaN rows stay NaN, as autograd
                    gp = grad_ptr + rows.to(tl.int64)[:, None] * C + cc[None, :]
                    tl.store(gp, g.to(grad_ptr.dtype.element_ty), mask=m2)
    if SMOOTH:
        loss = one_m_eps * nll - eps * (sum_logp / C)
    else:
        loss = nll
    if HAS_CW:
        if SMOOTH:
            weighted = one_m_eps * (w_y * nll) - eps * sum_wlogp / C
        else:
            weighted = w_y * nll
    else:
        weighted = loss
    if SINGLE:
        if WRITE_GRAD:
            p = tl.exp(logp)
            hot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            if HAS_CW:
                wcg = tl.load(cweight_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
            else:
                wcg = 1.0
            g = _grad_coef(p, hot, w_y, wcg, sum_w, pw, eps, one_m_eps, C, HAS_CW, SMOOTH)
            g = tl.where(active[:, None], g, p * 0.0)
            gp = grad_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(gp, g.to(grad_ptr.dtype.element_ty), mask=m2)
    finite = _finite(loss) & _finite(p_true)
    flags = (tl.where(active, FLAG_ACTIVE, 0) + tl.where(finite & active, FLAG_FINITE, 0)
             + tl.where(bad_index, FLAG_BAD_INDEX, 0) + tl.where(bad_label, FLAG_BAD_LABEL, 0))
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(ptrue_ptr + rows, p_true, mask=rmask)
    tl.store(row_ptr + rows, tl.where(active, pw * weighted, 0.0), mask=rmask)
    tl.store(wy_ptr + rows, tl.where(active, w_y, 0.0), mask=rmask)
    tl.store(flags_ptr + rows, flags, mask=rmask)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _saturate(x):
    """float64 ``x`` as float32, a finite value beyond float32's range clamped to
    +-STATE_MAX instead of rounding to inf; NaN and +-inf stay as they are."""
    return tl.where(_finite(x), tl.minimum(tl.maximum(x, -STATE_MAX), STATE_MAX), x).to(tl.float32)


@triton.jit
def _observed(v):
    """An observed value (a loss or p_true of any floating dtype) as float32: a float64 one
    saturates (float16, bfloat16 and float32 values always fit)."""
    if v.dtype == tl.float64:
        out = _saturate(v)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def observe_rows_kernel(losses_ptr, probs_ptr, indices_ptr, pweight_ptr,
                        loss_ptr, ptrue_ptr, row_ptr, wy_ptr, flags_ptr, scale_ptr, B, N,
                        HAS_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    """``observe``'s per-row arrays for ``state_update_kernel``: the observed loss (float32,
    saturated), p_true (the given probabilities, else exp(-loss), saturated), the flags, the
    policy-weighted loss of active rows (0 for the others; a float64 loss beyond float32's
    range is inf there, as the reference's), weight 1 per active row (the mean's count) and
    the row's scale before the reduction (its policy weight if active, else 0)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    idx = tl.load(indices_ptr + rows, mask=rmask, other=0).to(tl.int64)
    bad_index = rmask & ((idx < 0) | (idx >= N))
    active = rmask & (~bad_index)
    given = tl.load(losses_ptr + rows, mask=rmask, other=0.0)
    raw = given.to(tl.float32)  # the returned loss: as the reference's losses.float()
    loss = _observed(given)
    if HAS_PROBS:
        p_true = _observed(tl.load(probs_ptr + rows, mask=rmask, other=0.0))
    else:
        p_true = tl.exp(-loss)
        p_true = tl.where(p_true == float("inf"), STATE_MAX, p_true)
    pw = tl.load(pweight_ptr + tl.where(active, idx, N), mask=rmask, other=0.0)
    scale = tl.where(active, pw, 0.0)
    finite = _finite(loss) & _finite(p_true)
    flags = (tl.where(active, FLAG_ACTIVE, 0) + tl.where(finite & active, FLAG_FINITE, 0)
             + tl.where(bad_index, FLAG_BAD_INDEX, 0))
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(ptrue_ptr + rows, p_true, mask=rmask)
    tl.store(row_ptr + rows, tl.where(active, pw * raw, 0.0), mask=rmask)
    tl.store(wy_ptr + rows, tl.where(active, 1.0, 0.0), mask=rmask)
    tl.store(flags_ptr + rows, flags, mask=rmask)
    tl.store(scale_ptr + rows, scale, mask=rmask)


@triton.jit
def _grad_coef(p, hot, w_y, wc, sum_w, pw, eps, one_m_eps, C, HAS_CW: tl.constexpr,
               SMOOTH: tl.constexpr):
    """d(pw * weighted loss)/d(logit) from the softmax ``p`` and the one-hot label ``hot``."""
    d = p - hot
    if HAS_CW:
        g = d * w_y[:, None]
        if SMOOTH:
            g = one_m_eps * g - (eps / C) * (wc - p * sum_w)
    else:
        g = d
        if SMOOTH:
            g = one_m_eps * d + eps * (p - 1.0 / C)
    return g * pw[:, None]


@triton.jit
def state_update_kernel(flags_ptr, indices_ptr, labels_ptr, loss_ptr, ptrue_ptr, row_ptr, wy_ptr,
                        s_loss_ptr, s_var_ptr, s_p_ptr, s_seen_ptr, s_last_ptr,
                        stats_ptr, errors_ptr, out_ptr, scale_ptr, B, epoch, ema, one_m_ema,
                        NUM_UPDATE, update, reduction, safe_mean,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Programs < NUM_UPDATE: merge duplicates and update the state of the rows they own.
    Program NUM_UPDATE: batch totals (non-finite count, epoch loss/count into ``stats`` if
    ``update`` is nonzero; the error counters always) and the reduction, so "sum" and "mean"
    need no further launch: ``out`` = the sum of the per-row outputs, divided under "mean"
    by the sum of the active rows' class weights ``den`` (0/0 = NaN, as F.cross_entropy);
    ``scale`` = 1/den under "mean", else 1. With ``safe_mean`` (observe) a batch without
    an active row has scale 0 and out 0. A call without update launches the totals program
    alone (NUM_UPDATE = 0, update = 0).

    Update rules (as the reference, fastsel/state.py): first observation sets the mean,
    variance 0; otherwise m += a*d, v = (1-a)*(v + a*d*d); p_true is the running mean over
    every occurrence; seen += occurrences; last_epoch = epoch. The fold runs in float64
    (``ema`` and ``one_m_ema`` are float32 scalars, widened) and each result is stored
    saturated at +-STATE_MAX, so a finite observation never makes the state inf.
    """
    pid = tl.program_id(0)
    if pid < NUM_UPDATE:
        ri = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        mi = ri < B
        fi = tl.load(flags_ptr + ri, mask=mi, other=0)
        obs_i = (fi & FLAG_OBSERVED) == FLAG_OBSERVED
        idx_i = tl.load(indices_ptr + ri, mask=mi, other=0).to(tl.int64)
        key_i = tl.where(obs_i, idx_i, -1)
        sum_l = tl.zeros([BLOCK_I], tl.float64)
        sum_p = tl.zeros([BLOCK_I], tl.float64)
        cnt = tl.zeros([BLOCK_I], tl.int32)
        before = tl.zeros([BLOCK_I], tl.int32)
        for j0 in range(0, B, BLOCK_J):
            rj = j0 + tl.arange(0, BLOCK_J)
            mj = rj < B
            fj = tl.load(flags_ptr + rj, mask=mj, other=0)
            obs_j = (fj & FLAG_OBSERVED) == FLAG_OBSERVED
            key_j = tl.where(obs_j, tl.load(indices_ptr + rj, mask=mj, other=0).to(tl.int64), -2)
            eq = key_i[:, None] == key_j[None, :]
            hits = tl.sum(eq.to(tl.int32), axis=1)
            if tl.sum(hits, axis=0) > 0:  # most tiles hold no duplicate: skip the f64 sums
                lj = tl.load(loss_ptr + rj, mask=mj, other=0.0).to(tl.float64)
                pj = tl.load(ptrue_ptr + rj, mask=mj, other=0.0).to(tl.float64)
                sum_l += tl.sum(tl.where(eq, lj[None, :], 0.0), axis=1)
                sum_p += tl.sum(tl.where(eq, pj[None, :], 0.0), axis=1)
                cnt += hits
                before += tl.sum((eq & (rj[None, :] < ri[:, None])).to(tl.int32), axis=1)
        owner = obs_i & (before == 0)
        t = tl.where(owner, idx_i, 0)
        c64 = cnt.to(tl.float64)
        safe = tl.maximum(c64, 1.0)
        obs_l = (sum_l / safe).to(tl.float32).to(tl.float64)
        obs_p = (sum_p / safe).to(tl.float32).to(tl.float64)
        m_old = tl.load(s_loss_ptr + t, mask=owner, other=0.0).to(tl.float64)
        v_old = tl.load(s_var_ptr + t, mask=owner, other=0.0).to(tl.float64)
        p_old = tl.load(s_p_ptr + t, mask=owner, other=0.0).to(tl.float64)
        s_old = tl.load(s_seen_ptr + t, mask=owner, other=0)
        first = s_old == 0
        zero32 = tl.zeros([BLOCK_I], tl.float32)  # the float32 scalars, widened exactly
        a = (zero32 + ema).to(tl.float64)
        b = (zero32 + one_m_ema).to(tl.float64)
        delta = obs_l - m_old
        ad = a * delta
        m_new = _saturate(tl.where(first, obs_l, m_old + ad))
        v_new = _saturate(tl.where(first, 0.0, b * (v_old + ad * delta)))
        s_new = s_old + cnt
        ratio = c64 / tl.maximum(s_new.to(tl.float64), 1.0)
        p_new = _saturate(p_old + (obs_p - p_old) * ratio)
        tl.store(s_loss_ptr + t, m_new, mask=owner)
        tl.store(s_var_ptr + t, v_new, mask=owner)
        tl.store(s_p_ptr + t, p_new, mask=owner)
        tl.store(s_seen_ptr + t, s_new, mask=owner)
        tl.store(s_last_ptr + t, tl.zeros([BLOCK_I], tl.int32) + epoch, mask=owner)
    else:
        nonfinite = tl.zeros([BLOCK_J], tl.int32)
        count = tl.zeros([BLOCK_J], tl.int32)
        total = tl.zeros([BLOCK_J], tl.float64)
        n_bi = tl.zeros([BLOCK_J], tl.int32)
        n_bl = tl.zeros([BLOCK_J], tl.int32)
        first_bi = tl.zeros([BLOCK_J], tl.int32) + B
        first_bl = tl.zeros([BLOCK_J], tl.int32) + B
        red_row = tl.zeros([BLOCK_J], tl.float32)
        red_wy = tl.zeros([BLOCK_J], tl.float32)
        for j0 in range(0, B, BLOCK_J):
            rj = j0 + tl.arange(0, BLOCK_J)
            mj = rj < B
            f = tl.load(flags_ptr + rj, mask=mj, other=0)
            act = (f & FLAG_ACTIVE) != 0
            obs = (f & FLAG_OBSERVED) == FLAG_OBSERVED
            bi = (f & FLAG_BAD_INDEX) != 0
            bl = (f & FLAG_BAD_LABEL) != 0
            nonfinite += (act & ~obs).to(tl.int32)
            count += obs.to(tl.int32)
            total += tl.where(obs, tl.load(loss_ptr + rj, mask=mj, other=0.0).to(tl.float64), 0.0)
            n_bi += bi.to(tl.int32)
            n_bl += bl.to(tl.int32)
            first_bi = tl.minimum(first_bi, tl.where(bi, rj, B))
            first_bl = tl.minimum(first_bl, tl.where(bl, rj, B))
            red_row += tl.load(row_ptr + rj, mask=mj, other=0.0)
            red_wy += tl.load(wy_ptr + rj, mask=mj, other=0.0)
        tot = tl.sum(red_row, axis=0)
        den = tl.sum(red_wy, axis=0)
        is_mean = reduction == REDUCTION_MEAN
        if safe_mean != 0:
            scale = tl.where(is_mean, tl.where(den == 0.0, 0.0, 1.0 / den), 1.0)
            out = tot * scale
        else:
            scale = tl.where(is_mean, 1.0 / den, 1.0)
            out = tl.where(is_mean, tot / den, tot)
        tl.store(out_ptr, out)
        tl.store(scale_ptr, scale)
        nb_i = tl.sum(n_bi, axis=0)
        nb_l = tl.sum(n_bl, axis=0)
        fb_i = tl.min(first_bi, axis=0)
        fb_l = tl.min(first_bl, axis=0)
        if update != 0:
            s0 = tl.load(stats_ptr + STAT_NONFINITE)
            s1 = tl.load(stats_ptr + STAT_EPOCH_LOSS)
            s2 = tl.load(stats_ptr + STAT_EPOCH_COUNT)
            tl.store(stats_ptr + STAT_NONFINITE, s0 + tl.sum(nonfinite, axis=0).to(tl.float64))
            tl.store(stats_ptr + STAT_EPOCH_LOSS, s1 + tl.sum(total, axis=0))
            tl.store(stats_ptr + STAT_EPOCH_COUNT, s2 + tl.sum(count, axis=0).to(tl.float64))
        e0 = tl.load(errors_ptr + ERR_INDEX_COUNT)
        e1 = tl.load(errors_ptr + ERR_INDEX_VALUE)
        v_bi = tl.load(indices_ptr + fb_i, mask=nb_i > 0, other=0).to(tl.int64)
        tl.store(errors_ptr + ERR_INDEX_VALUE, tl.where((e0 == 0) & (nb_i > 0), v_bi, e1))
        tl.store(errors_ptr + ERR_INDEX_COUNT, e0 + nb_i.to(tl.int64))
        e2 = tl.load(errors_ptr + ERR_LABEL_COUNT)
        e3 = tl.load(errors_ptr + ERR_LABEL_VALUE)
        v_bl = tl.load(labels_ptr + fb_l, mask=nb_l > 0, other=0).to(tl.int64)
        tl.store(errors_ptr + ERR_LABEL_VALUE, tl.where((e2 == 0) & (nb_l > 0), v_bl, e3))
        tl.store(errors_ptr + ERR_LABEL_COUNT, e2 + nb_l.to(tl.int64))
