"""The metadata faults of a direct ``ce_step``/``observe`` op call, defined once: for each,
the exception it raises and its message template. Every implementation raises from this
table: Python (``fastsel.validation.tensors.check_ce_step_call``/``check_observe_call``,
run by the ``reference`` and ``triton`` ops, and the Sampler's own checks for the faults it
shares) and C++ (``csrc/checks.cpp``, through ``csrc/faults.h``, generated from this module
by ``python fastsel/validation/faults.py``, which ``setup.py`` runs before each build; a
test checks the committed header). So the same bad input raises the same exception with the
same message whichever implementation was called.

A template names the argument, its value and the fix. Its ``{fields}`` are filled with
text: shapes and strides as Python prints a tuple (``(3, 4)``, ``(5,)``, ``()``), dtypes as
``torch.float32``, devices as ``cpu``/``cuda:0``, floats as ``repr`` prints them, ints in
decimal. TypeError: a wrong dtype; ValueError: a wrong shape, device, layout or range.

The checks run in this table's order (each op takes the rows that apply to it); the first
fault found is raised, before anything is computed or written. Value faults (index and
label ranges, room, stray rows) are not here: ``fastsel/rows.py`` and ``raise_for_errors``.

Plain Python without imports, so ``setup.py`` can run it before torch is importable.
"""

TYPE, VALUE = "TypeError", "ValueError"

_CONTIG = "{name} must be contiguous, got strides {strides} for shape {shape}; call .contiguous()"
_STATE_FIX = "pass the buffers of one SampleState (fastsel.backends.base.state_args)"
_ROWS_FIX = "pass an epoch's EpochRows.args() (fastsel.rows.EpochRows(N))"
_LOGITS_DTYPES = "float32, float16 or bfloat16"

#: fault -> (exception, message template), in the order the checks run.
FAULTS = {
    # ce_step's inputs
    "logits_dim": (VALUE, "logits must be [batch, classes] or [batch, classes, d1, ..., dk], "
                          "got shape {shape}"),
    "logits_dtype": (TYPE, "logits must be " + _LOGITS_DTYPES + ", got {dtype}; cast with .float()"),
    "logits_classes": (VALUE, "logits must have at least one class (dim 1), got shape {shape}"),
    "logits_contiguous": (VALUE, _CONTIG),
    "target_dtype": (TYPE, "target must be int64 or int32 class indices, or " + _LOGITS_DTYPES
                           + " class probabilities, got {dtype}"),
    "target_probs_shape": (VALUE, "target holds class probabilities ({dtype}), so it must have the "
                                  "logits' shape {want}, got shape {shape}; class indices must be "
                                  "an int64 or int32 tensor"),
    "target_indices_shape": (VALUE, "target of class indices must have shape {want} (the logits' "
                                    "shape {logits} without the class dim), got shape {shape}"),
    "target_device": (VALUE, "target is on {device} but logits is on {want}; "
                             "move it with .to(logits.device)"),
    "target_contiguous": (VALUE, _CONTIG),
    # observe's inputs
    "losses_dim": (VALUE, "losses must be 1-D [batch] (one loss per sample: reduce other dims "
                          "first, e.g. .flatten(1).mean(1)), got shape {shape}"),
    "losses_dtype": (TYPE, "losses must be a floating dtype, got {dtype}"),
    "losses_contiguous": (VALUE, _CONTIG),
    "probs_dtype": (TYPE, "{name} must be a floating dtype, got {dtype}"),
    "probs_shape": (VALUE, "{name} must be 1-D with one entry per loss, shape {want}, "
                           "got shape {shape}"),
    "probs_device": (VALUE, "{name} is on {device} but losses is on {want}; "
                            "move it with .to(losses.device)"),
    "probs_contiguous": (VALUE, _CONTIG),
    # both: the rows' sample indices (``of``: logits or losses)
    "indices_dim": (VALUE, "indices must be 1-D [batch] (one sample index per row), got shape {shape}"),
    "indices_dtype": (TYPE, "indices must be int64 or int32, got {dtype}"),
    "indices_length": (VALUE, "indices has {length} entries but {of} has {batch} rows: "
                              "one sample index per row"),
    "indices_device": (VALUE, "indices is on {device} but {of} is on {want}; "
                              "move it with .to({of}.device)"),
    "indices_contiguous": (VALUE, _CONTIG),
    # ce_step's settings
    "class_weight_dtype": (TYPE, "class_weight must be float32, got {dtype}; cast with .float()"),
    "class_weight_shape": (VALUE, "class_weight must be 1-D with one entry per class, shape {want}, "
                                  "got shape {shape}"),
    "class_weight_device": (VALUE, "class_weight is on {device} but logits is on {want}; "
                                   "move it with .to(logits.device)"),
    "class_weight_contiguous": (VALUE, _CONTIG),
    "label_smoothing_range": (VALUE, "label_smoothing must be in [0, 1], got label_smoothing={value}"),
    # both: the settings
    "ema_range": (VALUE, "ema must be in (0, 1], got ema={value}"),
    "reduction_range": (VALUE, "reduction must be 0 (mean), 1 (sum) or 2 (none), the index in "
                               "fastsel.layout.REDUCTIONS, got reduction={value}"),
    # the state: buffers (N + 1 entries), then stats and errors (``of``: the inputs, or
    # state_loss when the state is checked on its own)
    "state_size": (VALUE, "state_loss must be 1-D with N + 1 >= 2 entries (N >= 1 samples and a "
                          "scratch slot), got shape {shape}; " + _STATE_FIX),
    "state_dtype": (TYPE, "{name} must be {want}, got {dtype}; " + _STATE_FIX),
    "state_length": (VALUE, "{name} must be 1-D with {length} entries (N + 1, as state_loss), "
                            "got shape {shape}; " + _STATE_FIX),
    "state_vector_length": (VALUE, "{name} must be 1-D with {length} entries (its slots in "
                                   "fastsel/layout.py), got shape {shape}; " + _STATE_FIX),
    "state_device": (VALUE, "{name} is on {device} but {of} is on {want}; "
                            "move the whole state with SampleState.to(device)"),
    "state_contiguous": (VALUE, "{name} must be contiguous, got strides {strides}; pass the "
                                "state's own buffers (SampleState.buffers()), not views"),
    # the epoch's rows
    "rows_together": (VALUE, "member and rows must be given together (an epoch's "
                             "EpochRows.args()) or both be None (every row counts); "
                             "got member {member} and rows {rows}"),
    "member_dtype": (TYPE, "member must be torch.uint8 (the epoch's selection as a mask), "
                           "got {dtype}; " + _ROWS_FIX),
    "member_length": (VALUE, "member must be 1-D with N + 1 = {length} entries (as long as the "
                             "state's buffers), got shape {shape}; " + _ROWS_FIX),
    "rows_dtype": (TYPE, "rows must be torch.int64 (the epoch's row counters), got {dtype}; "
                         + _ROWS_FIX),
    "rows_length": (VALUE, "rows must be 1-D with {length} entries (the slots ROW_* of "
                           "fastsel/layout.py), got shape {shape}; " + _ROWS_FIX),
    "rows_device": (VALUE, "{name} is on {device} but {of} is on {want}; "
                           "move the epoch's rows with EpochRows.to(device)"),
    "rows_contiguous": (VALUE, "{name} must be contiguous, got strides {strides}; " + _ROWS_FIX),
    "epoch_dtype": (TYPE, "epoch must be a 0-d torch.int64 tensor (fastsel.rows.EpochRows.epoch, "
                          "or torch.tensor(epoch)), got {dtype}"),
    "epoch_shape": (VALUE, "epoch must be a 0-d tensor (fastsel.rows.EpochRows.epoch, or "
                           "torch.tensor(epoch)), got shape {shape}"),
    "epoch_device": (VALUE, "epoch is on {device} but {of} is on {want}; "
                            "create it there: torch.tensor(epoch, device={of}.device)"),
    # read only where the epoch lives on the host (no sync): a CPU epoch tensor
    "epoch_range": (VALUE, "epoch must fit in int32 (the state's last_epoch), got epoch={value}"),
}


def fields(name: str) -> tuple:
    """The ``{field}`` names of fault ``name``'s template, in order of first use."""
    text, out = FAULTS[name][1], []
    while "{" in text:
        head, text = text.split("{", 1)
        field, text = text.split("}", 1)
        if field not in out:
            out.append(field)
    return tuple(out)


def message(which: str, /, **values: str) -> str:
    """Fault ``which``'s message, its fields filled with ``values`` (already text)."""
    return FAULTS[which][1].format(**values)


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def header() -> str:
    """The C++ header ``csrc/faults.h``: one ``constexpr Fault`` per fault (upper-case name)."""
    lines = ["// Generated from fastsel/validation/faults.py by `python fastsel/validation/faults.py`:",
             "// do not edit. checks.cpp fills the templates (each {field} with its text) and raises",
             "// the fault's exception type.",
             "#pragma once", "", "namespace fastsel {", "namespace faults {", "",
             "enum class Kind { Type, Value };", "",
             "struct Fault {", "  Kind kind;", "  const char* text;", "};", ""]
    kinds = {TYPE: "Kind::Type", VALUE: "Kind::Value"}
    for name, (exc, text) in FAULTS.items():
        lines.append(f"constexpr Fault {name.upper()}{{{kinds[exc]}, {_c_string(text)}}};")
    lines += ["", "}  // namespace faults", "}  // namespace fastsel", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "csrc", "faults.h")
    with open(path, "w") as f:
        f.write(header())
