"""Block sizes the Triton launcher may choose, shared by the launcher and the AOT build.

Pure Python (no Triton import), so the AOT build and its tests compile exactly the
configurations the launcher can launch on a GPU. Under ``TRITON_INTERPRET=1`` the launcher
uses larger tiles (``interpret=True``): the interpreter pays per program, not per element.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

#: Column chunk of the fused step; C above the largest chunk loops over chunks (online softmax).
STEP_BLOCK_C = (16, 32, 64, 128, 256, 512, 1024, 2048)
#: Elements per fused-step tile on a GPU (rows x column chunk).
STEP_TILE = 2048
STEP_MAX_ROWS = 64
#: Merge + update launch: rows per program (one lane per row, a grid over the rows), the
#: tile of the last program's sum over the per-program partials, warps.
MERGE_BLOCK, MERGE_PBLOCK, MERGE_WARPS = 256, 128, 4
#: float64 partials per program of the merge launch (``kernels/merge.py`` P_STRIDE).
MERGE_PARTIALS = 11
#: Radix threshold select: keys per program of the passes over the keys and of the
#: compaction, warps; programs of the pass over the candidates (a grid-stride loop, since
#: their number is only known on the device); 11-bit digits (2048 bins).
SELECT_BLOCK, SELECT_WARPS = 4096, 8
SELECT_CAND_PROGRAMS = 264
RADIX_BINS = 2048
#: The compaction packs two counts of at most 30 bits in one int64 status word.
SELECT_MAX_N = (1 << 30) - 1
#: In-batch top-k by pairwise ranking: rows ranked per program x rows per sweep tile.
TOPK_BLOCK_I, TOPK_BLOCK_J, TOPK_WARPS = 64, 128, 8
BATCH_TOPK_MAX = 8192
NOISE_BLOCK = 1024
#: Elements per program of the one-launch backward scaling.
SCALE_BLOCK, SCALE_WARPS = 2048, 4
#: Rows per program of observe's per-row kernel.
OBSERVE_BLOCK, OBSERVE_WARPS = 1024, 4


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def step_blocks(c: int, b: int = 1, interpret: bool = False) -> Tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_C, SINGLE, num_warps) of the fused step for C classes and B rows.

    Small C packs many rows per program (launch-latency bound steps); large C takes one row
    per program and loops over column chunks.
    """
    bc = min(max(next_pow2(c), STEP_BLOCK_C[0]), STEP_BLOCK_C[-1])
    if interpret:
        br = max(1, min(next_pow2(b), 65536 // bc))
        return br, bc, c <= bc, 4
    br = max(1, min(STEP_MAX_ROWS, STEP_TILE // bc))
    warps = 4 if br * bc <= 1024 else 8
    return br, bc, c <= bc, warps


def merge_blocks(b: int, interpret: bool = False) -> Tuple[int, int, int]:
    """(BLOCK, PBLOCK, num_warps) of the merge + update launch over B rows."""
    if interpret:
        return max(16, min(1024, next_pow2(b))), 16, 4
    return MERGE_BLOCK, MERGE_PBLOCK, MERGE_WARPS


def scale_blocks(interpret: bool = False) -> Tuple[int, int]:
    """(BLOCK, num_warps) of the one-launch backward scaling."""
    if interpret:
        return 1 << 16, 4
    return SCALE_BLOCK, SCALE_WARPS


def select_blocks(interpret: bool = False) -> Tuple[int, int, int]:
    """(BLOCK, num_warps, candidate programs) of the radix threshold select."""
    if interpret:
        return 16384, 4, 4
    return SELECT_BLOCK, SELECT_WARPS, SELECT_CAND_PROGRAMS


def observe_blocks(b: int, interpret: bool = False) -> Tuple[int, int]:
    """(BLOCK, num_warps) of observe's per-row kernel."""
    if interpret:
        return max(16, min(65536, next_pow2(b))), 4
    return OBSERVE_BLOCK, OBSERVE_WARPS


def topk_blocks(b: int, interpret: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps) of the in-batch top-k."""
    if interpret:
        bj = min(1024, next_pow2(b))
        return min(256, bj), bj, 4
    return TOPK_BLOCK_I, TOPK_BLOCK_J, TOPK_WARPS


def gpu_configs() -> List[Dict]:
    """Every (kernel, constexprs, num_warps) the launcher can launch on a GPU, for the AOT build.

    Flag constexprs of the fused step (class weights, smoothing, gradient) are compiled in
    their heaviest setting at every block size and logits dtype, and every setting for one
    single-chunk and one multi-chunk block; int32 labels/indices once (``index``). observe's
    per-row kernel at each loss dtype (``dtype``: losses and probs), with and without probs.
    """
    out: List[Dict] = []
    for bc in STEP_BLOCK_C:
        br, _, _, warps = step_blocks(bc)
        singles = (True, False) if bc == STEP_BLOCK_C[-1] else (True,)
        for single in singles:
            for dt in ("fp32", "bf16", "fp16"):
                out.append(dict(kernel="ce_step_kernel", dtype=dt, num_warps=warps,
                                constexprs=dict(HAS_CW=True, SMOOTH=True, WRITE_GRAD=True,
                                                BLOCK_R=br, BLOCK_C=bc, SINGLE=single)))
    for c in (128, 4096):  # one row chunk, and the loop over column chunks
        br, bc, single, warps = step_blocks(c)
        for cw in (False, True):
            for sm in (False, True):
                for wg in (False, True):
                    if cw and sm and wg:
                        continue
                    out.append(dict(kernel="ce_step_kernel", dtype="fp32", num_warps=warps,
                                    constexprs=dict(HAS_CW=cw, SMOOTH=sm, WRITE_GRAD=wg,
                                                    BLOCK_R=br, BLOCK_C=bc, SINGLE=single)))
    br, bc, single, warps = step_blocks(128)
    out.append(dict(kernel="ce_step_kernel", dtype="fp32", index="i32", num_warps=warps,
                    constexprs=dict(HAS_CW=False, SMOOTH=False, WRITE_GRAD=True,
                                    BLOCK_R=br, BLOCK_C=bc, SINGLE=single)))
    for dt, has_probs in (("fp32", False), ("fp32", True), ("bf16", True), ("fp16", True),
                          ("fp64", True)):
        out.append(dict(kernel="observe_rows_kernel", dtype=dt, num_warps=OBSERVE_WARPS,
                        constexprs=dict(HAS_PROBS=has_probs, BLOCK=OBSERVE_BLOCK)))
    out.append(dict(kernel="observe_rows_kernel", dtype="fp32", index="i32",
                    num_warps=OBSERVE_WARPS, constexprs=dict(HAS_PROBS=False, BLOCK=OBSERVE_BLOCK)))
    out.append(dict(kernel="merge_update_kernel", num_warps=MERGE_WARPS,
                    options=dict(enable_fp_fusion=False),  # the reference's roundings
                    constexprs=dict(BLOCK=MERGE_BLOCK, PBLOCK=MERGE_PBLOCK)))
    for dt in ("fp32", "bf16", "fp16"):
        for per_row in (False, True):
            out.append(dict(kernel="scale_grad_kernel", dtype=dt, num_warps=SCALE_WARPS,
                            constexprs=dict(PER_ROW=per_row, BLOCK=SCALE_BLOCK)))
    for kernel in ("radix_first_kernel", "radix_filter_kernel", "radix_cand_kernel",
                   "select_compact_kernel"):
        out.append(dict(kernel=kernel, num_warps=SELECT_WARPS,
                        constexprs=dict(BLOCK=SELECT_BLOCK)))
    out.append(dict(kernel="batch_topk_kernel", num_warps=TOPK_WARPS,
                    constexprs=dict(BLOCK_I=TOPK_BLOCK_I, BLOCK_J=TOPK_BLOCK_J)))
    out.append(dict(kernel="uniform_kernel", num_warps=4, constexprs=dict(BLOCK=NOISE_BLOCK)))
    return out
