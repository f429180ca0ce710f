"""The old homes of the modules that moved to ``fastsel.experiments`` (issue 20): each old
module (``fastsel/train.py``, ...) calls ``alias`` so that ``import fastsel.train`` warns
once and then *is* ``fastsel.experiments.train`` — the same module object, so its names,
and any monkeypatching of them, are shared."""
from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str) -> None:
    """Install ``fastsel.experiments.<name>`` under the old name ``fastsel.<name>``."""
    name = old.rsplit(".", 1)[1]
    new = f"fastsel.experiments.{name}"
    warnings.warn(f"{old} moved to {new}; import it from there (the old name will go)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
