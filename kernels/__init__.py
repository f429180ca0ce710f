"""fastsel.kernels: Triton kernels for the fused step and the selection pass.

Installed as ``fastsel.kernels`` (setuptools ``package_dir``). The kernels arrive with the
Triton backend; until then ``fastsel.backends()`` reports it as not implemented.
"""
