"""Deterministic fake training for sampler tests: a sample's logits depend only on its
index and on how often it was trained, so two runs with the same selections see the same
losses — which makes stream and state equality exact."""
from __future__ import annotations

from typing import List

import torch

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
