"""What ``Sampler.summary()`` returns: a dict that prints as a small table."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict

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


def _number(v: Any):
    """``v`` as a float if it is a real number (a bool, a numpy or 0-d torch number
    included), else None."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 and not v.is_complex() else None
    if isinstance(v, numbers.Real):
        return float(v)
    return None


class Summary(dict):
    """A plain dict of the sampler's figures; ``str()`` gives one line per figure."""

    def scalars(self, prefix: str = "fastsel/", sep: str = "/") -> Dict[str, float]:
        """The figures as a flat dict of floats, for ``SummaryWriter.add_scalars``,
        ``wandb.log`` or Lightning's ``log_dict``: a number keeps its name, a nested dict's
        numbers are named ``key/inner`` (``selection_entropy/normalized``), a list (a
        per-epoch history, ``epoch_mean_losses``) gives its last number as ``key/last``;
        strings (policy, backend, a time budget's "60 s") and empty lists are left out.
        Every name starts with ``prefix``.
        """
        out: Dict[str, float] = {}

        def put(name: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, w in v.items():
                    put(f"{name}{sep}{k}", w)
            elif isinstance(v, (list, tuple)):
                if v:
                    put(f"{name}{sep}last", v[-1])
            else:
                x = _number(v)
                if x is not None:
                    out[prefix + name] = x

        for key, value in self.items():
            put(str(key), value)
        return out

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
