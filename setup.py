"""fastsel's build: the Python package (its Triton kernels in ``fastsel/kernels/``), and
the optional C++/CUDA extension ``fastsel._C`` from ``csrc/``.

torch is needed at build time only for the extension; it is never declared as a dependency
(a range would let pip fetch a CUDA build of several GB). Build with
``pip install --no-build-isolation .`` so the torch already installed is used.

What gets built (``fastsel.list_backends()`` says at run time what loaded):

* ``csrc/*.cpp`` (except ``cuda_*.cpp``): the CPU extension, whenever torch is importable.
* ``csrc/*.cu`` and ``csrc/cuda_*.cpp`` as well, only where a CUDA toolkit (``CUDA_HOME``)
  AND a CUDA build of torch exist, and torch sees a GPU or ``FORCE_CUDA=1`` (build
  machines without a GPU). The architectures come from ``TORCH_CUDA_ARCH_LIST``
  (e.g. ``"8.0;9.0"``), read by torch's ``BuildExtension``.

Before the extension is built, ``csrc/layout.h`` is regenerated from ``fastsel/layout.py``
(the one definition of the state's layout) and ``csrc/faults.h`` from
``fastsel/validation/faults.py`` (the one table of the ops' argument faults).

Switches: ``FASTSEL_SKIP_EXT_BUILD=1`` builds no extension (pure Python, reference backend
only); ``FASTSEL_SKIP_CUDA_BUILD=1`` builds the CPU extension only; ``FORCE_CUDA=1``
builds the CUDA part without a visible GPU (an error if torch is a CPU build).
"""
import glob
import os
import runpy
import sys

from setuptools import setup

PACKAGES = ["fastsel", "fastsel.backends", "fastsel.policies", "fastsel.batch_policies",
            "fastsel.experiments", "fastsel.kernels", "fastsel.validation"]
ROOT = os.path.dirname(os.path.abspath(__file__))


def _write_header(module, name):
    """Regenerate ``csrc/<name>`` from ``module``'s ``header()`` (plain Python, so it runs
    before torch or fastsel is importable). The file is rewritten only when its text
    changes, so an unchanged definition rebuilds nothing."""
    header = runpy.run_path(os.path.join(ROOT, *module))["header"]()
    path = os.path.join(ROOT, "csrc", name)
    try:
        with open(path) as f:
            if f.read() == header:
                return
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(header)


def write_layout_header():
    """``csrc/layout.h`` from ``fastsel/layout.py``, the one definition of the state's layout."""
    _write_header(("fastsel", "layout.py"), "layout.h")


def write_faults_header():
    """``csrc/faults.h`` from ``fastsel/validation/faults.py``, the one table of the ops'
    argument faults (exception type and message template)."""
    _write_header(("fastsel", "validation", "faults.py"), "faults.h")


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda(torch):
    """(build the CUDA part?, why not) from the switches, torch and the toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME
    if _flag("FASTSEL_SKIP_CUDA_BUILD"):
        return False, "FASTSEL_SKIP_CUDA_BUILD=1"
    force = _flag("FORCE_CUDA")
    if torch.version.cuda is None:
        if force:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch "
                               f"({torch.__version__}) is a CPU build")
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        if force:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit (CUDA_HOME) found"
    if not (force or torch.cuda.is_available()):
        return False, "no GPU visible to torch (set FORCE_CUDA=1 to build anyway)"
    return True, ""


def extensions():
    """The csrc/ extension when it has C++ sources and torch is importable, else none."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cpu_sources = [s for s in cpp if not os.path.basename(s).startswith("cuda_")]
    if not cpu_sources or _flag("FASTSEL_SKIP_EXT_BUILD"):
        return [], {}
    write_layout_header()
    write_faults_header()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastsel: torch is not importable at build time: building without fastsel._C "
              "(install torch first and build with --no-build-isolation)", file=sys.stderr)
        return [], {}
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"] if os.name != "nt" else ["/O2"]
    link = []
    # at::parallel_for runs serially unless the extension itself is compiled with OpenMP
    # (ATen's OpenMP backend is header code); the libgomp torch has loaded is then shared.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if sys.platform.startswith("linux"):
        # A toolchain that links libstdc++ statically, under a Python whose LDSHARED has
        # -Bsymbolic-functions (Debian, Ubuntu), would bind our copy's functions to the
        # process's libstdc++ data: formatting a number in an error message then crashed.
        # Keeping archive symbols private binds such a copy wholly to itself.
        link.append("-Wl,--exclude-libs,ALL")
    cuda, why = _want_cuda(torch)
    if cuda:
        glue = [s for s in cpp if os.path.basename(s).startswith("cuda_")]
        kernels = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension("fastsel._C", cpu_sources + glue + kernels,
                            define_macros=[("FASTSEL_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
                            extra_link_args=link)
    else:
        print(f"fastsel: building fastsel._C for the CPU only ({why})", file=sys.stderr)
        ext = CppExtension("fastsel._C", cpu_sources, extra_compile_args=cxx, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
