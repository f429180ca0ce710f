"""fastsel.kernels: Triton kernels for the fused step and the selection pass.

Installed as ``fastsel.kernels`` (setuptools ``package_dir``). ``configs`` holds the block
sizes the launcher may choose (no Triton import). The ``@triton.jit`` kernels: the fused
step's rows kernels ``cross_entropy`` and ``observe``, its ``merge`` (duplicates, state
fold, totals), ``admit`` (which rows count) and ``scale_grad`` (backward); ``select`` and
``noise``. ``aot`` compiles them ahead of time for sm_80/sm_90 and reads their resource
usage. Importing this package does not import Triton.
"""
