"""This rank's part of an epoch's selection, by DistributedSampler's rule: pad the
selection by repeating it (or drop its tail with ``drop_last``) to equal shards, then take
every ``world_size``-th index from ``rank``."""
from __future__ import annotations

import torch


class Shard:
    """The rank's slice of a selection, and its length without drawing one."""

    def __init__(self, world_size: int, rank: int, drop_last: bool) -> None:
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)

    def length(self, k: int) -> int:
        """Rows this rank gets out of a selection of ``k`` samples."""
        w = self.world_size
        return k // w if self.drop_last else -(-k // w)

    def take(self, selection: torch.Tensor) -> torch.Tensor:
        """This rank's indices of ``selection``, as an int64 tensor on the host."""
        k, w = selection.numel(), self.world_size
        total = self.length(k) * w
        if total > k and k:
            selection = selection.repeat(-(-total // k))
        return selection[:total][self.rank:total:w].to("cpu", torch.int64)
