"""The fused step's first launch: ``ce_step_kernel``, per-row cross-entropy, p_true and
d(loss)/d(logits) in one read of the logits, into the per-row arrays ``merge_update_kernel``
(``merge``) reads.

The gradient is written unscaled by the reduction; its scale is the 0-d ``scale`` and the
autograd formula (``fastsel.ops``) multiplies by ``grad_output * scale`` in backward, a
multiply that a device-side grad_output needs anyway (``scale_grad``).
"""
import triton
import triton.language as tl

from .admit import _admit
from .merge import (FLAG_ACTIVE, FLAG_BAD_INDEX, FLAG_BAD_LABEL, FLAG_FINITE, FLAG_STRAY,
                    _count_rows, _finite)


@triton.jit
def ce_step_kernel(logits_ptr, stride_row, labels_ptr, indices_ptr, pweight_ptr, cweight_ptr,
                   loss_ptr, ptrue_ptr, row_ptr, wy_ptr, flags_ptr, grad_ptr,
                   dup_ptr, acc_ptr, grp_ptr, member_ptr, rows_ptr,
                   B, C, N, ignore_index, eps, one_m_eps, count, check,
                   HAS_CW: tl.constexpr, SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
    """BLOCK_R rows per program: online softmax in fp32 over BLOCK_C-column chunks.

    Writes per row the state loss (smoothed, no class weight), p_true, the policy-weighted
    loss for the reduction, the class weight of active rows and the flags; with WRITE_GRAD,
    d(policy weight * weighted loss)/d(logits) (the reduction's scale is applied in backward).
    Rows left out get gradient 0 * softmax, like autograd through ``F.cross_entropy``: NaN
    when the row's logits hold a NaN (or +inf), else 0. With ``count`` nonzero (the step
    updates the state), the duplicate count of each observed row's sample (``_count_rows``).
    With ``check`` nonzero, the rows a refused call or a stray index leaves out (``_admit``).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    idx = tl.load(indices_ptr + rows, mask=rmask, other=0).to(tl.int64)
    bad_index = rmask & ((idx < 0) | (idx >= N))
    not_ign = lab != ignore_index
    bad_label = rmask & not_ign & ((lab < 0) | (lab >= C))
    kept, stray = _admit(member_ptr, rows_ptr, rows, idx, bad_index, B, N, check)
    active = kept & not_ign & (~bad_label) & (~bad_index) & (~stray)
    # The flags of the rows left out, settled before the softmax (fewer values live across
    # it); a refused call's range errors are not recorded.
    faults = (tl.where(bad_index & kept, FLAG_BAD_INDEX, 0)
              + tl.where(bad_label & kept, FLAG_BAD_LABEL, 0) + tl.where(stray, FLAG_STRAY, 0))
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
    flags = tl.where(active, FLAG_ACTIVE, 0) + tl.where(finite & active, FLAG_FINITE, 0) + faults
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(ptrue_ptr + rows, p_true, mask=rmask)
    tl.store(row_ptr + rows, tl.where(active, pw * weighted, 0.0), mask=rmask)
    tl.store(wy_ptr + rows, tl.where(active, w_y, 0.0), mask=rmask)
    tl.store(flags_ptr + rows, flags, mask=rmask)
    _count_rows(dup_ptr, acc_ptr, grp_ptr, rows, idx, finite & active, B, count)


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
