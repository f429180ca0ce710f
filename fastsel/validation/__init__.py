"""Every check of what a user hands fastsel, in one place and one message format:
"<what> must be <requirement>, got <value>[; <fix>]".

* ``values``: constructor and call arguments that are plain numbers (``check_int``,
  ``check_real``), and the one rounding rule of every count (``round_half_up``);
* ``fields``: the fields of a loaded ``state_dict`` (each message ends with ``FIX``);
* ``tensors``: the tensors of a loss call, checked before anything is computed or written.
"""
