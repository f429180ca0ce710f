"""The selection pass: keep the k largest of N float32 keys, ties to the lower index, NaN last.

Triton has no global top-k, so it is a threshold select on a 32-bit order-preserving
image of each key (``_sortable``), computed on the fly and never stored. The image follows
the reference's order exactly: +inf > finite > -inf > NaN, -0 ties with +0.

Four launches, no host sync, no single-program launch, no sort:

1. ``radix_first_kernel``: a histogram of the top 11 bits of every key; the program that
   takes the last ticket picks the bucket holding the k-th largest key (2048 bins) and the
   count still to take inside it;
2. ``radix_filter_kernel``: over every key again, the keys of that bucket are buffered as
   candidates (their indices) and histogrammed by the next 11 bits; the last program picks;
3. ``radix_cand_kernel``: over the candidates only (a grid-stride loop: their number is on
   the device), the last 10 bits: the k-th largest key T and how many keys equal to T are
   taken;
4. ``select_compact_kernel``: one order-preserving compaction (decoupled look-back over
   per-block counts of keys above T and equal to T; block ids from a ticket so a block
   only waits on blocks that started): the keys above T and the first keys equal to T in
   index order, so ties go to the lower index without another pass.

The winners come out in index order with their 32-bit keys; the launcher's stable sort by
key gives the rank order the ``select`` op promises. Every counter and histogram is left at
zero by the last program of its launch, so the scratch needs no fill launch between calls.

``batch_topk_kernel`` is the in-batch top-k (B <= 8192): every key's exact rank by
pairwise comparison (B^2 compares spread over B/64 programs, no sort, no atomics). A
bitonic ``tl.sort`` runs in a single program and took ~20 s for 8192 keys under the
interpreter, so it was dropped (not measured on a GPU).
"""
import triton
import triton.language as tl

# Slots of the int64 ``ctrl`` scratch.
C_PREFIX = tl.constexpr(0)   # the digits picked so far; after the last pass the threshold T
C_KREM = tl.constexpr(1)     # keys still to take inside the current bucket
C_CAND = tl.constexpr(2)     # candidates buffered by radix_filter_kernel
C_TICKET = tl.constexpr(3)   # tickets of the passes (the last program picks)
C_BID = tl.constexpr(4)      # block ids of the compaction
C_DONE = tl.constexpr(5)     # compaction blocks finished
NBINS = tl.constexpr(2048)
# Look-back status words: a block's counts (gt << 30 | eq, 30 bits each) and a flag.
ST_AGG = tl.constexpr(1 << 60)   # this block's own counts
ST_INC = tl.constexpr(1 << 61)   # the counts of this block and of every block before it
ST_PAY = tl.constexpr((1 << 60) - 1)
EQ_MASK = tl.constexpr((1 << 30) - 1)


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
def _pass_done(ctrl_ptr, hist_ptr, k, SHIFT: tl.constexpr, FIRST: tl.constexpr,
               LAST: tl.constexpr):
    """End of a histogram pass: the program that takes the last ticket reads and clears the
    global histogram, picks the digit at SHIFT holding the k-th largest key, and updates
    the prefix and the count still to take (``k`` on the first pass); after the last pass
    it clears the candidate count."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ctrl_ptr + C_TICKET, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.store(ctrl_ptr + C_TICKET, 0)
        bins = tl.arange(0, NBINS)
        h = tl.atomic_xchg(hist_ptr + bins, tl.zeros([NBINS], tl.int32), sem="relaxed")
        h = h.to(tl.int64)
        if FIRST:
            krem = tl.zeros([], tl.int64) + k
            prefix = tl.zeros([], tl.int64)
        else:
            krem = tl.load(ctrl_ptr + C_KREM)
            prefix = tl.load(ctrl_ptr + C_PREFIX)
        at_or_above = tl.cumsum(h, axis=0, reverse=True)
        above = at_or_above - h
        hit = (above < krem) & (krem <= at_or_above)
        digit = tl.max(tl.where(hit, bins, -1), axis=0)
        above_d = tl.sum(tl.where(bins == digit, above, 0), axis=0)
        tl.store(ctrl_ptr + C_PREFIX, prefix | (digit.to(tl.int64) << SHIFT))
        tl.store(ctrl_ptr + C_KREM, krem - above_d)
        if LAST:
            tl.store(ctrl_ptr + C_CAND, 0)


@triton.jit
def _add_hist(hist_ptr, h):
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist_ptr + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def radix_first_kernel(keys_ptr, N, k, ctrl_ptr, hist_ptr, BLOCK: tl.constexpr):
    """Pass 1: histogram of bits 31..21 of every key; the last program picks the bucket."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    _add_hist(hist_ptr, tl.histogram((u >> 21).to(tl.int32), NBINS, mask=m))
    _pass_done(ctrl_ptr, hist_ptr, k, 21, True, False)


@triton.jit
def radix_filter_kernel(keys_ptr, N, ctrl_ptr, hist_ptr, cand_ptr, BLOCK: tl.constexpr):
    """Pass 2: the keys of the picked bucket become candidates (their indices, appended per
    program) and are histogrammed by bits 20..10; the last program picks."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    top = (tl.load(ctrl_ptr + C_PREFIX) >> 21).to(tl.uint32)
    inb = m & ((u >> 21) == top)
    _add_hist(hist_ptr, tl.histogram(((u >> 10) & 2047).to(tl.int32), NBINS, mask=inb))
    one = inb.to(tl.int32)
    base = tl.atomic_add(ctrl_ptr + C_CAND, tl.sum(one, axis=0).to(tl.int64), sem="relaxed")
    pos = base + (tl.cumsum(one, axis=0) - one).to(tl.int64)
    tl.store(cand_ptr + pos, offs, mask=inb)
    _pass_done(ctrl_ptr, hist_ptr, 0, 10, False, False)


@triton.jit
def radix_cand_kernel(keys_ptr, ctrl_ptr, hist_ptr, cand_ptr, BLOCK: tl.constexpr):
    """Pass 3, over the candidates only: histogram of bits 9..0 of those matching the
    22-bit prefix; the last program picks the threshold T and clears the candidate count."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ncand = tl.load(ctrl_ptr + C_CAND).to(tl.int32)
    top = (tl.load(ctrl_ptr + C_PREFIX) >> 10).to(tl.uint32)
    h = tl.zeros([NBINS], tl.int32)
    for s0 in range(pid * BLOCK, ncand, nprog * BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < ncand
        i = tl.load(cand_ptr + o, mask=m, other=0)
        u = _sortable(tl.load(keys_ptr + i, mask=m, other=0.0))
        h += tl.histogram((u & 1023).to(tl.int32), NBINS, mask=m & ((u >> 10) == top))
    _add_hist(hist_ptr, h)
    _pass_done(ctrl_ptr, hist_ptr, 0, 0, False, True)


@triton.jit
def select_compact_kernel(keys_ptr, N, ctrl_ptr, status_ptr, out_idx_ptr, out_key_ptr,
                          BLOCK: tl.constexpr):
    """The keys above T and the first ``need`` keys equal to T, in index order: each block
    publishes its counts, adds those of the blocks before it by decoupled look-back, and
    writes its winners' indices (int64) and order-preserving int32 keys at their final
    positions. The last block to finish clears the statuses and the counters."""
    bid = tl.atomic_add(ctrl_ptr + C_BID, 1, sem="relaxed")
    offs = bid.to(tl.int32) * BLOCK + tl.arange(0, BLOCK)   # N < 2**30: int32 positions
    m = offs < N
    u = _sortable(tl.load(keys_ptr + offs, mask=m, other=0.0))
    t = tl.load(ctrl_ptr + C_PREFIX).to(tl.uint32)
    need = tl.load(ctrl_ptr + C_KREM).to(tl.int32)
    is_gt = (m & (u > t)).to(tl.int32)
    is_eq = (m & (u == t)).to(tl.int32)
    own = (tl.sum(is_gt, axis=0).to(tl.int64) << 30) | tl.sum(is_eq, axis=0).to(tl.int64)
    tl.atomic_xchg(status_ptr + bid, tl.where(bid == 0, ST_INC, ST_AGG) | own, sem="release")
    excl = bid * 0
    j = bid - 1
    going = bid > 0
    while going:
        s = tl.atomic_add(status_ptr + j, bid * 0, sem="acquire")
        flag = s >> 60
        excl += (flag != 0).to(tl.int64) * (s & ST_PAY)
        going = flag != 2
        j -= (flag == 1).to(tl.int64)
    tl.atomic_xchg(status_ptr + bid, (excl + own) | ST_INC, mask=bid > 0, sem="release")
    gt_before = (excl >> 30).to(tl.int32)
    eq_before = (excl & EQ_MASK).to(tl.int32)
    eq_rank = eq_before + tl.cumsum(is_eq, axis=0) - is_eq
    take = ((is_gt != 0) | ((is_eq != 0) & (eq_rank < need))).to(tl.int32)
    pos = gt_before + tl.minimum(eq_before, need) + tl.cumsum(take, axis=0) - take
    tl.store(out_idx_ptr + pos, offs.to(tl.int64), mask=take != 0)
    tl.store(out_key_ptr + pos, (u ^ 0x80000000).to(tl.int32, bitcast=True), mask=take != 0)
    tl.debug_barrier()
    nprog = tl.num_programs(0)
    done = tl.atomic_add(ctrl_ptr + C_DONE, 1, sem="acq_rel")
    if done == nprog - 1:
        for q0 in range(0, nprog, BLOCK):
            q = q0 + tl.arange(0, BLOCK)
            tl.store(status_ptr + q, tl.zeros([BLOCK], tl.int64), mask=q < nprog)
        tl.store(ctrl_ptr + C_PREFIX, 0)
        tl.store(ctrl_ptr + C_KREM, 0)
        tl.store(ctrl_ptr + C_BID, 0)
        tl.store(ctrl_ptr + C_DONE, 0)


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
