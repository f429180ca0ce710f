"""Per-sample training state, kept on the device the model trains on.

Each buffer holds N entries plus one scratch slot at index N: a masked-out row in a
vectorised or fused update writes there instead of branching, so no backend needs a
host-side filter (and so no host synchronisation) to drop a row.
"""
from __future__ import annotations

from typing import Dict

import torch

from .layout import (ERR_INDEX_COUNT, ERR_INDEX_VALUE, ERR_LABEL_COUNT, ERR_LABEL_VALUE,  # noqa: F401
                     ERR_SIZE, FIELDS, STAT_EPOCH_COUNT, STAT_EPOCH_LOSS, STAT_NONFINITE, STAT_SIZE)

_FIELDS = tuple(name for name, _ in FIELDS)
_DTYPES = {name: getattr(torch, dtype) for name, dtype in FIELDS}
_INITIAL = {"last_epoch": -1, "weight": 1}


class SampleState:
    """Running per-sample statistics that every policy's key is computed from.

    ``loss``: EMA of the per-sample loss. ``loss_var``: exponentially weighted variance
    of the loss (TFTB's weighting). ``p_true``: mean predicted probability of the true
    class over every observation (p-SGD/c-SGD). ``seen``: observations so far.
    ``last_epoch``: epoch of the last observation (-1: never). ``weight``: the policy's
    loss weight for the current epoch (InfoBatch's rescale). ``selected``: how many
    epochs chose the sample (Arazo's data-variability entropy).
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got n={n}")
        self.n = int(n)
        d = torch.device(device)
        size = self.n + 1
        for f in _FIELDS:
            setattr(self, "_" + f, torch.full((size,), _INITIAL.get(f, 0), dtype=_DTYPES[f], device=d))
        self.stats = torch.zeros(STAT_SIZE, dtype=torch.float64, device=d)
        self.errors = torch.zeros(ERR_SIZE, dtype=torch.int64, device=d)

    # Public views exclude the scratch slot.
    @property
    def device(self) -> torch.device:
        return self._loss.device

    @property
    def loss(self) -> torch.Tensor:
        return self._loss[: self.n]

    @property
    def loss_var(self) -> torch.Tensor:
        return self._loss_var[: self.n]

    @property
    def p_true(self) -> torch.Tensor:
        return self._p_true[: self.n]

    @property
    def seen(self) -> torch.Tensor:
        return self._seen[: self.n]

    @property
    def last_epoch(self) -> torch.Tensor:
        return self._last_epoch[: self.n]

    @property
    def weight(self) -> torch.Tensor:
        return self._weight[: self.n]

    @property
    def selected(self) -> torch.Tensor:
        return self._selected[: self.n]

    def buffers(self) -> Dict[str, torch.Tensor]:
        """The full buffers (with the scratch slot), by field name, for backends."""
        return {f: getattr(self, "_" + f) for f in _FIELDS}

    def to(self, device: torch.device | str) -> "SampleState":
        """Move every buffer to ``device`` in place (a one-time move to the training device)."""
        d = torch.device(device)
        for f in _FIELDS:
            setattr(self, "_" + f, getattr(self, "_" + f).to(d))
        self.stats = self.stats.to(d)
        self.errors = self.errors.to(d)
        return self

    def take_errors(self) -> torch.Tensor:
        """Return the error counters (on the host) and clear them."""
        errs = self.errors.cpu().clone()  # .cpu() of a CPU tensor is the tensor itself
        self.errors.zero_()
        return errs

    def state_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"n": self.n}
        for f in _FIELDS:
            out[f] = getattr(self, f).detach().cpu().clone()
        out["stats"] = self.stats.detach().cpu().clone()
        out["errors"] = self.errors.detach().cpu().clone()
        return out

    def check_state_dict(self, sd: Dict[str, object]) -> None:
        """Raise a clear error if ``sd`` cannot be loaded into this state (nothing changes)."""
        if int(sd.get("n", -1)) != self.n:
            raise ValueError(
                f"state_dict is for n={sd.get('n')} samples, this sampler has n={self.n}")
        for f in _FIELDS:
            t = sd.get(f)
            ref = getattr(self, f)
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"state_dict field {f!r} must be a {ref.dtype} tensor of shape "
                    f"{tuple(ref.shape)}, got {getattr(t, 'dtype', type(t).__name__)} "
                    f"{tuple(getattr(t, 'shape', ()))}")
        for f, size in (("stats", STAT_SIZE), ("errors", ERR_SIZE)):
            t = sd.get(f)
            if not isinstance(t, torch.Tensor) or t.numel() != size:
                raise ValueError(f"state_dict field {f!r} must be a tensor of {size} entries")

    def load_state_dict(self, sd: Dict[str, object]) -> None:
        self.check_state_dict(sd)
        with torch.no_grad():
            for f in _FIELDS:
                getattr(self, f).copy_(sd[f])  # type: ignore[arg-type]
            self.stats.copy_(sd["stats"])  # type: ignore[arg-type]
            self.errors.copy_(sd["errors"])  # type: ignore[arg-type]
