"""``with_indices``: make a dataset's items carry their own index, for ``Sampler.loss``."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a map-style dataset; item ``i`` becomes ``(*item, i)`` (a dict gets ``"index"``).

    A plain module-level class holding only the wrapped dataset, so it pickles for
    DataLoader workers under fork and spawn; nothing global is patched.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("with_indices needs a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, dict):
            if "index" in item:
                raise ValueError(f"with_indices: item {index} of {type(self.dataset).__name__} is a dict "
                                 f"that already has an 'index' key ({item['index']!r}), which the sample "
                                 "index would overwrite: rename that key in the dataset, or pass the "
                                 "dataset's own index to Sampler.loss instead of using with_indices")
            return {**item, "index": index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)


def with_indices(dataset: Any) -> IndexedDataset:
    """Return ``dataset`` with each item's index appended: ``(x, y) -> (x, y, i)``."""
    return IndexedDataset(dataset)
