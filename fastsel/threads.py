"""Keeping a short CPU selection pass on the calling thread.

A selection pass over N = 50k samples in CPU memory takes about a millisecond. ATen would
split each of its ops over N across its OpenMP pool, whose workers then spin-wait for
milliseconds (about 9 ms of CPU after a pass on a 2-core machine): next to a data loader's
threads (FFCV's) that costs more than the pass itself. Up to ``SERIAL_MAX_N`` samples the
pass therefore runs on the calling thread alone.

``calling_thread_only`` lowers the calling thread's own OpenMP thread count
(``fastsel._C.set_local_num_threads``) and restores it on exit. Other threads, the pool's
size and torch's process-wide setting are left alone (``torch.set_num_threads`` would
resize thread pools). Without the extension, or with another ATen parallel backend, it
does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

try:
    from . import _C  # type: ignore[attr-defined]
except Exception:  # not built: fastsel.list_backends() says why
    _C = None

#: Largest N whose CPU selection pass runs on the calling thread: 2**18 covers CIFAR,
#: SVHN and Tiny ImageNet; an ImageNet-sized pass (1.28M) keeps ATen's threads.
SERIAL_MAX_N = 1 << 18


@contextlib.contextmanager
def calling_thread_only(device: torch.device, n: int) -> Iterator[None]:
    """Run the block's ATen ops on the calling thread when they work on ``n`` samples
    on the CPU with ``n <= SERIAL_MAX_N``; otherwise change nothing."""
    if _C is None or device.type != "cpu" or n > SERIAL_MAX_N:
        yield
        return
    previous = _C.set_local_num_threads(1)
    try:
        yield
    finally:
        _C.set_local_num_threads(previous)
