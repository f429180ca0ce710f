"""The fused step in two launches: ``ce_step_kernel`` (per-row cross-entropy, p_true and
d(loss)/d(logits) in one read of the logits) and ``merge_update_kernel`` (duplicates merged,
the state folded, the batch totals and the reduction). ``observe`` (per-sample losses of any
loss function) builds the same per-row arrays with ``observe_rows_kernel`` and reuses
``merge_update_kernel``, so the update has one definition on Triton.

Why two launches: duplicates of a sample in one batch are ONE observation of their mean
loss, so the fold needs every row's loss first, and Triton has no grid-wide barrier.

The merge, O(1) work per row and no sort, no pairwise pass, no single-program stage:

* ``dup``: a per-state int32 scratch of N + 2 entries that is all zero between steps
  (slot N: a dummy target that stays 0; slot N + 1: the ticket of the last program).
* Rows kernel: each observed row does ``atomic_add(dup[idx], 1)``, so after the launch
  ``dup[idx]`` is the number of observed rows of sample ``idx`` (c). It also zeroes its own
  row's slots of the per-call group scratch ``acc`` (float64 loss and p_true sums) and
  ``grp`` (int32 arrival counter; the group count beside it needs no zeroing).
* Merge kernel, one lane per row: a row with c == 1 is alone: it folds its own observation
  and resets ``dup[idx]``. A row of a group (c > 1) learns its group's slot f, a row of the
  group: the first to ``atomic_cas(dup[idx], c, -(r + 1))`` claims ``dup[idx]`` with its row
  r, the others read -(f + 1) back. Each member adds its loss and p_true (float64) into
  ``acc[f]`` and then arrives at ``grp[f]``: the claimer adds 1 - c (after storing c beside
  it), the others 1, so the counter is 0 exactly after the last arrival, whichever row that
  is. That row folds the group's sums (one observation of their mean, as the reference's
  ``merge_duplicates``: float64 sums of float32 values, exact for a few values, so the
  order of the adds does not matter) and resets ``dup[idx]`` to 0. A batch whose rows all
  carry one index costs B atomics on a few addresses: O(B), no serial loop over the group.
* Totals: each program writes its partial sums (reduction, divisor, counts, first bad row)
  to ``part``; the program that takes the last ticket on ``dup[N + 1]`` reduces them in
  program order (deterministic), writes ``out``, ``scale`` (1/divisor under "mean", on the
  device: no host sync), the epoch stats, the error and row counters, and resets the ticket.

Which rows count (``fastsel.ops``) is decided inside the same two launches, on the device:
with ``check`` (an update call given its epoch's ``member`` mask and ``rows`` counters) the
rows kernel reads ``rows[ROW_TRAINED]``, ``rows[ROW_SHARD]`` (``_refused``: the whole call
is refused for room) and ``member[idx]`` (stray rows), leaves those rows out (no loss, no
gradient, not in the mean's divisor, not folded) and flags the stray ones; the merge's last
program counts them, or the refused call, in the ``ROW_*`` slots, and an admitted call's
rows and call. Nothing writes ``rows`` between the two reads of the room check (the rows
kernel's and the last program's), so both see the same figures. Strict mode checks on the
host before any launch (``fastsel.backends.triton``), so the kernels never refuse a row there.

The gradient is written unscaled by the reduction; its scale is the 0-d ``scale`` and the
autograd formula (``fastsel.ops``) multiplies by ``grad_output * scale`` in backward, a
multiply that a device-side grad_output needs anyway.

The slots of ``stats``, ``errors`` and ``rows`` come from ``fastsel.layout`` (module-level
constexprs).
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
# Slots of the epoch's int64 row counters (fastsel.rows), defined in fastsel.layout.
ROW_TRAINED = tl.constexpr(layout.ROW_TRAINED)
ROW_SHARD = tl.constexpr(layout.ROW_SHARD)
ROW_CALLS = tl.constexpr(layout.ROW_CALLS)
ROW_STRAY_COUNT = tl.constexpr(layout.ROW_STRAY_COUNT)
ROW_STRAY_VALUE = tl.constexpr(layout.ROW_STRAY_VALUE)
ROW_OVER_COUNT = tl.constexpr(layout.ROW_OVER_COUNT)
ROW_OVER_VALUE = tl.constexpr(layout.ROW_OVER_VALUE)
ROW_OVER_EPOCH = tl.constexpr(layout.ROW_OVER_EPOCH)

# Per-row flags written by ce_step_kernel / observe_rows_kernel, read by merge_update_kernel.
FLAG_ACTIVE = tl.constexpr(1)     # label not ignored, index and label in range
FLAG_FINITE = tl.constexpr(2)     # the row's loss and p_true are finite
FLAG_BAD_INDEX = tl.constexpr(4)
FLAG_BAD_LABEL = tl.constexpr(8)
FLAG_STRAY = tl.constexpr(16)     # a sample the epoch did not select: left out and counted
FLAG_OBSERVED = tl.constexpr(3)   # FLAG_ACTIVE | FLAG_FINITE: the row enters the state

REDUCTION_MEAN = tl.constexpr(layout.REDUCTION_MEAN)
# float32's largest finite value: every state value saturates there (fastsel/state.py).
STATE_MAX = tl.constexpr(layout.STATE_MAX)


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
def _on(flag):
    """An int argument's ``!= 0`` as a boolean tensor: under the interpreter the comparison
    of an int argument is a Python bool, which ``tl.load`` refuses as a mask."""
    return (tl.zeros([], tl.int32) + flag) != 0


@triton.jit
def _refused(rows_ptr, B, check):
    """Whether a call of B rows is refused for room (``fastsel.ops``, check 1): no epoch in
    progress (``rows[ROW_SHARD] < 0``) or ``rows[ROW_TRAINED] + B`` past the shard; false
    without ``check``. The rows kernels and the merge's last program read it alike."""
    on = _on(check)
    trained = tl.load(rows_ptr + ROW_TRAINED, mask=on, other=0)
    shard = tl.load(rows_ptr + ROW_SHARD, mask=on, other=0)
    return on & ((shard < 0) | (trained + B > shard))


@triton.jit
def _admit(member_ptr, rows_ptr, rows, idx, bad_index, B, N, check):
    """The rows kernels' room and membership checks (``fastsel.ops``, checks 1 and 2) of
    their block of ``rows``: (the rows of the block unless the whole call is refused for
    room, the stray rows: an index in [0, N) whose ``member`` entry is 0, in a call not
    refused). Without ``check``: every row of the block, none stray. The scalar conditions
    become blocks by ``rows < where(...)`` (a block & a scalar bool is int32 under the
    interpreter)."""
    over = _refused(rows_ptr, B, check)
    kept = rows < tl.where(over, 0, B)
    look = (rows < tl.where(_on(check) & (~over), B, 0)) & (~bad_index)
    stray = look & (tl.load(member_ptr + tl.where(look, idx, N), mask=look, other=1) == 0)
    return kept, stray


@triton.jit
def _count_rows(dup_ptr, acc_ptr, grp_ptr, rows, idx, observed, B, count):
    """The rows kernels' half of the merge (module docstring): every observed row counts
    itself in ``dup[idx]``; every row zeroes its slots of the group sums and arrivals."""
    on = rows < tl.where(count != 0, B, 0)   # the rows, or none (written without a block &
    #                                           scalar bool, which the interpreter makes int32)
    tl.atomic_add(dup_ptr + tl.where(observed, idx, 0), 1, mask=on & observed, sem="relaxed")
    zero = tl.zeros(rows.shape, tl.float64)
    tl.store(acc_ptr + rows, zero, mask=on)
    tl.store(acc_ptr + B + rows, zero, mask=on)
    tl.store(grp_ptr + rows, tl.zeros(rows.shape, tl.int32), mask=on)


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
                        loss_ptr, ptrue_ptr, row_ptr, wy_ptr, flags_ptr, scale_ptr,
                        dup_ptr, acc_ptr, grp_ptr, member_ptr, rows_ptr, B, N, count, check,
                        HAS_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    """``observe``'s per-row arrays for ``merge_update_kernel``: the observed loss (float32,
    saturated), p_true (the given probabilities, else exp(-loss), saturated), the flags, the
    policy-weighted loss of active rows (0 for the others; a float64 loss beyond float32's
    range is inf there, as the reference's), weight 1 per active row (the mean's count) and
    the row's scale before the reduction (its policy weight if active, else 0); with
    ``count``, the duplicate counts (``_count_rows``); with ``check``, the rows a refused
    call or a stray index leaves out (``_admit``)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    idx = tl.load(indices_ptr + rows, mask=rmask, other=0).to(tl.int64)
    bad_index = rmask & ((idx < 0) | (idx >= N))
    kept, stray = _admit(member_ptr, rows_ptr, rows, idx, bad_index, B, N, check)
    active = kept & (~bad_index) & (~stray)
    bad_index = bad_index & kept     # a refused call's range errors are not recorded
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
             + tl.where(bad_index, FLAG_BAD_INDEX, 0) + tl.where(stray, FLAG_STRAY, 0))
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(ptrue_ptr + rows, p_true, mask=rmask)
    tl.store(row_ptr + rows, tl.where(active, pw * raw, 0.0), mask=rmask)
    tl.store(wy_ptr + rows, tl.where(active, 1.0, 0.0), mask=rmask)
    tl.store(flags_ptr + rows, flags, mask=rmask)
    tl.store(scale_ptr + rows, scale, mask=rmask)
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


# Per-program partials of merge_update_kernel (float64 slots of ``part``).
P_ROW = tl.constexpr(0)       # sum of the per-row outputs (float32 sum)
P_WY = tl.constexpr(1)        # sum of the active rows' class weights (float32 sum): the divisor
P_NONFINITE = tl.constexpr(2)
P_COUNT = tl.constexpr(3)     # observed rows
P_TOTAL = tl.constexpr(4)     # float64 sum of the observed losses
P_NBI = tl.constexpr(5)
P_FBI = tl.constexpr(6)       # first row with a bad index (B if none)
P_NBL = tl.constexpr(7)
P_FBL = tl.constexpr(8)
P_NST = tl.constexpr(9)       # stray rows
P_FST = tl.constexpr(10)      # first stray row (B if none)
P_STRIDE = tl.constexpr(11)
#: The slot of ``dup`` past the dummy slot N: the ticket of the totals.
DUP_TICKET = tl.constexpr(1)


@triton.jit
def merge_update_kernel(flags_ptr, indices_ptr, labels_ptr, loss_ptr, ptrue_ptr, row_ptr, wy_ptr,
                        s_loss_ptr, s_var_ptr, s_p_ptr, s_seen_ptr, s_last_ptr,
                        stats_ptr, errors_ptr, out_ptr, scale_ptr,
                        dup_ptr, acc_ptr, grp_ptr, part_ptr, rows_ptr, epoch_ptr,
                        B, N, ema, one_m_ema, update, reduction, safe_mean, check,
                        BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """One lane per row, BLOCK rows per program, a grid over the rows (no pairwise pass):
    with ``update`` nonzero, merge duplicates and fold each sample's observation into the
    state (module docstring); every program adds its partial totals, and the last one
    writes ``out``, ``scale``, the stats (if ``update``), the error counters and, with
    ``check``, the row counters.

    ``out`` = the sum of the per-row outputs, divided under "mean" by the sum of the active
    rows' class weights ``den`` (0/0 = NaN, as F.cross_entropy); ``scale`` = 1/den under
    "mean" (0 when no row is active: the reference's all-masked gradient is 0, not 0 * inf),
    else 1. With ``safe_mean`` (observe) a batch without an active row has out 0.

    Update rules (as the reference, fastsel/state.py): first observation sets the mean,
    variance 0; otherwise m += a*d, v = (1-a)*(v + a*d*d); p_true is the running mean over
    every occurrence; seen += occurrences; last_epoch = the 0-d ``epoch`` tensor's value
    (read on the device, truncated to int32 as the reference's cast). The fold runs in float64
    (``ema`` and ``one_m_ema`` are float32 scalars, widened) and each result is stored
    saturated at +-STATE_MAX, so a finite observation never makes the state inf.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rm = rows < B
    f = tl.load(flags_ptr + rows, mask=rm, other=0)
    obs = (f & FLAG_OBSERVED) == FLAG_OBSERVED
    idx = tl.load(indices_ptr + rows, mask=rm, other=0).to(tl.int64)
    lo = tl.load(loss_ptr + rows, mask=rm, other=0.0)
    if update != 0:
        sidx = tl.where(obs, idx, N)            # slot N of dup is a dummy that stays 0
        l64 = lo.to(tl.float64)
        p64 = tl.load(ptrue_ptr + rows, mask=rm, other=0.0).to(tl.float64)
        v = tl.load(dup_ptr + sidx, mask=obs, other=0)   # c > 0, or -(f + 1) once claimed
        alone = obs & (v == 1)
        grouped = obs & (v != 1) & (v != 0)
        need_cas = grouped & (v > 1)
        enc = -(rows + 1)
        # Lanes without a claim to make compare the dummy slot with -1: never equal, no write.
        old = tl.atomic_cas(dup_ptr + tl.where(need_cas, sidx, N), tl.where(need_cas, v, -1),
                            enc, sem="relaxed")
        claimer = need_cas & (old == v)
        code = tl.where(claimer, enc, tl.where(need_cas, old, v))
        slot = tl.where(grouped, -code - 1, 0)
        tl.atomic_add(acc_ptr + slot, l64, mask=grouped, sem="relaxed")
        tl.atomic_add(acc_ptr + B + slot, p64, mask=grouped, sem="relaxed")
        tl.store(grp_ptr + B + slot, v, mask=claimer)    # the group's count, for its last row
        tl.debug_barrier()
        add = tl.where(claimer, 1 - v, 1)
        before = tl.atomic_add(grp_ptr + slot, add, mask=grouped, sem="acq_rel")
        last = grouped & ((before + add) == 0)
        g_l = tl.atomic_add(acc_ptr + slot, tl.zeros([BLOCK], tl.float64), mask=last, sem="relaxed")
        g_p = tl.atomic_add(acc_ptr + B + slot, tl.zeros([BLOCK], tl.float64), mask=last,
                            sem="relaxed")
        g_c = tl.atomic_add(grp_ptr + B + slot, tl.zeros([BLOCK], tl.int32), mask=last,
                            sem="relaxed")
        fold = alone | last
        sum_l = tl.where(last, g_l, l64)
        sum_p = tl.where(last, g_p, p64)
        cnt = tl.where(last, g_c, 1)
        t = tl.where(fold, idx, 0)
        c64 = cnt.to(tl.float64)
        obs_l = (sum_l / c64).to(tl.float32).to(tl.float64)
        obs_p = (sum_p / c64).to(tl.float32).to(tl.float64)
        m_old = tl.load(s_loss_ptr + t, mask=fold, other=0.0).to(tl.float64)
        v_old = tl.load(s_var_ptr + t, mask=fold, other=0.0).to(tl.float64)
        p_old = tl.load(s_p_ptr + t, mask=fold, other=0.0).to(tl.float64)
        s_old = tl.load(s_seen_ptr + t, mask=fold, other=0)
        first = s_old == 0
        zero32 = tl.zeros([BLOCK], tl.float32)  # the float32 scalars, widened exactly
        a = (zero32 + ema).to(tl.float64)
        b = (zero32 + one_m_ema).to(tl.float64)
        delta = obs_l - m_old
        ad = a * delta
        m_new = _saturate(tl.where(first, obs_l, m_old + ad))
        v_new = _saturate(tl.where(first, 0.0, b * (v_old + ad * delta)))
        s_new = s_old + cnt
        ratio = c64 / tl.maximum(s_new.to(tl.float64), 1.0)
        p_new = _saturate(p_old + (obs_p - p_old) * ratio)
        tl.store(s_loss_ptr + t, m_new, mask=fold)
        tl.store(s_var_ptr + t, v_new, mask=fold)
        tl.store(s_p_ptr + t, p_new, mask=fold)
        tl.store(s_seen_ptr + t, s_new, mask=fold)
        epoch = tl.load(epoch_ptr).to(tl.int32)
        tl.store(s_last_ptr + t, tl.zeros([BLOCK], tl.int32) + epoch, mask=fold)
        tl.store(dup_ptr + t, tl.zeros([BLOCK], tl.int32), mask=fold)   # dup is 0 again
    # ---- this program's partial totals
    act = (f & FLAG_ACTIVE) != 0
    bi = (f & FLAG_BAD_INDEX) != 0
    bl = (f & FLAG_BAD_LABEL) != 0
    st = (f & FLAG_STRAY) != 0
    pp = part_ptr + pid * P_STRIDE
    tl.store(pp + P_ROW, tl.sum(tl.load(row_ptr + rows, mask=rm, other=0.0), axis=0).to(tl.float64))
    tl.store(pp + P_WY, tl.sum(tl.load(wy_ptr + rows, mask=rm, other=0.0), axis=0).to(tl.float64))
    tl.store(pp + P_NONFINITE, tl.sum((act & ~obs).to(tl.int32), axis=0).to(tl.float64))
    tl.store(pp + P_COUNT, tl.sum(obs.to(tl.int32), axis=0).to(tl.float64))
    tl.store(pp + P_TOTAL, tl.sum(tl.where(obs, lo.to(tl.float64), 0.0), axis=0))
    tl.store(pp + P_NBI, tl.sum(bi.to(tl.int32), axis=0).to(tl.float64))
    tl.store(pp + P_FBI, tl.min(tl.where(bi, rows, B), axis=0).to(tl.float64))
    tl.store(pp + P_NBL, tl.sum(bl.to(tl.int32), axis=0).to(tl.float64))
    tl.store(pp + P_FBL, tl.min(tl.where(bl, rows, B), axis=0).to(tl.float64))
    tl.store(pp + P_NST, tl.sum(st.to(tl.int32), axis=0).to(tl.float64))
    tl.store(pp + P_FST, tl.min(tl.where(st, rows, B), axis=0).to(tl.float64))
    tl.debug_barrier()
    nprog = tl.num_programs(0)
    ticket = tl.atomic_add(dup_ptr + N + DUP_TICKET, 1, sem="acq_rel")
    if ticket == nprog - 1:
        tl.store(dup_ptr + N + DUP_TICKET, 0)
        _totals(part_ptr, nprog, indices_ptr, labels_ptr, stats_ptr, errors_ptr, out_ptr,
                scale_ptr, rows_ptr, epoch_ptr, B, update, reduction, safe_mean, check, PBLOCK)


@triton.jit
def _totals(part_ptr, nprog, indices_ptr, labels_ptr, stats_ptr, errors_ptr, out_ptr, scale_ptr,
            rows_ptr, epoch_ptr, B, update, reduction, safe_mean, check, PBLOCK: tl.constexpr):
    """The last program: the partials summed in program order (deterministic), then the
    reduction, its scale, the epoch stats, the error counters and the row counters."""
    acc_row = tl.zeros([PBLOCK], tl.float64)
    acc_wy = tl.zeros([PBLOCK], tl.float64)
    acc_nf = tl.zeros([PBLOCK], tl.float64)
    acc_cnt = tl.zeros([PBLOCK], tl.float64)
    acc_tot = tl.zeros([PBLOCK], tl.float64)
    acc_nbi = tl.zeros([PBLOCK], tl.float64)
    acc_nbl = tl.zeros([PBLOCK], tl.float64)
    acc_fbi = tl.zeros([PBLOCK], tl.float64) + B
    acc_fbl = tl.zeros([PBLOCK], tl.float64) + B
    acc_nst = tl.zeros([PBLOCK], tl.float64)
    acc_fst = tl.zeros([PBLOCK], tl.float64) + B
    for q0 in range(0, nprog, PBLOCK):
        q = q0 + tl.arange(0, PBLOCK)
        qm = q < nprog
        base = part_ptr + q * P_STRIDE
        acc_row += tl.load(base + P_ROW, mask=qm, other=0.0, volatile=True)
        acc_wy += tl.load(base + P_WY, mask=qm, other=0.0, volatile=True)
        acc_nf += tl.load(base + P_NONFINITE, mask=qm, other=0.0, volatile=True)
        acc_cnt += tl.load(base + P_COUNT, mask=qm, other=0.0, volatile=True)
        acc_tot += tl.load(base + P_TOTAL, mask=qm, other=0.0, volatile=True)
        acc_nbi += tl.load(base + P_NBI, mask=qm, other=0.0, volatile=True)
        acc_nbl += tl.load(base + P_NBL, mask=qm, other=0.0, volatile=True)
        acc_fbi = tl.minimum(acc_fbi, tl.load(base + P_FBI, mask=qm, other=B, volatile=True))
        acc_fbl = tl.minimum(acc_fbl, tl.load(base + P_FBL, mask=qm, other=B, volatile=True))
        acc_nst += tl.load(base + P_NST, mask=qm, other=0.0, volatile=True)
        acc_fst = tl.minimum(acc_fst, tl.load(base + P_FST, mask=qm, other=B, volatile=True))
    tot = tl.sum(acc_row, axis=0).to(tl.float32)
    den = tl.sum(acc_wy, axis=0).to(tl.float32)
    n_act = tl.sum(acc_nf, axis=0) + tl.sum(acc_cnt, axis=0)   # active rows
    is_mean = reduction == REDUCTION_MEAN
    scale = tl.where(is_mean, tl.where(n_act == 0.0, 0.0, 1.0 / den), 1.0)
    if safe_mean != 0:
        out = tot * scale
    else:
        out = tl.where(is_mean, tot / den, tot)
    tl.store(out_ptr, out)
    tl.store(scale_ptr, scale)
    nb_i = tl.sum(acc_nbi, axis=0).to(tl.int64)
    nb_l = tl.sum(acc_nbl, axis=0).to(tl.int64)
    fb_i = tl.min(acc_fbi, axis=0).to(tl.int64)
    fb_l = tl.min(acc_fbl, axis=0).to(tl.int64)
    if update != 0:
        s0 = tl.load(stats_ptr + STAT_NONFINITE)
        s1 = tl.load(stats_ptr + STAT_EPOCH_LOSS)
        s2 = tl.load(stats_ptr + STAT_EPOCH_COUNT)
        tl.store(stats_ptr + STAT_NONFINITE, s0 + tl.sum(acc_nf, axis=0))
        tl.store(stats_ptr + STAT_EPOCH_LOSS, s1 + tl.sum(acc_tot, axis=0))
        tl.store(stats_ptr + STAT_EPOCH_COUNT, s2 + tl.sum(acc_cnt, axis=0))
    e0 = tl.load(errors_ptr + ERR_INDEX_COUNT)
    e1 = tl.load(errors_ptr + ERR_INDEX_VALUE)
    v_bi = tl.load(indices_ptr + fb_i, mask=nb_i > 0, other=0).to(tl.int64)
    tl.store(errors_ptr + ERR_INDEX_VALUE, tl.where((e0 == 0) & (nb_i > 0), v_bi, e1))
    tl.store(errors_ptr + ERR_INDEX_COUNT, e0 + nb_i)
    e2 = tl.load(errors_ptr + ERR_LABEL_COUNT)
    e3 = tl.load(errors_ptr + ERR_LABEL_VALUE)
    v_bl = tl.load(labels_ptr + fb_l, mask=nb_l > 0, other=0).to(tl.int64)
    tl.store(errors_ptr + ERR_LABEL_VALUE, tl.where((e2 == 0) & (nb_l > 0), v_bl, e3))
    tl.store(errors_ptr + ERR_LABEL_COUNT, e2 + nb_l)
    if check != 0:
        _count_call(rows_ptr, epoch_ptr, indices_ptr, B, check,
                    tl.sum(acc_nst, axis=0).to(tl.int64), tl.min(acc_fst, axis=0).to(tl.int64))


@triton.jit
def _count_call(rows_ptr, epoch_ptr, indices_ptr, B, check, n_stray, first_stray):
    """The last program's row counters (``fastsel.ops``, as the reference's ``commit_rows``):
    a call refused for room adds B to ``ROW_OVER_COUNT`` (the first such call also keeps the
    position it would have reached, -1 without an epoch, and its epoch); the stray rows add
    to ``ROW_STRAY_COUNT`` (the first one's sample kept); an admitted call adds B rows and
    one call. ``_refused`` reads the counters as the rows kernel did: nothing wrote them."""
    over = _refused(rows_ptr, B, check)
    trained = tl.load(rows_ptr + ROW_TRAINED)
    shard = tl.load(rows_ptr + ROW_SHARD)
    o_cnt = tl.load(rows_ptr + ROW_OVER_COUNT)
    first_over = over & (o_cnt == 0) & (B > 0)
    at = tl.where(shard < 0, -1, trained + B)
    tl.store(rows_ptr + ROW_OVER_VALUE, tl.where(first_over, at, tl.load(rows_ptr + ROW_OVER_VALUE)))
    tl.store(rows_ptr + ROW_OVER_EPOCH, tl.where(first_over, tl.load(epoch_ptr).to(tl.int64),
                                                 tl.load(rows_ptr + ROW_OVER_EPOCH)))
    tl.store(rows_ptr + ROW_OVER_COUNT, o_cnt + tl.where(over, B, 0))
    s_cnt = tl.load(rows_ptr + ROW_STRAY_COUNT)
    v_st = tl.load(indices_ptr + first_stray, mask=n_stray > 0, other=0).to(tl.int64)
    tl.store(rows_ptr + ROW_STRAY_VALUE, tl.where((s_cnt == 0) & (n_stray > 0), v_st,
                                                  tl.load(rows_ptr + ROW_STRAY_VALUE)))
    tl.store(rows_ptr + ROW_STRAY_COUNT, s_cnt + n_stray)
    tl.store(rows_ptr + ROW_TRAINED, trained + tl.where(over, 0, B))
    tl.store(rows_ptr + ROW_CALLS, tl.load(rows_ptr + ROW_CALLS) + tl.where(over, 0, 1))


@triton.jit
def scale_grad_kernel(grad_ptr, gout_ptr, gout_stride, scale_ptr, out_ptr, numel, C,
                      PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Backward in ONE launch: ``out = grad * (grad_output * scale)`` over the ``numel`` =
    B * C gradient entries, with grad_output and the scale read from device memory (a 0-d
    grad_output, or one per row under reduction "none", any stride). The same float32
    roundings as ``fastsel.ops``' formula (``s = g_out.float() * scale``;
    ``(grad.float() * s).to(grad.dtype)``), so bit-identical."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    if PER_ROW:
        g = tl.load(gout_ptr + (offs // C) * gout_stride, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.load(gout_ptr).to(tl.float32)
    s = g * tl.load(scale_ptr)
    y = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32) * s
    if out_ptr.dtype.element_ty != tl.float32:   # round to nearest even, as torch's .to()
        y = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + offs, y, mask=m)
