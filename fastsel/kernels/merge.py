"""The second launch of the fused step and of ``observe``: ``merge_update_kernel`` merges
duplicates, folds each sample's observation into the state and makes the batch totals and
the reduction. The rows kernels (``cross_entropy``, ``observe``) write the per-row flags
defined here and count the duplicates with ``_count_rows``, the merge's first half, so the
update has one definition on Triton.

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

The slots of ``stats`` and ``errors`` come from ``fastsel.layout`` (module-level constexprs).
"""
import triton
import triton.language as tl

from fastsel import layout

from .admit import _count_call

# Slots of the state's stats (float64) and errors (int64) vectors, defined in fastsel.layout.
STAT_NONFINITE = tl.constexpr(layout.STAT_NONFINITE)
STAT_EPOCH_LOSS = tl.constexpr(layout.STAT_EPOCH_LOSS)
STAT_EPOCH_COUNT = tl.constexpr(layout.STAT_EPOCH_COUNT)
ERR_INDEX_COUNT = tl.constexpr(layout.ERR_INDEX_COUNT)
ERR_INDEX_VALUE = tl.constexpr(layout.ERR_INDEX_VALUE)
ERR_LABEL_COUNT = tl.constexpr(layout.ERR_LABEL_COUNT)
ERR_LABEL_VALUE = tl.constexpr(layout.ERR_LABEL_VALUE)
REDUCTION_MEAN = tl.constexpr(layout.REDUCTION_MEAN)
# float32's largest finite value: every state value saturates there (fastsel/state.py).
STATE_MAX = tl.constexpr(layout.STATE_MAX)

# Per-row flags written by ce_step_kernel / observe_rows_kernel, read by merge_update_kernel.
FLAG_ACTIVE = tl.constexpr(1)     # label not ignored, index and label in range
FLAG_FINITE = tl.constexpr(2)     # the row's loss and p_true are finite
FLAG_BAD_INDEX = tl.constexpr(4)
FLAG_BAD_LABEL = tl.constexpr(8)
FLAG_STRAY = tl.constexpr(16)     # a sample the epoch did not select: left out and counted
FLAG_OBSERVED = tl.constexpr(3)   # FLAG_ACTIVE | FLAG_FINITE: the row enters the state


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
