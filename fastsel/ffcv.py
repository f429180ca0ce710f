"""FFCV integration: fastsel's selection as the order of an FFCV ``Loader``, and a .beton
writer that stores each sample's id so the training loop can call ``Sampler.loss``.

    path = fastsel.ffcv.write_beton(train_set, "train.beton")
    sampler = fastsel.Sampler(len(train_set), policy="tftb", budget=0.3, epochs=30)
    loader = Loader(path, batch_size=256, order=fastsel.ffcv.Order(sampler),
                    pipelines=fastsel.ffcv.pipelines())
    for epoch in sampler.epochs():
        for images, labels, ids in loader:
            loss = sampler.loss(model(images), labels, ids)

Ids. The ids a .beton yields are the file's: ``write_beton`` stores each sample's position
in the file (0 .. rows-1) in its ``index`` field, and ``Order`` refuses a file whose
``index`` field holds anything else. When the Loader reads the whole file in its order
(no ``indices=``), the sampler's N is the file's sample count and the ids are the
sampler's indices, as above.

Subsets. A ``Loader(indices=...)`` reads part of the file: then the sampler's N is
``len(indices)`` and the sampler's sample ``i`` is the file's sample ``indices[i]``. The
order maps the sampler's epoch selection ``sel`` to the file positions ``indices[sel]``,
and the ids the loader yields stay the file's: map them back with
``Order.sampler_ids(ids)`` (a table lookup on the ids' device, no host sync) before
``loss()``:

    sampler = fastsel.Sampler(len(subset), policy="tftb", budget=0.3, epochs=30)
    order = fastsel.ffcv.Order(sampler)
    loader = Loader(path, batch_size=256, indices=subset, order=order, pipelines=...)
    ...  loss = sampler.loss(model(images), labels, order.sampler_ids(ids))

Refused, with a ``ValueError`` naming ``indices``: positions that are not integers,
positions outside the file, a position listed twice (one sampler sample is one file
sample; a repeat would be two samples with one id), and a sampler whose N is not
``len(indices)``.

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

    Subsets: with ``Loader(indices=...)`` the sampler is built for ``N = len(indices)`` and
    its sample ``i`` is the file's sample ``indices[i]``; ``sample_order`` hands FFCV the
    file positions ``indices[selection]``, the loader yields the file's ids, and
    :meth:`sampler_ids` maps them back to the sampler's indices for ``loss()``. Without
    ``indices=`` (the whole file, in order) the ids already are the sampler's and
    ``sampler_ids`` returns them as they are. Integer positions inside the file, each at
    most once, are required (``ValueError`` otherwise).
    """

    def __init__(self, loader_or_sampler: Any, sampler: Optional[Sampler] = None) -> None:
        if sampler is None:
            if not isinstance(loader_or_sampler, Sampler):
                raise TypeError("Order(sampler) needs a fastsel.Sampler, got "
                                f"{type(loader_or_sampler).__name__}")
            self.fastsel_sampler = loader_or_sampler
            self.loader = None
            self._file_ids: Optional[np.ndarray] = None
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
        self._file_ids = None  # unbound until every check below has passed
        super().__init__(loader)
        s = self.fastsel_sampler
        rows = int(loader.reader.num_samples)
        file_ids = _check_indices(np.asarray(self.indices), rows, s.n)
        _check_file_ids(loader.reader)
        if self.distributed and s.world_size == 1:
            raise ValueError("Loader(distributed=True) but the fastsel Sampler has num_replicas=1: "
                             "initialise torch.distributed before building the sampler")
        if not self.distributed and s.world_size > 1:
            raise ValueError(f"the fastsel Sampler shards over {s.world_size} ranks: "
                             "build the Loader with distributed=True")
        self._rows = rows
        # The whole file in its own order: the sampler's indices are the file's ids.
        self._identity = _is_whole(file_ids, rows)
        self._lookup: Dict[torch.device, torch.Tensor] = {}
        self._file_ids = file_ids

    def sample_order(self, epoch: int) -> np.ndarray:
        s = self.fastsel_sampler
        sel = s.epoch_array() if s._start_iteration(trained_is_done=True) else np.empty(0, np.int64)
        if self._file_ids is not None and not self._identity:
            sel = self._file_ids[sel]  # the sampler's sample i is the file's sample indices[i]
        order = sel.astype(np.uint64)
        if self.loader is not None:
            self.loader.first_traversal_order = order
        return order

    def sampler_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The sampler's indices of the file ids a ``Loader(indices=...)`` yielded (for
        ``sampler.loss``): a lookup in a table of the file's size, built and moved to the
        ids' device once, so it neither syncs with the host nor copies per batch. Reading
        the whole file in order, the ids are the sampler's and come back unchanged. An id
        the Loader does not read maps to -1, which ``loss()`` refuses."""
        if self._file_ids is None:
            raise RuntimeError("this Order is not bound to a Loader yet: pass it as Loader(order=...) first")
        if self._identity:
            return ids
        table = self._lookup.get(ids.device)
        if table is None:
            cpu = torch.full((self._rows,), -1, dtype=torch.int64)
            cpu[torch.from_numpy(self._file_ids)] = torch.arange(len(self._file_ids), dtype=torch.int64)
            table = self._lookup[ids.device] = cpu.to(ids.device)
        return table[ids]


def _is_whole(file_ids: np.ndarray, rows: int) -> bool:
    return len(file_ids) == rows and bool(np.array_equal(file_ids, np.arange(rows, dtype=np.int64)))


def _check_indices(idx: np.ndarray, rows: int, n: int) -> np.ndarray:
    """The Loader's ``indices`` (FFCV's ``arange(rows)`` without ``indices=``) as file
    positions (int64), or the ``ValueError`` that says what is wrong and what to pass."""
    if idx.ndim != 1 or idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
        hint = " (a boolean mask: pass np.flatnonzero(mask))" if idx.dtype == np.bool_ else ""
        raise ValueError(f"Loader(indices=...) must be a 1-D sequence of integer positions in the .beton, "
                         f"got dtype {idx.dtype} with shape {idx.shape}{hint}")
    if len(idx) == 0:
        raise ValueError("Loader(indices=...) is empty: list the .beton positions the sampler trains on")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"Loader(indices=...) has position {bad}, outside the .beton's {rows} samples: "
                         f"positions go from 0 to {rows - 1}")
    file_ids = idx.astype(np.int64)
    uniq, counts = np.unique(file_ids, return_counts=True)
    if len(uniq) != len(file_ids):
        dup = uniq[counts > 1]
        raise ValueError(f"Loader(indices=...) lists {len(dup)} position(s) more than once (e.g. {int(dup[0])}): "
                         "each sampler sample is one file sample with one id, so pass each position "
                         "once (np.unique(indices)); to see a sample more often, let the policy select it")
    if len(file_ids) != n and _is_whole(file_ids, rows):
        raise ValueError(f"the Loader reads the whole .beton, {rows} samples, but the sampler was "
                         f"built for N={n}: build the sampler for the whole .beton (N={rows}), or "
                         f"read {n} of its samples with Loader(indices=...)")
    if len(file_ids) != n:
        raise ValueError(f"the Loader reads {len(file_ids)} samples (len(indices)), but the sampler was "
                         f"built for N={n}: build it with N=len(indices), as fastsel.Sampler(len(indices), "
                         "...); its sample i is the .beton's sample indices[i]")
    return file_ids


def _check_file_ids(reader: Any) -> None:
    """The file's ``index`` field, where it has one, must hold each sample's position (what
    ``write_beton`` writes): the ids are read from the file's metadata, with no decoding."""
    from ffcv.fields import IntField

    names = list(reader.handlers)
    if "index" not in names or not isinstance(reader.handlers["index"], IntField):
        return
    ids = reader.metadata[f"f{names.index('index')}"]
    if not np.array_equal(ids, np.arange(len(ids), dtype=ids.dtype)):
        wrong = int(np.flatnonzero(ids != np.arange(len(ids), dtype=ids.dtype))[0])
        raise ValueError(f"the .beton's index field is not each sample's position (sample {wrong} has id "
                         f"{int(ids[wrong])}): the ids the loader yields would not be the sampler's; "
                         "write the file with fastsel.ffcv.write_beton")


def steps_per_epoch(sampler: Sampler, batch_size: int, drop_last: bool = True) -> int:
    """Steps in the epoch the sampler draws next, whole (``len(sampler)``; a resumed epoch
    yields fewer). FFCV's own ``len`` is fixed by its first epoch in ffcv 1.0.2; ``Order``
    keeps it in step, and this says it without a loader."""
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
