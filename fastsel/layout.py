"""The per-sample state's layout, defined once: buffer fields, the slots of ``stats`` and
``errors``, the reduction codes. Python, Triton and the op schemas import this module;
C++ and CUDA include ``csrc/layout.h``, generated from it (``python fastsel/layout.py``,
which ``setup.py`` runs before each build; a test checks the committed header).

Plain Python without imports, so ``setup.py`` can run it before torch is importable.
"""

#: Per-sample buffers: (name, dtype), each N + 1 entries (slot N is scratch for masked rows).
FIELDS = (
    ("loss", "float32"),        # EMA of the sample's observed loss
    ("loss_var", "float32"),    # exponentially weighted variance of that loss
    ("p_true", "float32"),      # running mean of the probability of the true class
    ("seen", "int32"),          # observations so far
    ("last_epoch", "int32"),    # epoch of the last observation, -1: never
    ("weight", "float32"),      # the policy's loss weight for the current epoch
    ("selected", "int32"),      # epochs that selected the sample
)
#: The buffers a step writes, in the op schemas' argument order (``weight`` is read only).
STEP_FIELDS = ("loss", "loss_var", "p_true", "seen", "last_epoch")

#: Finite in, finite state: float32's largest finite value, the bound every state value
#: saturates at. A finite observation is folded in float64 and each result is stored
#: clamped to [-STATE_MAX, STATE_MAX], so it never overflows to inf (fastsel/state.py has
#: the whole rule; C++ and CUDA use std::numeric_limits<float>::max(), the same number).
STATE_MAX = 3.4028234663852886e38

#: Slots of the float64 ``stats`` vector (counts are exact in float64 up to 2**53).
STAT_NONFINITE = 0      # losses that were NaN/inf and so never entered the state
STAT_EPOCH_LOSS = 1     # sum of finite per-sample losses since the last selection pass
STAT_EPOCH_COUNT = 2    # number of those losses
STAT_SIZE = 3

#: Slots of the int64 ``errors`` vector: counts of refused rows and one offending value.
ERR_INDEX_COUNT = 0
ERR_INDEX_VALUE = 1
ERR_LABEL_COUNT = 2
ERR_LABEL_VALUE = 3
ERR_SIZE = 4

#: Slots of the int64 ``rows`` vector (fastsel/rows.py): which rows of a loss call count
#: towards the epoch in progress, kept on the state's device so that the loss ops check and
#: count them themselves (no host int is read inside a possibly compiled call).
ROW_TRAINED = 0         # rows the update calls of this epoch admitted: the epoch's position
ROW_SHARD = 1           # this rank's rows in the epoch; -1: no epoch is in progress
ROW_CALLS = 2           # update calls of this epoch admitted
ROW_STRAY_COUNT = 3     # rows whose sample the epoch did not select (masked, left out)
ROW_STRAY_VALUE = 4     # the first such row's sample
ROW_OVER_COUNT = 5      # rows of calls refused for room (no epoch, or past the shard)
ROW_OVER_VALUE = 6      # the position the first such call would have reached (-1: no epoch)
ROW_OVER_EPOCH = 7      # the epoch of that call
ROW_SIZE = 8

#: ``reduction`` as the ops take it.
REDUCTIONS = ("mean", "sum", "none")
REDUCTION_MEAN, REDUCTION_SUM, REDUCTION_NONE = 0, 1, 2

_CONSTANTS = ("STAT_NONFINITE", "STAT_EPOCH_LOSS", "STAT_EPOCH_COUNT", "STAT_SIZE",
              "ERR_INDEX_COUNT", "ERR_INDEX_VALUE", "ERR_LABEL_COUNT", "ERR_LABEL_VALUE", "ERR_SIZE",
              "ROW_TRAINED", "ROW_SHARD", "ROW_CALLS", "ROW_STRAY_COUNT", "ROW_STRAY_VALUE",
              "ROW_OVER_COUNT", "ROW_OVER_VALUE", "ROW_OVER_EPOCH", "ROW_SIZE",
              "REDUCTION_MEAN", "REDUCTION_SUM", "REDUCTION_NONE")


def header() -> str:
    """The C++ header ``csrc/layout.h`` with the same constants."""
    lines = ["// Generated from fastsel/layout.py by `python fastsel/layout.py`: do not edit.",
             "#pragma once", "", "namespace fastsel {", "namespace layout {", ""]
    g = globals()
    lines += [f"constexpr int {name} = {g[name]};" for name in _CONSTANTS]
    lines += ["", "}  // namespace layout", "}  // namespace fastsel", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc", "layout.h")
    with open(path, "w") as f:
        f.write(header())
