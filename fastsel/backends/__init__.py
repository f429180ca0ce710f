"""The one dispatch point for backends: ``get_backend(name, device)`` and ``backends()``.

A backend provides ``step`` (the fused loss + state update), ``select`` (k largest keys,
ties by index), ``uniform`` and ``shuffle`` (counter-based noise). Later backends
register a loader here; a backend that cannot load says why in one line.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from .reference import ReferenceBackend

# name -> (module, class, devices it runs on). Listed fastest first for "auto".
_KNOWN: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "cuda": ("fastsel.backends.cuda", "CudaBackend", ("cuda",)),
    "triton": ("fastsel.backends.triton", "TritonBackend", ("cuda",)),
    "cpu": ("fastsel.backends.cpu", "CpuBackend", ("cpu",)),
    "reference": ("fastsel.backends.reference", "ReferenceBackend", ("cpu", "cuda", "mps", "xpu")),
}

_cache: Dict[str, object] = {}
_why: Dict[str, str] = {}


def _load(name: str) -> Optional[object]:
    if name in _cache:
        return _cache[name]
    if name in _why:
        return None
    module, cls, _ = _KNOWN[name]
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


def backends() -> Dict[str, str]:
    """Every backend by name: "available (devices: ...)" or the one-line reason it is not."""
    out = {}
    for name, (_, _, devices) in _KNOWN.items():
        b = _load(name)
        out[name] = f"available (devices: {', '.join(devices)})" if b is not None else _why[name]
    return out


def check_backend_name(name: str) -> None:
    """Refuse an unknown backend name at construction, before any device is known."""
    if name != "auto" and name not in _KNOWN:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_KNOWN)}, got backend={name!r}")


def get_backend(name: str, device: torch.device | str) -> object:
    """The backend called ``name`` for ``device``; ``"auto"`` picks the fastest that runs there."""
    dev = torch.device(device).type
    if name == "auto":
        for cand, (_, _, devices) in _KNOWN.items():
            if dev in devices and _load(cand) is not None:
                return _cache[cand]
        raise RuntimeError(f"no backend runs on device {dev!r}: {backends()}")
    check_backend_name(name)
    b = _load(name)
    if b is None:
        raise RuntimeError(f"backend={name!r} is not available here: {_why[name]}")
    if dev not in _KNOWN[name][2]:
        raise ValueError(f"backend={name!r} does not run on device {dev!r} (it runs on {_KNOWN[name][2]})")
    return b


__all__ = ["backends", "check_backend_name", "get_backend", "ReferenceBackend"]
