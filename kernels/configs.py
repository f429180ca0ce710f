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
#: Pairwise duplicate merge of the state update: rows owned per program x rows per sweep tile.
STATE_BLOCK_I, STATE_BLOCK_J, STATE_WARPS = 32, 128, 4
#: Elements per program of the selection passes, and the block of the per-block scan.
SELECT_BLOCK, SELECT_WARPS, SCAN_BLOCK = 4096, 8, 1024
#: Radix select: 8-bit digits of the 32-bit sortable key, most significant first.
RADIX_SHIFTS = (24, 16, 8, 0)
#: In-batch top-k by pairwise ranking: rows ranked per program x rows per sweep tile.
TOPK_BLOCK_I, TOPK_BLOCK_J, TOPK_WARPS = 64, 128, 8
BATCH_TOPK_MAX = 8192
NOISE_BLOCK = 1024
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


def state_blocks(b: int, interpret: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps) of the state update's pairwise duplicate merge."""
    if interpret:
        bj = min(1024, next_pow2(b))
        return min(256, bj), bj, 4
    return STATE_BLOCK_I, STATE_BLOCK_J, STATE_WARPS


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
    out.append(dict(kernel="state_update_kernel", num_warps=STATE_WARPS,
                    options=dict(enable_fp_fusion=False),  # the reference's roundings
                    constexprs=dict(BLOCK_I=STATE_BLOCK_I, BLOCK_J=STATE_BLOCK_J)))
    for shift in RADIX_SHIFTS:
        out.append(dict(kernel="radix_hist_kernel", num_warps=SELECT_WARPS,
                        constexprs=dict(SHIFT=shift, BLOCK=SELECT_BLOCK)))
        out.append(dict(kernel="radix_pick_kernel", num_warps=4, constexprs=dict(SHIFT=shift)))
    out.append(dict(kernel="select_count_kernel", num_warps=SELECT_WARPS,
                    constexprs=dict(BLOCK=SELECT_BLOCK)))
    out.append(dict(kernel="select_scan_kernel", num_warps=4, constexprs=dict(BLOCK=SCAN_BLOCK)))
    out.append(dict(kernel="select_write_kernel", num_warps=SELECT_WARPS,
                    constexprs=dict(BLOCK=SELECT_BLOCK)))
    out.append(dict(kernel="batch_topk_kernel", num_warps=TOPK_WARPS,
                    constexprs=dict(BLOCK_I=TOPK_BLOCK_I, BLOCK_J=TOPK_BLOCK_J)))
    out.append(dict(kernel="uniform_kernel", num_warps=4, constexprs=dict(BLOCK=NOISE_BLOCK)))
    return out
