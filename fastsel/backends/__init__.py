"""The one dispatch point for backends: ``get_backend(name, device)`` and ``list_backends()``.

Every backend is a :class:`fastsel.backends.base.Backend`: a choice of implementation of
the op family ``torch.ops.fastsel.*`` (``fastsel.ops``), with ``name``, ``devices``,
``auto_devices`` (where ``"auto"`` may pick it), ``unavailable()`` (a one-line reason, or
None) and five operations, all checked against ``reference`` by the shared suite:

* ``step(logits, target, indices, state, cfg, epoch, update)``: the fused loss + state update,
* ``observe(losses, indices, state, cfg, epoch, probs, update)``: any per-sample loss,
* ``select(keys, k)``: indices of the k largest keys, ties by lower index, NaN last,
* ``uniform(idx, key, stream)``: the counter-based uniforms of ``fastsel.rng``, bit-exact,
* ``shuffle(chosen, key)``: ``chosen`` reordered by its ``STREAM_SHUFFLE`` uniforms.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

from .base import Backend
from .reference import ReferenceBackend

# name -> (module, class). Listed fastest first for "auto". Each backend instance says
# which device types it runs on (``devices``) and, if it cannot run, why (``unavailable()``).
_KNOWN: Dict[str, Tuple[str, str]] = {
    "cuda": ("fastsel.backends.cuda", "CudaBackend"),
    "triton": ("fastsel.backends.triton", "TritonBackend"),
    "cpu": ("fastsel.backends.cpu", "CpuBackend"),
    "reference": ("fastsel.backends.reference", "ReferenceBackend"),
}

_cache: Dict[str, Backend] = {}
_why: Dict[str, str] = {}


def _load(name: str) -> Optional[Backend]:
    if name in _cache:
        return _cache[name]
    if name in _why:
        return None
    module, cls = _KNOWN[name]
    try:
        mod = importlib.import_module(module)
        backend = getattr(mod, cls)()
        reason = getattr(backend, "unavailable", lambda: None)()
        if reason:
            _why[name] = reason
            return None
    except ModuleNotFoundError as e:
        if e.name == module:
            _why[name] = "not implemented in this version"
        else:
            _why[name] = f"needs {e.name}, which is not installed"
        return None
    except Exception as e:  # an extension that fails to load must not break import
        _why[name] = f"failed to load: {type(e).__name__}: {e}"
        return None
    _cache[name] = backend
    return backend


def list_backends() -> Dict[str, str]:
    """Every backend by name: "available (devices: ...)" or the one-line reason it is not."""
    out = {}
    for name in _KNOWN:
        b = _load(name)
        out[name] = f"available (devices: {', '.join(b.devices)})" if b is not None else _why[name]
    return out


def available(device: torch.device | str, auto: bool = False) -> Tuple[str, ...]:
    """Names of the backends that run on ``device`` here, fastest first. With ``auto``, only
    those ``"auto"`` may pick: a backend lists in ``auto_devices`` where it is fast (Triton
    runs on the CPU under ``TRITON_INTERPRET=1``, for tests only)."""
    dev = torch.device(device).type
    attr = "auto_devices" if auto else "devices"
    return tuple(n for n in _KNOWN
                 if _load(n) is not None and dev in getattr(_cache[n], attr, _cache[n].devices))


def check_backend_name(name: str) -> None:
    """Refuse an unknown backend name at construction, before any device is known."""
    if name != "auto" and name not in _KNOWN:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_KNOWN)}, got backend={name!r}")


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend called ``name`` for ``device``; ``"auto"`` picks the fastest that runs there."""
    dev = torch.device(device).type
    if name == "auto":
        names = available(dev, auto=True)
        if not names:
            raise RuntimeError(f"no backend runs on device {dev!r}: {list_backends()}")
        return _cache[names[0]]
    check_backend_name(name)
    b = _load(name)
    if b is None:
        raise RuntimeError(f"backend={name!r} is not available here: {_why[name]}")
    if dev not in b.devices:
        raise ValueError(f"backend={name!r} does not run on device {dev!r} (it runs on {b.devices})")
    return b


__all__ = ["available", "list_backends", "check_backend_name", "get_backend", "Backend",
           "ReferenceBackend"]
