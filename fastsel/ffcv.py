"""FFCV integration: fastsel's selection as the order of an FFCV ``Loader``, and a .beton
writer that stores each sample's id so the training loop can call ``Sampler.loss``.

    path = fastsel.ffcv.write_beton(train_set, "train.beton")
    sampler = fastsel.Sampler(len(train_set), policy="tftb", budget=0.3, epochs=30)
    loader = Loader(path, batch_size=256, order=fastsel.ffcv.Order(sampler),
                    pipelines=fastsel.ffcv.pipelines())
    for epoch in sampler.epochs():
        for images, labels, ids in loader:
            loss = sampler.loss(model(images), labels, ids)

FFCV is imported only when this module is: ``import fastsel`` never needs it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .sampler import Sampler

try:
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - exercised where FFCV is absent
    raise ImportError("fastsel.ffcv needs FFCV: apt-get install pkg-config libopencv-dev "
                      "libturbojpeg0-dev && pip install --no-build-isolation ffcv pillow") from e

#: The fields ``write_beton`` writes, in the order the loader yields them.
FIELDS = ("image", "label", "index")


class Order(TraversalOrder):
    """The sampler's current epoch as an FFCV traversal order.

    Works with both of FFCV's custom-order checks: ffcv 1.0.2 tests ``isinstance(order,
    TraversalOrder)`` and then calls ``order(loader)`` — pass ``order=Order(sampler)``;
    FFCV's main branch tests ``issubclass`` and calls ``order(loader, **order_kwargs)`` —
    pass ``order=Order, order_kwargs={"sampler": sampler}``.

    The epoch is the sampler's, not FFCV's counter (which restarts at 0 with each Loader,
    e.g. after a resume): an epoch whose samples all went through ``loss()`` moves on to
    the next one, and asking again for an unfinished epoch returns the same indices (FFCV
    asks twice for the first). Each call also resets the loader's notion of the epoch
    length, so ``len(loader)`` follows the sampler even when epoch lengths vary.
    """

    def __init__(self, loader_or_sampler: Any, sampler: Optional[Sampler] = None) -> None:
        if sampler is None:
            if not isinstance(loader_or_sampler, Sampler):
                raise TypeError("Order(sampler) needs a fastsel.Sampler, got "
                                f"{type(loader_or_sampler).__name__}")
            self.fastsel_sampler = loader_or_sampler
            self.loader = None
        else:
            if not isinstance(sampler, Sampler):
                raise TypeError(f"order_kwargs['sampler'] must be a fastsel.Sampler, got {type(sampler).__name__}")
            self.fastsel_sampler = sampler
            self._bind(loader_or_sampler)

    def __call__(self, loader: Any) -> "Order":
        """ffcv 1.0.2 calls the order it was given with the loader."""
        self._bind(loader)
        return self

    def _bind(self, loader: Any) -> None:
        super().__init__(loader)
        s = self.fastsel_sampler
        expected = np.arange(s.n)
        if len(self.indices) != s.n or not np.array_equal(np.asarray(self.indices, dtype=np.int64), expected):
            raise ValueError(f"the Loader reads {len(self.indices)} samples (indices=...), but the "
                             f"sampler was built for N={s.n}: build the sampler for the whole .beton")
        if self.distributed and s.world_size == 1:
            raise ValueError("Loader(distributed=True) but the fastsel Sampler has num_replicas=1: "
                             "initialise torch.distributed before building the sampler")
        if not self.distributed and s.world_size > 1:
            raise ValueError(f"the fastsel Sampler shards over {s.world_size} ranks: "
                             "build the Loader with distributed=True")

    def sample_order(self, epoch: int) -> np.ndarray:
        s = self.fastsel_sampler
        if s._epoch_done():
            s.set_epoch(s.epoch + 1)
        order = s.epoch_array().astype(np.uint64)
        if self.loader is not None:
            self.loader.first_traversal_order = order
        return order


def steps_per_epoch(sampler: Sampler, batch_size: int, drop_last: bool = True) -> int:
    """Steps in the sampler's current epoch (FFCV's own ``len`` is fixed by its first epoch
    in ffcv 1.0.2; ``Order`` keeps it in step, and this says it without a loader)."""
    n = len(sampler)
    return n // batch_size if drop_last else -(-n // batch_size)


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """PIL image, HWC/HW numpy array or CHW/HW tensor → HWC uint8 RGB (as FFCV stores it)."""
    if isinstance(image, torch.Tensor):
        a = image.detach().cpu()
        if a.dim() == 3 and a.shape[0] in (1, 3):
            a = a.permute(1, 2, 0)
        a = a.numpy()
    else:
        a = np.asarray(image)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"an image must be HW, HWC or CHW with 1 or 3 channels, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


class _WithIds:
    """Presents (image, label) items as (HWC uint8 image, label, index) for FFCV's writer."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"dataset items must be (image, label, ...), got {type(item).__name__}")
        return _to_hwc_uint8(item[0]), int(item[1]), int(i)


def write_beton(dataset: Any, path: str, *, image_format: str = "raw", jpeg_quality: int = 90,
                max_resolution: Optional[int] = None, num_workers: int = 1) -> str:
    """Write ``dataset``'s (image, label) items to an FFCV .beton with an ``index`` field.

    ``image_format``: ``"raw"`` (lossless) or ``"jpeg"``. Images may be PIL images, numpy
    arrays (HW or HWC) or tensors (CHW or HW), uint8 or floats in [0, 1]; grayscale is
    stored as RGB. Returns ``path``. Read it back with :func:`pipelines`.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    modes = {"raw": "raw", "jpeg": "jpg"}
    if image_format not in modes:
        raise ValueError(f"image_format must be 'raw' or 'jpeg', got image_format={image_format!r}")
    if len(dataset) < 1:
        raise ValueError("the dataset is empty")
    fields = {
        "image": RGBImageField(write_mode=modes[image_format], jpeg_quality=jpeg_quality,
                               max_resolution=max_resolution),
        "label": IntField(),
        "index": IntField(),
    }
    DatasetWriter(path, fields, num_workers=num_workers).from_indexed_dataset(_WithIds(dataset))
    return path


def pipelines(device: Optional[torch.device] = None, float_images: bool = True) -> Dict[str, List[Any]]:
    """FFCV pipelines that read ``write_beton``'s fields as (images NCHW, labels N, ids N).

    Images come as float32 in [0, 1] (``float_images``) or uint8; everything is moved to
    ``device`` when given (non-blocking, so FFCV's prefetching keeps running).
    """
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    def to_dev() -> List[Any]:
        return [ToDevice(torch.device(device), non_blocking=True)] if device is not None else []

    image: List[Any] = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
    image += to_dev()
    if float_images:
        image += [Convert(torch.float32), _Scale()]
    return {
        "image": image,
        "label": [IntDecoder(), ToTensor(), Squeeze(1), Convert(torch.int64)] + to_dev(),
        "index": [IntDecoder(), ToTensor(), Squeeze(1), Convert(torch.int64)] + to_dev(),
    }


def _Scale() -> Any:
    """A torch module dividing by 255 (FFCV accepts modules as pipeline stages)."""
    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 255.0
    return Scale()
