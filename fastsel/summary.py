"""What ``Sampler.summary()`` returns: a dict that prints as a small table."""
from __future__ import annotations

import math

import torch


def selection_entropy(counts: torch.Tensor) -> dict:
    """Entropy of per-sample selection counts (Arazo et al.'s data-variability measure):
    in nats, and normalised by log N (1.0: every sample chosen equally often)."""
    c = counts.double()
    total = float(c.sum())
    if total <= 0:
        return {"nats": 0.0, "normalized": 0.0}
    p = c[c > 0] / total
    h = float(-(p * torch.log(p)).sum())
    n = counts.numel()
    return {"nats": h, "normalized": h / math.log(n) if n > 1 else 1.0}


class Summary(dict):
    """A plain dict of the sampler's figures; ``str()`` gives one line per figure."""

    def __str__(self) -> str:
        width = max(len(k) for k in self)
        lines = []
        for k, v in self.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}={b:.4g}" for a, b in v.items())
            elif isinstance(v, list):
                v = ", ".join(f"{b:.4g}" if isinstance(b, float) else str(b) for b in v)
            lines.append(f"{k:<{width}}  {v}")
        return "\n".join(lines)
