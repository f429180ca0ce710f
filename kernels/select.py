"""The selection pass: keep the k largest of N float32 keys, ties to the lower index, NaN last.

Triton has no global top-k, so it is a threshold select on a 32-bit order-preserving
image of each key. The image follows the reference's ``nan_to_num(keys, nan=-inf)`` exactly: NaN ranks
last, +-inf tie with +-FLT_MAX, -0 ties with +0.

1. four radix passes (``radix_hist_kernel`` + ``radix_pick_kernel``, 8 bits each, most
   significant first) find the k-th largest key T and how many keys equal to T to take;
   the running prefix and the remaining count stay in a device buffer, no host sync;
2. ``select_count_kernel`` counts per block the keys above T and equal to T;
   ``select_scan_kernel`` turns them into exclusive per-block offsets;
3. ``select_write_kernel`` compacts, in index order, the keys above T and the lowest-index
   keys equal to T.

``batch_topk_kernel`` is the in-batch top-k (B <= 8192): every key's exact rank by
pairwise comparison (B^2 compares spread over B/64 programs, no sort, no atomics). A
bitonic ``tl.sort`` runs in a single program and took ~20 s for 8192 keys under the
interpreter, so it was dropped (not measured on a GPU).
"""
import triton
import triton.language as tl


@triton.jit
def _sortable(x):
    """float32 -> uint32 in the reference's order: +inf > finite > -inf > NaN, with -0 and
    +0 equal. NaN maps to 0, below -inf's code (0x007FFFFF)."""
    nan = x != x
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    u = tl.where((b >> 31) != 0, ~b, b | 0x80000000)
    return tl.where(nan, 0, u)


@triton.jit
def radix_hist_kernel(keys_ptr, N, ctrl_ptr, hist_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the 8-bit digit at SHIFT of the keys whose higher digits match the prefix."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    prefix = tl.load(ctrl_ptr + 0).to(tl.uint32)
    pmask = tl.load(ctrl_ptr + 1).to(tl.uint32)
    sel = m & ((u & pmask) == prefix)
    digit = ((u >> SHIFT) & 255).to(tl.int32)
    h = tl.histogram(digit, 256, mask=sel)
    bins = tl.arange(0, 256)
    tl.atomic_add(hist_ptr + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def radix_pick_kernel(ctrl_ptr, hist_ptr, SHIFT: tl.constexpr):
    """One program: pick the digit holding the k-th largest key, update prefix, mask and the
    count still to take; clear the histogram for the next pass."""
    bins = tl.arange(0, 256)
    h = tl.load(hist_ptr + bins).to(tl.int64)
    krem = tl.load(ctrl_ptr + 2)
    at_or_above = tl.cumsum(h, axis=0, reverse=True)
    above = at_or_above - h
    hit = (above < krem) & (krem <= at_or_above)
    digit = tl.max(tl.where(hit, bins, -1), axis=0)
    above_d = tl.sum(tl.where(bins == digit, above, 0), axis=0)
    prefix = tl.load(ctrl_ptr + 0)
    pmask = tl.load(ctrl_ptr + 1)
    tl.store(ctrl_ptr + 0, prefix | (digit.to(tl.int64) << SHIFT))
    tl.store(ctrl_ptr + 1, pmask | (tl.full([], 255, tl.int64) << SHIFT))
    tl.store(ctrl_ptr + 2, krem - above_d)
    tl.store(hist_ptr + bins, tl.zeros([256], tl.int32))


@triton.jit
def select_count_kernel(keys_ptr, N, ctrl_ptr, gt_ptr, eq_ptr, BLOCK: tl.constexpr):
    """Per block: how many keys are above the threshold, and how many equal it."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    t = tl.load(ctrl_ptr + 0).to(tl.uint32)
    tl.store(gt_ptr + pid, tl.sum((m & (u > t)).to(tl.int64), axis=0))
    tl.store(eq_ptr + pid, tl.sum((m & (u == t)).to(tl.int64), axis=0))


@triton.jit
def select_scan_kernel(ctrl_ptr, gt_ptr, eq_ptr, num_blocks, BLOCK: tl.constexpr):
    """One program: per block, the ties before it (into eq) and its output offset (into gt)."""
    need = tl.load(ctrl_ptr + 2)
    carry_eq = tl.zeros([], tl.int64)
    carry_out = tl.zeros([], tl.int64)
    for s0 in range(0, num_blocks, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < num_blocks
        g = tl.load(gt_ptr + o, mask=m, other=0)
        e = tl.load(eq_ptr + o, mask=m, other=0)
        eq_before = carry_eq + tl.cumsum(e, axis=0) - e
        take = tl.minimum(tl.maximum(need - eq_before, 0), e)
        out_c = g + take
        out_before = carry_out + tl.cumsum(out_c, axis=0) - out_c
        tl.store(eq_ptr + o, eq_before, mask=m)
        tl.store(gt_ptr + o, out_before, mask=m)
        carry_eq += tl.sum(e, axis=0)
        carry_out += tl.sum(out_c, axis=0)


@triton.jit
def select_write_kernel(keys_ptr, N, ctrl_ptr, eqb_ptr, outb_ptr, out_idx_ptr, out_key_ptr,
                        BLOCK: tl.constexpr):
    """Compact the selected keys in index order: their indices and sortable keys (int64)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    t = tl.load(ctrl_ptr + 0).to(tl.uint32)
    need = tl.load(ctrl_ptr + 2)
    is_gt = m & (u > t)
    is_eq = (m & (u == t)).to(tl.int64)
    eq_rank = tl.load(eqb_ptr + pid) + tl.cumsum(is_eq, axis=0) - is_eq
    take = is_gt | ((is_eq != 0) & (eq_rank < need))
    take64 = take.to(tl.int64)
    pos = tl.load(outb_ptr + pid) + tl.cumsum(take64, axis=0) - take64
    tl.store(out_idx_ptr + pos, offs.to(tl.int64), mask=take)
    tl.store(out_key_ptr + pos, u.to(tl.int64), mask=take)


@triton.jit
def batch_topk_kernel(keys_ptr, B, k, out_ptr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """In-batch top-k by ranking: each row counts the rows that beat it (a larger key, or an
    equal key at a lower index) and, if its rank is below k, writes its index at its rank."""
    ri = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = ri < B
    ui = _sortable(tl.load(keys_ptr + ri, mask=mi, other=0.0))
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, B, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        mj = rj < B
        uj = _sortable(tl.load(keys_ptr + rj, mask=mj, other=0.0))
        beats = (uj[None, :] > ui[:, None]) | ((uj[None, :] == ui[:, None]) & (rj[None, :] < ri[:, None]))
        rank += tl.sum((beats & mj[None, :]).to(tl.int32), axis=1)
    tl.store(out_ptr + rank, ri.to(tl.int64), mask=mi & (rank < k))
