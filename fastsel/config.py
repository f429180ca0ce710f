"""The loss settings shared by every backend's fused step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import REDUCTIONS
from .validation.values import check_int, check_real


@dataclass
class LossConfig:
    """How ``Sampler.loss`` turns logits into the scalar to backprop, as ``F.cross_entropy`` does.

    ``ema`` is the weight of a new observation in the per-sample loss EMA and its variance.
    ``strict`` refuses a bad index or label at once (a host sync); otherwise it is masked,
    counted on the device, and raised at the next selection pass.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    class_weight: Optional[torch.Tensor] = None
    reduction: str = "mean"
    ema: float = 0.3
    strict: bool = True

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got reduction={self.reduction!r}")
        self.ignore_index = check_int("ignore_index", self.ignore_index)
        self.label_smoothing = check_real("label_smoothing", self.label_smoothing, 0.0, 1.0, what="")
        self.ema = check_real("ema", self.ema, 0.0, 1.0, lo_open=True, what="")
        if self.class_weight is not None:
            w = self.class_weight
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or not w.is_floating_point():
                raise ValueError("class_weight must be a 1-D floating-point tensor of C entries")
        #: ``reduction`` as the ops take it (``layout.REDUCTIONS``' index).
        self.reduction_code = REDUCTIONS.index(self.reduction)

    def weight_for(self, device: torch.device) -> Optional[torch.Tensor]:
        """The class weights as the ops take them: contiguous float32 on ``device`` (moved
        once and kept)."""
        w = self.class_weight
        if w is None or (w.device == device and w.dtype == torch.float32 and w.is_contiguous()):
            return w
        self.class_weight = w.to(device=device, dtype=torch.float32).contiguous()
        return self.class_weight
