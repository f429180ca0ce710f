"""Counter-based random numbers: a 32-bit hash of (epoch key, stream, sample index).

Every backend (PyTorch, C++, Triton, CUDA) and every rank computes the same bits for the
same sample, with no generator state to carry or to synchronise. The sampler's own
``torch.Generator`` (seeded from seed and epoch) only draws the per-epoch key.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9

#: Streams keep the draws of one epoch independent of each other.
STREAM_SELECT = 1
STREAM_SHUFFLE = 2
STREAM_EXPLORE = 3


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (Wellons' lowbias32) on int64 tensors holding uint32."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """``mix32`` for one Python int (used to derive per-stream bases on the host)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def stream_base(key: int, stream: int) -> int:
    """The 32-bit base that seeds one stream of one epoch."""
    return mix32_int((key & MASK32) ^ mix32_int((stream * GOLDEN32) & MASK32))


def hash_indices(idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """32-bit hashes (as int64) of the sample indices ``idx`` under (key, stream)."""
    base = stream_base(key, stream)
    return mix32(mix32(idx.to(torch.int64) ^ base) + base)


def uniform(idx: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """Uniform float32 in the open interval (0, 1), 24 random bits, one per index."""
    h = hash_indices(idx, key, stream)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in (0, 1)."""
    return -torch.log(-torch.log(u))


def epoch_key(generator: torch.Generator, seed: int, epoch: int) -> int:
    """Seed ``generator`` from (seed, epoch) and draw the epoch's 31-bit key from it."""
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch)) & 0x7FFFFFFFFFFFFFFF)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
