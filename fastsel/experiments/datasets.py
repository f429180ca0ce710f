"""Datasets for the comparison jobs: real digits, a generated CIFAR-shaped set, or data the
user has on disk (an image folder or an FFCV .beton). All return in-memory tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..validation.values import check_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class Data:
    """A train/test split with what a model needs to know about it."""

    train: TensorDataset
    test: TensorDataset
    name: str
    channels: int
    size: int
    classes: int
    info: Dict[str, object] = field(default_factory=dict)
    #: Per-training-sample bool masks a generator knows (synthetic: ``near_copy``,
    #: ``noisy_label``), for analysis and tests; not part of ``info`` (which is printed).
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)


def _split(x: torch.Tensor, y: torch.Tensor, test_share: float, seed: int) -> Tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, int(len(y) * test_share))
    te, tr = perm[:n_test], perm[n_test:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def digits(seed: int = 0, test_share: float = 0.25) -> Data:
    """scikit-learn's 1,797 real 8×8 digit images, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - set-up installs it
        raise RuntimeError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    train, test = _split(x, y, test_share, seed)
    return Data(train, test, "digits", 1, 8, 10, {"source": "sklearn.datasets.load_digits", "n": len(y)})


def synthetic(n_train: int = 5000, n_test: int = 1000, classes: int = 10, size: int = 32,
              channels: int = 3, label_noise: float = 0.0, imbalance: float = 1.0, seed: int = 0,
              redundancy: float = 0.0, sources: int = 2, copy_noise: float = 0.02) -> Data:
    """A seeded CIFAR-shaped image set: smooth class prototypes, each image a blend of its
    class's prototype with another class's (blend weight up to 0.5, so some images sit near
    a decision boundary) plus pixel noise.

    ``label_noise``: share of training labels replaced by another class (test labels stay
    clean). ``imbalance``: ratio of the rarest to the most frequent class in training,
    with counts falling geometrically across classes (1.0: balanced; the test set is always
    balanced). These are the settings where loss-based selection is known to go wrong: it
    chases mislabelled and rare samples.

    ``redundancy``: share R of the training set (round(R·n_train) images, at random
    positions) replaced by near-copies of a few easy images, as web-scale data repeats
    itself: ``sources`` easy images per class (the class prototype with the usual pixel
    noise but no blend toward another class), and each copy is a source of the replaced
    image's class plus Gaussian noise of standard deviation ``copy_noise`` (clamped to
    [0, 1]); class counts are unchanged. The training set keeps n_train images, of which
    only (1 − R)·n_train are informative; the test set has no copies. Label noise is
    applied after, to copies and originals alike. ``masks["near_copy"]`` marks the copies,
    ``masks["noisy_label"]`` the flipped labels. R = 0 draws exactly the data it drew
    before the option existed.
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got label_noise={label_noise}")
    if not 0.0 < imbalance <= 1.0:
        raise ValueError(f"imbalance must be in (0, 1], got imbalance={imbalance}")
    if not 0.0 <= redundancy < 1.0:
        raise ValueError(f"redundancy must be in [0, 1), got redundancy={redundancy}")
    check_int("sources", sources, lo=1, what="an int (easy images per class)")
    if not 0.0 <= copy_noise < float("inf"):
        raise ValueError(f"copy_noise must be a finite standard deviation >= 0, got copy_noise={copy_noise}")
    if classes < 2 or n_train < classes or n_test < 1:
        raise ValueError(f"need classes >= 2, n_train >= classes and n_test >= 1, got "
                         f"classes={classes}, n_train={n_train}, n_test={n_test}")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        other = (labels + torch.randint(1, classes, labels.shape, generator=g)) % classes
        mix = (torch.rand(len(labels), generator=g) * 0.5).view(-1, 1, 1, 1)
        x = (1 - mix) * protos[labels] + mix * protos[other]
        x = x + 0.15 * torch.randn(x.shape, generator=g)
        return x.clamp(0.0, 1.0)

    weights = torch.tensor([imbalance ** (c / (classes - 1)) for c in range(classes)])
    counts = torch.clamp((weights / weights.sum() * n_train).round().long(), min=1)
    y_train = torch.repeat_interleave(torch.arange(classes), counts)
    y_train = y_train[torch.randperm(len(y_train), generator=g)]
    y_test = torch.arange(n_test) % classes
    x_train, x_test = draw(y_train), draw(y_test)
    near_copy = torch.zeros(len(y_train), dtype=torch.bool)
    if redundancy > 0.0:  # draws nothing otherwise: the data without copies stay as they were
        src = (protos.unsqueeze(1) + 0.15 * torch.randn(classes, sources, channels, size, size, generator=g))
        src = src.clamp(0.0, 1.0)
        n_copies = int(redundancy * len(y_train) + 0.5)
        at = torch.randperm(len(y_train), generator=g)[:n_copies]
        which = torch.randint(0, sources, (n_copies,), generator=g)
        noise = copy_noise * torch.randn((n_copies, channels, size, size), generator=g)
        x_train[at] = (src[y_train[at], which] + noise).clamp(0.0, 1.0)
        near_copy[at] = True
    clean = y_train.clone()
    flip = torch.rand(len(y_train), generator=g) < label_noise
    y_train = torch.where(flip, (y_train + torch.randint(1, classes, y_train.shape, generator=g)) % classes, y_train)
    info = {"n_train": len(y_train), "n_test": n_test, "label_noise": label_noise, "imbalance": imbalance,
            "noisy_labels": int((y_train != clean).sum()), "class_counts": counts.tolist(), "seed": seed}
    if redundancy > 0.0:
        info.update(redundancy=redundancy, near_copies=int(near_copy.sum()), sources=sources * classes)
    return Data(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test),
                "synthetic", channels, size, classes, info,
                masks={"near_copy": near_copy, "noisy_label": y_train != clean})


def _load_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255.0


def _folder_classes(root: str) -> List[str]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    return classes


def _read_folder(root: str, classes: List[str], size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(IMAGE_SUFFIXES):
                xs.append(_load_image(os.path.join(d, f), size))
                ys.append(c)
    if not xs:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def image_folder(root: str, size: int = 32, seed: int = 0, test_share: float = 0.2) -> Data:
    """Images under ``root/<class>/``, resized to ``size``×``size`` RGB. If ``root/train``
    and ``root/test`` exist they are the split; otherwise a seeded ``test_share`` split."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist")
    tr, te = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(tr) and os.path.isdir(te):
        classes = _folder_classes(tr)
        train = TensorDataset(*_read_folder(tr, classes, size))
        test = TensorDataset(*_read_folder(te, classes, size))
    else:
        classes = _folder_classes(root)
        train, test = _split(*_read_folder(root, classes, size), test_share, seed)
    return Data(train, test, f"folder:{root}", 3, size, len(classes), {"classes": classes})


def _read_beton(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from ffcv.loader import Loader, OrderOption

    from ..ffcv import pipelines
    if not os.path.isfile(path):
        raise ValueError(f".beton {path!r} does not exist")
    loader = Loader(path, batch_size=512, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines=pipelines(float_images=False), drop_last=False)
    xs, ys = [], []
    for img, lab, _ in loader:
        xs.append(img.clone())
        ys.append(lab.clone())
    return torch.cat(xs).float() / 255.0, torch.cat(ys)


def beton(path: str, test_path: Optional[str] = None, seed: int = 0, test_share: float = 0.2) -> Data:
    """An FFCV .beton written by ``fastsel.ffcv.write_beton`` (e.g. CIFAR-10 or ImageNet the
    user converted), read into memory once; a second .beton is the test set, otherwise a
    seeded split."""
    x, y = _read_beton(path)
    if test_path:
        train, test = TensorDataset(x, y), TensorDataset(*_read_beton(test_path))
    else:
        train, test = _split(x, y, test_share, seed)
    classes = int(max(int(train.tensors[1].max()), int(test.tensors[1].max())) + 1)
    return Data(train, test, f"beton:{path}", 3, int(x.shape[-1]), classes, {"test": test_path})


def subset(data: Data, n_train: Optional[int] = None, n_test: Optional[int] = None, seed: int = 0) -> Data:
    """``data`` cut to a seeded random ``n_train`` of its training and ``n_test`` of its test
    images (None: all of them); a ValueError names a count the data do not have."""
    parts = []
    for name, ds, n in (("n_train", data.train, n_train), ("n_test", data.test, n_test)):
        if n is not None and not 1 <= n <= len(ds):
            what = "training" if name == "n_train" else "test"
            raise ValueError(f"{data.name} has {len(ds)} {what} images, got {name}={n}")
        if n is None or n == len(ds):
            parts.append(ds)
            continue
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        parts.append(TensorDataset(*(t[keep] for t in ds.tensors)))
    info = dict(data.info)
    if n_train is not None or n_test is not None:
        info.update(n_train=len(parts[0]), n_test=len(parts[1]))
    return Data(parts[0], parts[1], data.name, data.channels, data.size, data.classes, info,
                dict(data.masks) if parts[0] is data.train else {})


def load(spec: str, **kwargs: object) -> Data:
    """``digits``, ``synthetic``, ``folder:PATH`` or ``beton:PATH[,TEST_PATH]``."""
    if spec == "digits":
        return digits()
    if spec == "synthetic":
        return synthetic(**kwargs)  # type: ignore[arg-type]
    if spec.startswith("folder:"):
        return image_folder(spec[len("folder:"):], size=int(kwargs.get("size", 32)))  # type: ignore[arg-type]
    if spec.startswith("beton:"):
        paths = spec[len("beton:"):].split(",")
        return beton(paths[0], paths[1] if len(paths) > 1 else None)
    raise ValueError(f"dataset must be 'digits', 'synthetic', 'folder:PATH' or 'beton:PATH[,TEST]', got {spec!r}")
