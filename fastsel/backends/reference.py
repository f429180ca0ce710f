"""The reference backend: pure, vectorised PyTorch. The oracle every other backend meets.

No Python loop over samples or rows, no host synchronisation in ``step`` unless strict
mode asks for an immediate range check.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .. import rng
from ..config import LossConfig
from ..state import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,
                     STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE, SampleState)
from ..checks import raise_for_errors


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss for the state, weighted loss for the reduction, class weight, p_true).

    The state's loss is the cross-entropy with label smoothing and without class weights;
    the weighted loss and its class weight follow ``F.cross_entropy`` exactly. Labels must
    already be in range (masked rows carry label 0).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    p_true = torch.exp(-nll.detach())
    eps = float(cfg.label_smoothing)
    w = cfg.class_weight
    if w is None:
        loss = nll if eps == 0.0 else (1.0 - eps) * nll - eps * logp.mean(dim=1)
        return loss, loss, torch.ones_like(nll), p_true
    wf = w.float()
    w_y = wf[labels]
    loss = nll if eps == 0.0 else (1.0 - eps) * nll - eps * logp.mean(dim=1)
    weighted = w_y * nll
    if eps != 0.0:
        weighted = (1.0 - eps) * weighted - eps * (logp * wf).sum(dim=1) / logp.shape[1]
    return loss, weighted, w_y, p_true


def row_masks(labels: torch.Tensor, indices: torch.Tensor, n: int, num_classes: int,
              ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows that take part, rows with a bad index, rows with a bad label)."""
    bad_index = (indices < 0) | (indices >= n)
    not_ignored = labels != ignore_index
    bad_label = not_ignored & ((labels < 0) | (labels >= num_classes))
    active = not_ignored & ~bad_label & ~bad_index
    return active, bad_index, bad_label


def first_flagged(values: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The value at the first flagged row, as a 0-d int64 tensor (no host sync: indexing
    with a 0-d tensor would call ``.item()``)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=values.device)
    pos = torch.argmax(bad.to(torch.int8)).reshape(1)
    return values.to(torch.int64).index_select(0, pos).reshape(())


def record_errors(state: SampleState, values: torch.Tensor, bad: torch.Tensor,
                  count_slot: int, value_slot: int) -> None:
    """Count bad rows and keep one offending value, on the device, without a sync."""
    cnt = bad.sum()
    first = first_flagged(values, bad)
    had_none = state.errors[count_slot] == 0
    state.errors[value_slot] = torch.where(had_none & (cnt > 0), first, state.errors[value_slot])
    state.errors[count_slot] += cnt


def merge_duplicates(idx: torch.Tensor, obs: torch.Tensor, n: int, values: Tuple[torch.Tensor, ...]
                     ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Group the observed rows by sample index, summing ``values`` per group in float64.

    Returns (target index per group, count per group, summed values per group); groups are
    padded to the batch size and unused ones target the scratch slot ``n`` with count 0.
    Float64 sums of a few float32 values are exact in practice, so the result does not
    depend on the order in which a backend adds duplicates.
    """
    b = idx.shape[0]
    key = torch.where(obs, idx.to(torch.int64), torch.full_like(idx, n, dtype=torch.int64))
    sorted_key, perm = torch.sort(key, stable=True)
    start = torch.ones(b, dtype=torch.bool, device=idx.device)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    group = torch.cumsum(start.to(torch.int64), 0) - 1
    target = torch.full((b,), n, dtype=torch.int64, device=idx.device)
    target.scatter_(0, group, sorted_key)
    obs_sorted = obs[perm].to(torch.float64)
    count = torch.zeros(b, dtype=torch.float64, device=idx.device).index_add_(0, group, obs_sorted)
    sums = tuple(
        torch.zeros(b, dtype=torch.float64, device=idx.device).index_add_(
            0, group, torch.where(obs[perm], v[perm].double(), torch.zeros((), dtype=torch.float64,
                                                                            device=idx.device)))
        for v in values)
    target = torch.where(count > 0, target, torch.full_like(target, n))
    return target, count, sums


def update_state(state: SampleState, indices: torch.Tensor, loss: torch.Tensor,
                 p_true: torch.Tensor, obs: torch.Tensor, epoch: int, ema: float) -> None:
    """Fold one batch of observations into the per-sample state.

    Duplicates of a sample in one batch are one observation of their mean loss and mean
    p_true (the same weights saw them all); ``seen`` counts every occurrence.
    """
    target, count, (sum_l, sum_p) = merge_duplicates(indices, obs, state.n, (loss, p_true))
    safe = torch.clamp(count, min=1.0)
    obs_l = (sum_l / safe).to(torch.float32)
    obs_p = (sum_p / safe).to(torch.float32)
    buf = state.buffers()
    m_old = buf["loss"][target]
    v_old = buf["loss_var"][target]
    p_old = buf["p_true"][target]
    s_old = buf["seen"][target]
    first = s_old == 0
    a = float(ema)
    delta = obs_l - m_old
    m_new = torch.where(first, obs_l, m_old + a * delta)
    v_new = torch.where(first, torch.zeros_like(v_old), (1.0 - a) * (v_old + a * delta * delta))
    cnt32 = count.to(torch.int32)
    s_new = s_old + cnt32
    p_new = p_old + (obs_p - p_old) * (count / torch.clamp(s_new.double(), min=1.0)).float()
    buf["loss"].index_copy_(0, target, m_new)
    buf["loss_var"].index_copy_(0, target, v_new)
    buf["p_true"].index_copy_(0, target, p_new)
    buf["seen"].index_copy_(0, target, s_new)
    buf["last_epoch"].index_fill_(0, target, int(epoch))
    # The scratch slot absorbed the padding groups; keep it neutral.
    for f, v in (("loss", 0.0), ("loss_var", 0.0), ("p_true", 0.0), ("seen", 0), ("last_epoch", -1)):
        buf[f][state.n] = v
    state.stats[STAT_EPOCH_LOSS] += sum_l.sum()
    state.stats[STAT_EPOCH_COUNT] += count.sum()


def _reduce(per_row: torch.Tensor, active: torch.Tensor, w_y: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / torch.where(active, w_y, torch.zeros_like(w_y)).sum()


def _check_or_record(state: SampleState, labels: torch.Tensor, indices: torch.Tensor,
                     bad_index: torch.Tensor, bad_label: torch.Tensor, strict: bool, c: int) -> None:
    if strict:
        errs = torch.stack([bad_index.sum(), first_flagged(indices, bad_index),
                            bad_label.sum(), first_flagged(labels, bad_label)])
        if bool((errs[0] + errs[2]) > 0):
            raise_for_errors(errs.cpu(), state.n, c)
    else:
        record_errors(state, indices, bad_index, ERR_INDEX_COUNT, ERR_INDEX_VALUE)
        record_errors(state, labels, bad_label, ERR_LABEL_COUNT, ERR_LABEL_VALUE)


def _prepare(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refuse or record bad rows; return (active rows, safe labels, safe indices) where a
    masked row has label 0 and targets the scratch slot."""
    n, c = state.n, logits.shape[1]
    active, bad_index, bad_label = row_masks(labels, indices, n, c, cfg.ignore_index)
    _check_or_record(state, labels, indices, bad_index, bad_label, cfg.strict, c)
    safe_labels = torch.where(active, labels, torch.zeros_like(labels)).to(torch.int64)
    safe_idx = torch.where(active, indices, torch.full_like(indices, n)).to(torch.int64)
    return active, safe_labels, safe_idx


def _weighted_rows(weighted: torch.Tensor, active: torch.Tensor, safe_idx: torch.Tensor,
                   state: SampleState) -> torch.Tensor:
    """Each active row's loss times its policy weight; 0 for masked rows."""
    zero = torch.zeros((), dtype=torch.float32, device=weighted.device)
    return torch.where(active, state.buffers()["weight"][safe_idx] * weighted, zero)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                  state: SampleState, cfg: LossConfig) -> torch.Tensor:
    """The step's returned loss (policy weights applied) without touching the per-sample
    state; bad values are refused or recorded as in ``step``."""
    active, safe_labels, safe_idx = _prepare(logits, labels, indices, state, cfg)
    _, weighted, w_y, _ = per_sample_loss(logits, safe_labels, cfg)
    return _reduce(_weighted_rows(weighted, active, safe_idx, state), active, w_y, cfg.reduction)


class ReferenceBackend:
    """Pure-PyTorch fused step and selection; runs on any device torch supports."""

    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu")

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             state: SampleState, cfg: LossConfig, epoch: int) -> torch.Tensor:
        active, safe_labels, safe_idx = _prepare(logits, labels, indices, state, cfg)
        loss, weighted, w_y, p_true = per_sample_loss(logits, safe_labels, cfg)
        per_row = _weighted_rows(weighted, active, safe_idx, state)
        with torch.no_grad():
            det = loss.detach()
            finite = torch.isfinite(det)
            state.stats[STAT_NONFINITE] += (active & ~finite).sum()
            update_state(state, safe_idx, det, p_true, active & finite, epoch, cfg.ema)
        return _reduce(per_row, active, w_y, cfg.reduction)

    def uniform(self, idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
        return rng.uniform(idx, key, stream)

    def select(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest keys, in rank order: +inf > finite > -inf > NaN, and
        equal keys (-0 == +0) go to the lower index."""
        keys = keys.float()
        nan = torch.isnan(keys)
        order = torch.sort(torch.where(nan, torch.full_like(keys, float("-inf")), keys),
                           descending=True, stable=True).indices
        # A second stable sort moves NaN behind -inf and keeps every other order.
        order = order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]
        return order[:k]

    def shuffle(self, chosen: torch.Tensor, key: int) -> torch.Tensor:
        """A counter-based permutation of ``chosen``: the same on every device and rank."""
        u = rng.uniform(chosen, key, rng.STREAM_SHUFFLE)
        return chosen[torch.sort(u, stable=True).indices]
