"""The reference implementation of the op family: pure, vectorised PyTorch, any device.

It is the oracle every other implementation meets, and it runs the target forms and ops an
implementation has no kernel for. No Python loop over samples or rows, no host
synchronisation unless strict mode asks for an immediate range check. The semantics of
every op are in ``fastsel.ops`` and in docs/loss.md.
"""
from __future__ import annotations

import math
import struct
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import layout, ops, rng
from ..validation.tensors import check_ce_step_call, check_observe_call, raise_for_errors
from ..rows import admit_rows, commit_rows, first_flagged
from .base import Backend

#: The per-sample state as the ops take it: the STEP_FIELDS buffers, weight, stats, errors.
StateTensors = Tuple[torch.Tensor, ...]

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




def check_or_record(errors: torch.Tensor, n: int, c: Optional[int], indices: torch.Tensor,
                    bad_index: torch.Tensor, labels: Optional[torch.Tensor],
                    bad_label: Optional[torch.Tensor], strict: bool) -> None:
    """Strict: raise ``raise_for_errors``'s IndexError if any row is bad (nothing written).
    Otherwise count the bad rows and keep the first offending value of each kind, on the
    device, without a sync."""
    if labels is None:
        labels, bad_label = indices, torch.zeros_like(bad_index)
    found = torch.stack([bad_index.sum(), first_flagged(indices, bad_index),
                         bad_label.sum(), first_flagged(labels, bad_label)])
    if strict:
        if bool((found[layout.ERR_INDEX_COUNT] + found[layout.ERR_LABEL_COUNT]) > 0):
            raise_for_errors(found.cpu(), n, c)
        return
    for cnt, val in ((layout.ERR_INDEX_COUNT, layout.ERR_INDEX_VALUE),
                     (layout.ERR_LABEL_COUNT, layout.ERR_LABEL_VALUE)):
        had_none = errors[cnt] == 0
        errors[val] = torch.where(had_none & (found[cnt] > 0), found[val], errors[val])
        errors[cnt] += found[cnt]


def saturate(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, a finite value beyond float32's range clamped to +-STATE_MAX
    instead of rounding to inf; NaN and +-inf stay as they are."""
    if x.dtype != torch.float64:  # float32, float16 and bfloat16 values fit float32
        return x.to(torch.float32)
    big = layout.STATE_MAX
    return torch.where(torch.isfinite(x), x.clamp(-big, big), x).to(torch.float32)


def _ema_pair(ema: float) -> Tuple[float, float]:
    """(float32(ema), float32(1 - ema)) as Python floats: the fold's weights on every backend."""
    a, b = struct.unpack("2f", struct.pack("2f", float(ema), 1.0 - float(ema)))
    return a, b


def update_state(state: StateTensors, indices: torch.Tensor, loss: torch.Tensor,
                 p_true: torch.Tensor, obs: torch.Tensor, epoch: torch.Tensor, ema: float) -> None:
    """Fold one batch of per-row observations into the state (rows with ``obs`` false and
    rows targeting the scratch slot are left out).

    Duplicates of a sample in one batch are one observation of their mean loss and mean
    p_true (the same weights saw them all); ``seen`` counts every occurrence.
    """
    s_loss, s_var, s_p, s_seen, s_last, _, stats, _ = state
    n = s_loss.shape[0] - 1
    target, count, (sum_l, sum_p) = merge_duplicates(indices, obs, n, (loss, p_true))
    safe = torch.clamp(count, min=1.0)
    # The observation in float32, then the fold in float64, each result saturated at
    # +-STATE_MAX when stored (fastsel/state.py: finite in, finite state).
    obs_l = (sum_l / safe).to(torch.float32).double()
    obs_p = (sum_p / safe).to(torch.float32).double()
    m_old, v_old = s_loss[target].double(), s_var[target].double()
    p_old, s_old = s_p[target].double(), s_seen[target]
    first = s_old == 0
    a, b = _ema_pair(ema)
    delta = obs_l - m_old
    m_new = torch.where(first, obs_l, m_old + a * delta)
    v_new = torch.where(first, torch.zeros_like(v_old), b * (v_old + a * delta * delta))
    s_new = s_old + count.to(torch.int32)
    p_new = p_old + (obs_p - p_old) * (count / torch.clamp(s_new.double(), min=1.0))
    m_new, v_new, p_new = (saturate(v) for v in (m_new, v_new, p_new))
    s_loss.index_copy_(0, target, m_new)
    s_var.index_copy_(0, target, v_new)
    s_p.index_copy_(0, target, p_new)
    s_seen.index_copy_(0, target, s_new)
    s_last.index_fill_(0, target, epoch.to(device=s_last.device, dtype=s_last.dtype))
    # The scratch slot absorbed the padding groups; keep it neutral.
    for buf, v in ((s_loss, 0.0), (s_var, 0.0), (s_p, 0.0), (s_seen, 0), (s_last, -1)):
        buf[n] = v
    stats[layout.STAT_EPOCH_LOSS] += sum_l.sum()
    stats[layout.STAT_EPOCH_COUNT] += count.sum()


def observe_rows(state: StateTensors, safe_idx: torch.Tensor, loss: torch.Tensor,
                 p_true: torch.Tensor, active: torch.Tensor, epoch: torch.Tensor, ema: float) -> None:
    """Active rows with a finite loss and p_true enter the state; the others are counted."""
    finite = torch.isfinite(loss) & torch.isfinite(p_true)
    state[6][layout.STAT_NONFINITE] += (active & ~finite).sum()
    update_state(state, safe_idx, loss, p_true, active & finite, epoch, ema)


def _smoothed_targets(logp: torch.Tensor, labels: Optional[torch.Tensor],
                      probs: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """t' = (1 - eps) t + eps / C per element, t the one-hot label or the given probabilities."""
    c = logp.shape[1]
    if probs is not None:
        return (1.0 - eps) * probs + eps / c
    t = torch.full_like(logp, eps / c)
    return t.scatter_add_(1, labels.unsqueeze(1), torch.full_like(logp[:, :1], 1.0 - eps))


def ce_step(logits: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor, errors: torch.Tensor,
            member: Optional[torch.Tensor], rows: Optional[torch.Tensor], epoch: torch.Tensor,
            class_weight: Optional[torch.Tensor], ignore_index: int, label_smoothing: float,
            ema: float, reduction: int, strict: bool, update: bool, need_grad: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastsel::ce_step_reference``: cross-entropy as ``F.cross_entropy`` over any target,
    policy weights applied, the analytic gradient, and each sample's observation."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    n = check_ce_step_call(logits, target, indices, state, member, rows, epoch, class_weight,
                           label_smoothing, ema, reduction)
    b, c = logits.shape[0], logits.shape[1]
    d = math.prod(logits.shape[2:])
    dev = logits.device
    soft = target.is_floating_point()
    # One row of C logits per element (b, position): [B * D, C].
    x = logits.float()
    flat = x.movedim(1, -1).reshape(-1, c) if logits.dim() > 2 else x
    bad_index = (indices < 0) | (indices >= n)
    left_out, bad_index, over = admit_rows(indices, bad_index, n, member, rows, epoch, strict, update)
    bad_index_e = (bad_index | left_out).repeat_interleave(d)
    if soft:
        probs = target.float()
        probs = probs.movedim(1, -1).reshape(-1, c) if logits.dim() > 2 else probs
        labels = bad_label = None
        active = ~bad_index_e
    else:
        probs = None
        labels = target.reshape(-1)
        not_ignored = labels != ignore_index
        bad_label = not_ignored & ((labels < 0) | (labels >= c))
        active = not_ignored & ~bad_label & ~bad_index_e
        bad_label = bad_label & ~over
    check_or_record(errors, n, None if soft else c, indices, bad_index, labels, bad_label, strict)
    commit_rows(rows, indices, left_out, over, epoch, update)
    safe_idx = torch.where(bad_index | left_out, torch.full_like(indices, n), indices).to(torch.int64)
    pw = s_weight[safe_idx].repeat_interleave(d)
    logp = F.log_softmax(flat, dim=1)
    eps = float(label_smoothing)
    w = None if class_weight is None else class_weight.float()
    tp = None  # the smoothed target distribution, built once when needed
    if soft:
        tp = _smoothed_targets(logp, None, probs, eps)
        loss = -(tp * logp).sum(dim=1)
        weighted = loss if w is None else -(w * tp * logp).sum(dim=1)
        p_true = (probs * logp.exp()).sum(dim=1)
        den = torch.ones_like(loss)
    else:
        y = torch.where(active, labels, torch.zeros_like(labels)).to(torch.int64)
        nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
        loss = nll if eps == 0.0 else (1.0 - eps) * nll - eps * logp.mean(dim=1)
        if w is None:
            weighted, den = loss, torch.ones_like(loss)
        else:
            den = w[y]
            weighted = den * nll
            if eps != 0.0:
                weighted = (1.0 - eps) * weighted - eps * (logp * w).sum(dim=1) / c
        p_true = torch.exp(-nll)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    per_elem = torch.where(active, pw * weighted, zero)
    scale = torch.ones((), dtype=torch.float32, device=dev)
    if reduction == layout.REDUCTION_NONE:
        out = per_elem.reshape((b,) + tuple(logits.shape[2:]))
    elif reduction == layout.REDUCTION_SUM:
        out = per_elem.sum()
    else:
        denom = torch.where(active, den, zero).sum()
        out = per_elem.sum() / denom
        scale = 1.0 / denom
    if need_grad:
        if tp is None:
            tp = _smoothed_targets(logp, y, None, eps)
        wt = tp if w is None else tp * w
        s = torch.where(active, pw * scale, zero)  # an all-masked mean: 0, not 0 * inf
        g = s.unsqueeze(1) * (wt.sum(dim=1, keepdim=True) * logp.exp() - wt)
        if logits.dim() > 2:
            g = g.reshape((b,) + tuple(logits.shape[2:]) + (c,)).movedim(-1, 1)
        grad = g.to(logits.dtype).contiguous()
    else:
        grad = logits.new_empty((0,))
    if update:
        if d == 1:
            obs_l, obs_p, obs = loss, p_true, active
        else:  # a sample's observation: the mean over its active elements, summed in float64
            act = active.view(b, d)
            cnt = act.sum(dim=1)
            zero64 = torch.zeros((), dtype=torch.float64, device=dev)
            per = cnt.clamp(min=1).double()
            obs_l = (torch.where(act, loss.view(b, d).double(), zero64).sum(1) / per).float()
            obs_p = (torch.where(act, p_true.view(b, d).double(), zero64).sum(1) / per).float()
            obs = cnt > 0
        observe_rows(state, safe_idx, obs_l, obs_p, obs, epoch, ema)
    return out, grad, torch.ones((), dtype=torch.float32, device=dev)


def observe(losses: torch.Tensor, probs: Optional[torch.Tensor], indices: torch.Tensor,
            s_loss: torch.Tensor, s_var: torch.Tensor, s_p: torch.Tensor, s_seen: torch.Tensor,
            s_last: torch.Tensor, s_weight: torch.Tensor, stats: torch.Tensor, errors: torch.Tensor,
            member: Optional[torch.Tensor], rows: Optional[torch.Tensor], epoch: torch.Tensor,
            ema: float, reduction: int, strict: bool, update: bool
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fastsel::observe_reference``: per-sample losses of any loss into the state; returns
    the policy-weighted reduction and its derivative per row."""
    state = (s_loss, s_var, s_p, s_seen, s_last, s_weight, stats, errors)
    n = check_observe_call(losses, probs, indices, state, member, rows, epoch, ema, reduction)
    bad_index = (indices < 0) | (indices >= n)
    left_out, bad_index, over = admit_rows(indices, bad_index, n, member, rows, epoch, strict, update)
    check_or_record(errors, n, None, indices, bad_index, None, None, strict)
    commit_rows(rows, indices, left_out, over, epoch, update)
    active = ~bad_index & ~left_out
    safe_idx = torch.where(active, indices, torch.full_like(indices, n)).to(torch.int64)
    loss = losses.float()
    # The observation saturates where float32 cannot hold a finite value (finite in, finite
    # state): a float64 loss or p_true beyond its range, exp(-loss) of a loss below -88.7.
    obs_loss = saturate(losses)
    p_true = (torch.exp(-obs_loss).clamp(max=layout.STATE_MAX) if probs is None
              else saturate(probs))
    zero = torch.zeros((), dtype=torch.float32, device=losses.device)
    row_scale = torch.where(active, s_weight[safe_idx], zero)
    if reduction == layout.REDUCTION_MEAN:
        row_scale = row_scale / active.sum().clamp(min=1).float()
    per_row = torch.where(active, row_scale * loss, zero)
    out = per_row if reduction == layout.REDUCTION_NONE else per_row.sum()
    if update:
        observe_rows(state, safe_idx, obs_loss, p_true, active, epoch, ema)
    return out, row_scale


def select(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest keys, in rank order: +inf > finite > -inf > NaN, and equal
    keys (-0 == +0) go to the lower index."""
    keys = keys.float()
    nan = torch.isnan(keys)
    order = torch.sort(torch.where(nan, torch.full_like(keys, float("-inf")), keys),
                       descending=True, stable=True).indices
    # A second stable sort moves NaN behind -inf and keeps every other order.
    order = order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]
    return order[:k].clone()


def uniform(idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    return rng.uniform(idx, key, stream)


def shuffle(chosen: torch.Tensor, key: int) -> torch.Tensor:
    """A counter-based permutation of ``chosen``: the same on every device and rank."""
    u = rng.uniform(chosen, key, rng.STREAM_SHUFFLE)
    return chosen[torch.sort(u, stable=True).indices]


ops.register_python("reference", {"ce_step": ce_step, "observe": observe, "select": select,
                                  "uniform": uniform, "shuffle": shuffle}, None)


class ReferenceBackend(Backend):
    """Pure-PyTorch ops; runs on any device torch supports."""

    name = "reference"
    impl = "reference"
    devices = ("cpu", "cuda", "mps", "xpu")
    auto_devices = devices
    observe_devices = devices

    def unavailable(self) -> Optional[str]:
        return None
