"""fastsel's build: the Python package, ``kernels/`` installed as ``fastsel.kernels``, and
the optional C++/CUDA extension ``fastsel._C`` from ``csrc/`` once it has sources.

torch is needed at build time only for the extension; it is never declared as a dependency
(a range would let pip fetch a CUDA build of several GB). Build with
``pip install --no-build-isolation .`` so the torch already installed is used.
"""
import glob
import os

from setuptools import setup

PACKAGES = ["fastsel", "fastsel.backends", "fastsel.policies", "fastsel.kernels"]


def extensions():
    """The csrc/ extension when it has C++ sources and torch is importable, else none."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("FASTSEL_SKIP_EXT_BUILD") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    ext = CppExtension("fastsel._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_dir={"fastsel.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
