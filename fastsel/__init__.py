"""fastsel: data-loader-level sample selection for budgeted PyTorch training.

    train = fastsel.with_indices(train_set)
    sampler = fastsel.Sampler(train, budget=0.3, epochs=30)   # policy="uniform", the default
    loader = DataLoader(train, batch_size=256, sampler=sampler)
    sched = fastsel.BudgetLR(optimizer, sampler)
    for epoch in sampler.epochs():
        for x, y, idx in loader:
            loss = sampler.loss(model(x), y, idx)
            ...
"""
from .backends import list_backends
from .batch_policies import BATCH_POLICIES
from .indexed import with_indices
from .policies import POLICIES
from .sampler import Sampler
from .schedule import BudgetLR
from .selective import SelectiveStep

__version__ = "0.1.0"

__all__ = ["Sampler", "BudgetLR", "SelectiveStep", "with_indices", "list_backends", "POLICIES",
           "BATCH_POLICIES", "__version__"]


def __getattr__(name: str):
    # fastsel.ffcv imports FFCV and fastsel.lightning Lightning, so they load on first use,
    # not with fastsel (fastsel.accelerate too, alongside them; fastsel.transformers imports
    # Hugging Face Transformers).
    if name in ("ffcv", "lightning", "accelerate", "transformers"):
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fastsel' has no attribute {name!r}")
