"""Which rows count (``fastsel.ops``), on the device, inside the step's two launches: the
rows kernels' room and membership checks (``_admit``) and the row counters the merge's last
program writes (``_count_call``), as ``fastsel.rows`` does in PyTorch.

With ``check`` (an update call given its epoch's ``member`` mask and ``rows`` counters) the
rows kernel reads ``rows[ROW_TRAINED]``, ``rows[ROW_SHARD]`` (``_refused``: the whole call
is refused for room) and ``member[idx]`` (stray rows), leaves those rows out (no loss, no
gradient, not in the mean's divisor, not folded) and flags the stray ones; the merge's last
program counts them, or the refused call, in the ``ROW_*`` slots, and an admitted call's
rows and call. Nothing writes ``rows`` between the two reads of the room check (the rows
kernel's and the last program's), so both see the same figures. Strict mode checks on the
host before any launch (``fastsel.backends.triton``), so the kernels never refuse a row there.

The slots of ``rows`` come from ``fastsel.layout`` (module-level constexprs).
"""
import triton
import triton.language as tl

from fastsel import layout

# Slots of the epoch's int64 row counters (fastsel.rows), defined in fastsel.layout.
ROW_TRAINED = tl.constexpr(layout.ROW_TRAINED)
ROW_SHARD = tl.constexpr(layout.ROW_SHARD)
ROW_CALLS = tl.constexpr(layout.ROW_CALLS)
ROW_STRAY_COUNT = tl.constexpr(layout.ROW_STRAY_COUNT)
ROW_STRAY_VALUE = tl.constexpr(layout.ROW_STRAY_VALUE)
ROW_OVER_COUNT = tl.constexpr(layout.ROW_OVER_COUNT)
ROW_OVER_VALUE = tl.constexpr(layout.ROW_OVER_VALUE)
ROW_OVER_EPOCH = tl.constexpr(layout.ROW_OVER_EPOCH)


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
