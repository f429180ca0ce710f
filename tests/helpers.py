"""Helpers the test files share, one definition each.

Fake training for sampler tests (``fake_logits``, ``fake_labels``, ``train_epoch``): a
sample's logits depend only on its index and on how often it was trained, so two runs with
the same selections see the same losses, which makes stream and state equality exact.
``weights_only``: a checkpoint through ``torch.load(weights_only=True)``. ``snapshot``: a
copy of what a call may change. ``batch``: a random batch of logits, labels and sample
indices. ``make_state``: the ops' state tensors from a non-trivial start.
"""
from __future__ import annotations

import copy
import io
from typing import List

import torch

from fastsel import layout

C = 5


def fake_logits(idx: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    table = torch.randn(100_000, C, generator=g)
    # Losses shrink as a sample is trained, at a per-sample speed.
    speed = 0.3 + (idx % 7).float() / 7
    return table[idx] * (1.0 + speed * seen[idx].float()).unsqueeze(1)


def fake_labels(idx: torch.Tensor) -> torch.Tensor:
    return idx % C


def train_epoch(sampler, batch_size: int, stop_after: int | None = None) -> List[int]:
    """Iterate the sampler in batches, calling loss() on each; returns the indices trained."""
    out: List[int] = []
    batch: List[int] = []
    steps = 0
    it = iter(sampler)
    for i in it:
        batch.append(i)
        if len(batch) == batch_size:
            _step(sampler, batch)
            out += batch
            batch = []
            steps += 1
            if stop_after is not None and steps == stop_after:
                return out
    if batch:
        _step(sampler, batch)
        out += batch
    return out


def _step(sampler, batch: List[int]) -> None:
    idx = torch.tensor(batch)
    logits = fake_logits(idx, sampler.state.seen).requires_grad_(True)
    sampler.loss(logits, fake_labels(idx), idx).backward()


# ---- checkpoints and snapshots -------------------------------------------------------------

def weights_only(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(obj):
    """A copy that later writes to ``obj`` do not reach (tensors cloned, containers copied all
    the way down) of what a call may change: for a ``fastsel.Sampler`` the tuple (its
    per-sample state's ``state_dict()``, ``position``, ``budget.trained``,
    ``budget.loss_calls``); for a ``SampleState`` its ``state_dict()``; anything else (a
    nested state_dict) as it is."""
    import fastsel
    from fastsel.state import SampleState
    if isinstance(obj, fastsel.Sampler):
        obj = (obj.state.state_dict(), obj.position, obj.budget.trained, obj.budget.loss_calls)
    elif isinstance(obj, SampleState):
        obj = obj.state_dict()
    return copy.deepcopy(obj)


# ---- op-level inputs -------------------------------------------------------------------------

def _generator(gen):
    return gen if isinstance(gen, torch.Generator) else torch.Generator().manual_seed(int(gen))


def batch(gen, b, c, n, dtype=torch.float32, *, scale=3.0, pool=None, unique=False, ignore=0.0,
          faults=False, device="cpu"):
    """``(logits, labels, indices)`` of ``b`` rows over ``c`` classes and ``n`` samples, on
    ``device``, drawn from ``gen`` (a ``torch.Generator`` or an int seed).

    logits: N(0, scale**2) rows in ``dtype``; labels in [0, c), each -100 (ignored) with
    probability ``ignore``; indices in [0, pool) (``pool`` None: n; a pool under b gives
    duplicates, one over n out-of-range indices), or ``unique``: b distinct samples of n.
    ``faults`` (with b >= 6): row 1 ignored, a label c + 2 at row 4, the indices n at row 3
    and -1 at row 5 (what deferred mode masks and counts, strict mode refuses)."""
    g = _generator(gen)
    logits = (torch.randn(b, c, generator=g) * scale).to(dtype)
    labels = torch.randint(0, c, (b,), generator=g)
    if ignore:
        labels[torch.rand(b, generator=g) < ignore] = -100
    if unique:
        indices = torch.randperm(n, generator=g)[:b]
    else:
        indices = torch.randint(0, n if pool is None else pool, (b,), generator=g)
    if faults and b >= 6:
        labels[1] = -100
        indices[3] = n
        labels[4] = c + 2
        indices[5] = -1
    return logits.to(device), labels.to(device), indices.to(device)


def make_state(n, seed, device="cpu"):
    """The ops' state tensors (loss, loss_var, p_true, seen, last, weight, stats, errors; the
    per-sample ones of n + 1 entries, slot n the neutral scratch slot) from a non-trivial
    start drawn from ``seed`` (an int or a ``torch.Generator``): some samples seen before
    (the EMA branch), others never (the first observation), policy weights other than 1,
    stats not zero."""
    g = _generator(seed)
    seen = torch.randint(0, 3, (n + 1,), generator=g, dtype=torch.int32)
    seen[n] = 0
    was = seen > 0
    state = (torch.rand(n + 1, generator=g) * 2 * was, torch.rand(n + 1, generator=g) * 0.2 * was,
             torch.rand(n + 1, generator=g) * was, seen, torch.where(was, 2, -1).to(torch.int32),
             torch.cat([torch.rand(n, generator=g) + 0.5, torch.ones(1)]),
             torch.tensor([1.0, 4.5, 3.0], dtype=torch.float64), torch.zeros(layout.ERR_SIZE, dtype=torch.int64))
    return tuple(t.to(device) for t in state)
