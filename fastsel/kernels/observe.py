"""``observe``'s first launch: ``observe_rows_kernel`` builds, from the per-sample losses of
any loss function, the per-row arrays ``ce_step_kernel`` builds, so ``merge_update_kernel``
(``merge``) does the update.
"""
import triton
import triton.language as tl

from .admit import _admit
from .merge import (FLAG_ACTIVE, FLAG_BAD_INDEX, FLAG_FINITE, FLAG_STRAY, STATE_MAX,
                    _count_rows, _finite, _saturate)


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
