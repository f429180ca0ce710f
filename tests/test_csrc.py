"""csrc/: the CUDA sources compile (nvcc, sm_80 and sm_90), the layout header is the one
fastsel/layout.py writes, the C++ kernels of ``torch.ops.fastsel.*_csrc`` refuse bad input
with clear errors, and their own edge cases match the reference ops.

The shared oracle suite (tests/test_backends.py) checks the "cpu" backend's semantics and
tests/test_ops_csrc.py checks the ops with ``torch.library.opcheck``; this file covers what
is specific to the extension.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import threading

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel import layout
from fastsel.backends import get_backend
from fastsel.backends.base import state_args
from fastsel.config import LossConfig
from fastsel.rows import EpochRows
from fastsel.state import SampleState
from fastsel.threads import SERIAL_MAX_N
from helpers import batch

try:
    from fastsel import _C
    import fastsel.backends.reference  # noqa: F401  (registers the *_reference ops)
except ImportError:
    _C = None
#: Tests of the built extension skip without it; test_cpu_backend_is_available fails instead,
#: so a build that silently produced no extension does not pass unnoticed.
needs_c = pytest.mark.skipif(_C is None, reason="fastsel._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
REDUCTION = {name: code for code, name in enumerate(layout.REDUCTIONS)}


def _nvcc():
    cands = [shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        cands.insert(0, os.path.join(home, "bin", "nvcc"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _cuda_include():
    """The CUDA toolkit's include dir (cuda_runtime_api.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _nvcc()
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for h in homes:
        if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime_api.h")):
            return os.path.join(h, "include")
    return None


# ---- the CUDA sources compile -------------------------------------------------------------

def test_there_are_cuda_sources():
    assert {"step_kernels.cu", "select_kernels.cu"} <= set(CU_FILES)


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles_for_sm80_and_sm90(name, tmp_path):
    """Every .cu needs only the CUDA runtime, so nvcc compiles it here, without a CUDA torch."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the real CUDA build adds
    cmd = [nvcc, "-c", "-std=c++20", "-O3", "--fmad=false", *COMMON_NVCC_FLAGS, f"-I{CSRC}",
           "-Xcompiler", "-Wall", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90",
           os.path.join(CSRC, name), "-o", str(tmp_path / (name + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / (name + ".o")).stat().st_size > 0


def test_cuda_glue_compiles_as_plain_cpp():
    """The torch glue of the CUDA build (c10/cuda's stream and guard: CUDA runtime headers
    only) is checked here for syntax and types against the CPU torch; it links only in a
    CUDA build."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h)")
    from torch.utils.cpp_extension import include_paths
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}",
                                                  f"-I{cuda_inc}"]
    defs = ["-DFASTSEL_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
    # A CPU build of torch ships c10/cuda's headers without the one CMake generates.
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in include_paths()):
        defs.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", *defs, *inc, os.path.join(CSRC, "cuda_glue.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


# ---- the layout header ----------------------------------------------------------------------

def test_committed_layout_header_is_generated_from_fastsel_layout():
    with open(os.path.join(CSRC, "layout.h")) as f:
        assert f.read() == layout.header(), "run `python fastsel/layout.py` (setup.py does before a build)"


def test_csrc_uses_layout_h_not_its_own_slot_numbers():
    for name in os.listdir(CSRC):
        if name == "layout.h" or not name.endswith((".cpp", ".cu", ".h", ".cuh")):
            continue
        with open(os.path.join(CSRC, name)) as f:
            text = f.read()
        for const in ("STAT_NONFINITE =", "ERR_INDEX_COUNT =", "ERR_LABEL_VALUE =", "STAT_EPOCH_LOSS ="):
            assert const not in text, f"{name} defines {const.split()[0]} itself; include layout.h"


# ---- setup.py -------------------------------------------------------------------------------

def _setup_namespace(monkeypatch):
    """setup.py's functions, without running setup()."""
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    ns = {"__name__": "fastsel_setup_under_test", "__file__": os.path.join(ROOT, "setup.py")}
    with open(os.path.join(ROOT, "setup.py")) as f:
        exec(compile(f.read(), "setup.py", "exec"), ns)
    return ns


def test_setup_regenerates_layout_header(monkeypatch, tmp_path):
    ns = _setup_namespace(monkeypatch)
    (tmp_path / "fastsel").mkdir()
    (tmp_path / "csrc").mkdir()
    with open(os.path.join(ROOT, "fastsel", "layout.py")) as f:
        src = f.read()
    (tmp_path / "fastsel" / "layout.py").write_text(src.replace("STAT_SIZE = 3", "STAT_SIZE = 7"))
    (tmp_path / "csrc" / "layout.h").write_text("stale")
    ns["ROOT"] = str(tmp_path)
    ns["write_layout_header"]()
    text = (tmp_path / "csrc" / "layout.h").read_text()
    assert "constexpr int STAT_SIZE = 7;" in text and text.startswith("// Generated from fastsel/layout.py")
    mtime = os.stat(tmp_path / "csrc" / "layout.h").st_mtime_ns
    ns["write_layout_header"]()  # unchanged: not rewritten (no rebuild)
    assert os.stat(tmp_path / "csrc" / "layout.h").st_mtime_ns == mtime


def test_setup_builds_cuda_only_with_toolkit_cuda_torch_and_switches(monkeypatch):
    from types import SimpleNamespace
    import torch.utils.cpp_extension as ce
    for var in ("FORCE_CUDA", "FASTSEL_SKIP_CUDA_BUILD", "FASTSEL_SKIP_EXT_BUILD"):
        monkeypatch.delenv(var, raising=False)
    ns = _setup_namespace(monkeypatch)
    want = ns["_want_cuda"]

    def fake_torch(cuda, gpu):
        return SimpleNamespace(__version__="2.13.0", version=SimpleNamespace(cuda=cuda),
                               cuda=SimpleNamespace(is_available=lambda: gpu))

    monkeypatch.setattr(ce, "CUDA_HOME", "/usr/local/cuda")
    assert want(fake_torch(None, False))[0] is False                 # CPU torch
    assert want(fake_torch("12.8", True))[0] is True                  # CUDA torch + GPU
    assert "FORCE_CUDA" in want(fake_torch("12.8", False))[1]         # no GPU: says how
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert want(fake_torch("12.8", False))[0] is True
    with pytest.raises(RuntimeError, match="CPU build"):
        want(fake_torch(None, False))
    monkeypatch.setenv("FASTSEL_SKIP_CUDA_BUILD", "1")
    assert want(fake_torch("12.8", True)) == (False, "FASTSEL_SKIP_CUDA_BUILD=1")
    monkeypatch.delenv("FASTSEL_SKIP_CUDA_BUILD")
    monkeypatch.setattr(ce, "CUDA_HOME", None)
    with pytest.raises(RuntimeError, match="toolkit"):
        want(fake_torch("12.8", True))
    monkeypatch.delenv("FORCE_CUDA")
    assert want(fake_torch("12.8", True))[0] is False

    # Here (a CPU torch): the CPU extension, from every .cpp but the CUDA glue.
    exts, cmd = ns["extensions"]()
    assert [e.name for e in exts] == ["fastsel._C"] and "build_ext" in cmd
    assert not any("cuda" in os.path.basename(src) for src in exts[0].sources)
    monkeypatch.setenv("FASTSEL_SKIP_EXT_BUILD", "1")
    assert ns["extensions"]() == ([], {})


# ---- the extension loads, or says why not; its kernels register in either order ------------

def test_cpu_backend_is_available_and_auto_picks_it():
    if os.environ.get("FASTSEL_SKIP_EXT_BUILD") == "1":
        pytest.skip("FASTSEL_SKIP_EXT_BUILD=1: built without the extension")
    assert fastsel.list_backends()["cpu"].startswith("available"), fastsel.list_backends()
    assert get_backend("auto", "cpu").name == "cpu"
    assert "cuda" in fastsel.list_backends()  # a one-line reason here: no CUDA build / no GPU


def test_import_works_without_the_extension():
    code = ("import sys; sys.modules['fastsel._C'] = None\n"
            "import fastsel\nfrom fastsel.backends import get_backend\n"
            "r = fastsel.list_backends()\nassert 'not importable' in r['cpu'], r\n"
            "assert '\\n' not in r['cpu']\n"
            "assert get_backend('auto', 'cpu').name == 'reference'\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@needs_c
@pytest.mark.parametrize("first", ["_C", "ops"])
def test_kernels_register_whichever_loads_first(first):
    """The schemas come from fastsel/ops.py only (C++ registers kernels, never a schema), so
    importing fastsel._C before or after fastsel.ops gives the same working ops."""
    imports = ["from fastsel import _C", "import fastsel.ops"]
    if first == "ops":
        imports.reverse()
    code = "\n".join(["import torch"] + imports + [
        "from fastsel.state import SampleState",
        "from fastsel.backends.base import state_args",
        "st = SampleState(4)",
        "x = torch.zeros(2, 3, requires_grad=True)",
        "out, grad, scale = torch.ops.fastsel.ce_step_csrc(x, torch.tensor([0, 2]),",
        "    torch.tensor([1, 1]), *state_args(st), None, -100, 0.0, 0.5, 0, False, True, True)",
        "assert abs(float(out) - 1.0986123) < 1e-6 and float(scale) == 1.0, (out, scale)",
        "assert int(st.seen[1]) == 2 and out.grad_fn is not None",
        "dump = torch._C._dispatch_dump('fastsel::ce_step_csrc')",
        "assert 'CPU: registered at' in dump and 'bindings.cpp' in dump, dump",
        "assert 'Autograd[alias]: registered at' in dump and 'autograd.cpp' in dump, dump",
        "assert 'ops.py' in dump.split('CPU:')[0], dump  # the schema's registration",
        "print('ok')"])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_csrc_defines_no_schema():
    for name in os.listdir(CSRC):
        if name.endswith((".cpp", ".cu", ".h")):
            with open(os.path.join(CSRC, name)) as f:
                text = f.read()
            assert "TORCH_LIBRARY(" not in text and "m.def(\"ce_step" not in text, name


# ---- C++ input checks -----------------------------------------------------------------------

STEP_ARGS = ["logits", "target", "indices", "loss", "loss_var", "p_true", "seen", "last_epoch",
             "weight", "stats", "errors", "member", "rows", "epoch", "class_weight", "ignore_index",
             "label_smoothing", "ema", "reduction", "strict", "update", "need_grad"]


def _step(x, y, i, state=None, impl="csrc", **over):
    """torch.ops.fastsel.ce_step_<impl> with defaults (mean, strict, update, need_grad), any
    argument replaced by name."""
    state = state or SampleState(50)
    args = [x, y, i, *state_args(state), None, -100, 0.0, 0.1, REDUCTION["mean"], True, True, True]
    for k, v in over.items():
        args[STEP_ARGS.index(k)] = v
    return getattr(torch.ops.fastsel, f"ce_step_{impl}")(*args)


@needs_c
@pytest.mark.parametrize("case,match", [
    ("logits_dtype", r"logits must be float32, float16 or bfloat16, got torch.float64; cast with .float\(\)"),
    ("logits_1d", r"logits must be \[batch, classes\] or \[batch, classes, d1, ..., dk\], got shape \(8,\)"),
    ("logits_noncontig", r"logits must be contiguous, got strides \(1, 8\) for shape \(8, 5\); call .contiguous\(\)"),
    ("target_dtype", "target must be int64 or int32 class indices, or float32, float16 or bfloat16 class "
                     "probabilities, got torch.bool"),
    ("target_len", r"target of class indices must have shape \(8,\) \(the logits' shape \(8, 5\) without"),
    ("target_kdim", r"target of class indices must have shape \(8, 3\) .*got shape \(8, 4\)"),
    ("soft_shape", r"target holds class probabilities \(torch.float32\), so it must have the logits' shape \(8, 5\), got shape \(8, 4\)"),
    ("soft_dtype", r"target must be int64 or int32 class indices, or float32, float16 or bfloat16 class probabilities, got torch.float64"),
    ("target_noncontig", "target must be contiguous"),
    ("indices_2d", r"indices must be 1-D \[batch\] \(one sample index per row\), got shape \(2, 4\)"),
    ("indices_dtype", "indices must be int64 or int32, got torch.float32"),
    ("indices_len", "indices has 7 entries but logits has 8 rows"),
    ("indices_noncontig", "indices must be contiguous"),
    ("class_weight", r"class_weight must be 1-D with one entry per class, shape \(5,\), got shape \(4,\)"),
    ("reduction", r"reduction must be 0 \(mean\), 1 \(sum\) or 2 \(none\), .* got reduction=7"),
    ("smoothing", r"label_smoothing must be in \[0, 1\], got label_smoothing=1.5"),
    ("ema", r"ema must be in \(0, 1\], got ema=0.0"),
    ("epoch", "epoch must fit in int32"),
    ("epoch_dtype", r"epoch must be a 0-d torch.int64 tensor \(fastsel.rows.EpochRows.epoch, or torch.tensor\(epoch\)\), "
                    "got torch.int32"),
    ("member_alone", r"member and rows must be given together \(an epoch's EpochRows.args\(\)\)"),
    ("member_size", r"member must be 1-D with N \+ 1 = 51 entries"),
    ("rows_dtype", r"rows must be torch.int64 \(the epoch's row counters\), got torch.float32"),
    ("zero_classes", r"at least one class \(dim 1\), got shape \(8, 0\)"),
])
def test_step_refuses_bad_arguments_clearly(case, match):
    x, y, i = batch(0, 8, 5, 50, scale=1.0)
    st = SampleState(50)
    before = {k: v.clone() for k, v in st.buffers().items()}
    over = {
        "logits_dtype": {"logits": x.double()},
        "logits_1d": {"logits": x[:, 0].contiguous()},
        "logits_noncontig": {"logits": torch.randn(5, 8).t()},
        "target_dtype": {"target": y > 0},
        "target_len": {"target": y[:7]},
        "target_kdim": {"logits": torch.randn(8, 5, 3), "target": torch.zeros(8, 4, dtype=torch.long)},
        "soft_shape": {"target": torch.rand(8, 4)},
        "soft_dtype": {"target": torch.rand(8, 5, dtype=torch.float64)},
        "target_noncontig": {"logits": torch.randn(8, 5, 2),
                             "target": torch.zeros(2, 8, dtype=torch.long).t()},
        "indices_2d": {"indices": i.view(2, 4)},
        "indices_dtype": {"indices": i.float()},
        "indices_len": {"indices": i[:7]},
        "indices_noncontig": {"indices": torch.arange(16)[::2]},
        "class_weight": {"class_weight": torch.ones(4)},
        "reduction": {"reduction": 7},
        "smoothing": {"label_smoothing": 1.5},
        "ema": {"ema": 0.0},
        "epoch": {"epoch": torch.tensor(2 ** 40)},
        "epoch_dtype": {"epoch": torch.tensor(3, dtype=torch.int32)},
        "member_alone": {"member": torch.ones(51, dtype=torch.uint8)},
        "member_size": {"member": torch.ones(50, dtype=torch.uint8), "rows": EpochRows(50).counts},
        "rows_dtype": {"member": EpochRows(50).member, "rows": torch.zeros(layout.ROW_SIZE)},
        "zero_classes": {"logits": torch.zeros(8, 0)},
    }[case]
    with pytest.raises((TypeError, ValueError), match=match):
        _step(x, y, i, state=st, **over)
    for k, v in st.buffers().items():
        assert torch.equal(v, before[k]), k
    assert int(st.errors.abs().sum()) == 0 and float(st.stats.abs().sum()) == 0


@needs_c
@pytest.mark.parametrize("case,match", [
    ("loss_size", r"state_loss_var must be 1-D with 51 entries \(N \+ 1, as state_loss\), got shape \(50,\)"),
    ("seen_dtype", "state_seen must be torch.int32, got torch.float32"),
    ("noncontig", r"state_p_true must be contiguous, got strides \(2,\); pass the state's own buffers"),
    ("stats", r"stats must be torch.float64, got torch.float32"),
    ("errors", r"errors must be 1-D with 4 entries \(its slots in fastsel/layout.py\)"),
    ("too_short", r"state_loss must be 1-D with N \+ 1 >= 2 entries .* got shape \(1,\)"),
    ("loss_2d", r"state_loss must be 1-D with N \+ 1 >= 2 entries .* got shape \(51, 1\)"),
])
def test_check_state_and_the_ops_refuse_a_malformed_state(case, match):
    """fastsel._C.check_state checks a state once (when bound or moved); an op given a state
    that does not fit raises the same message instead of writing out of bounds."""
    st = SampleState(50)
    args = list(state_args(st))
    names = ["loss", "loss_var", "p_true", "seen", "last_epoch", "weight", "stats", "errors"]
    bad = {"loss_size": ("loss_var", torch.zeros(50)), "seen_dtype": ("seen", torch.zeros(51)),
           "noncontig": ("p_true", torch.zeros(102)[::2]), "stats": ("stats", torch.zeros(3)),
           "errors": ("errors", torch.zeros(3, dtype=torch.long)),
           "too_short": ("loss", torch.zeros(1)), "loss_2d": ("loss", torch.zeros(51, 1))}[case]
    args[names.index(bad[0])] = bad[1]
    _C.check_state(*state_args(st))  # a good state passes, with its epoch's rows too
    _C.check_state(*state_args(st, 3, EpochRows(50)))
    with pytest.raises((TypeError, ValueError), match=match):
        _C.check_state(*args)
    x, y, i = batch(0, 8, 5, 50, scale=1.0)
    with pytest.raises((TypeError, ValueError), match=match):
        torch.ops.fastsel.ce_step_csrc(x, y, i, *args, None, -100, 0.0, 0.1, 0, False, True, True)
    with pytest.raises((TypeError, ValueError), match=match):
        torch.ops.fastsel.observe_csrc(torch.rand(8), None, i, *args, 0.1, 0, False, True)


@needs_c
def test_check_state_checks_the_rows_given_with_it():
    st = SampleState(50)
    with pytest.raises(ValueError, match=r"member must be 1-D with N \+ 1 = 51 entries"):
        _C.check_state(*state_args(st, 0, EpochRows(49)))
    with pytest.raises(ValueError, match=r"epoch must be a 0-d tensor .* got shape \(1,\)"):
        _C.check_state(*state_args(st, torch.tensor([0]), EpochRows(50)))


@needs_c
def test_observe_refuses_bad_arguments_clearly():
    st = SampleState(50)
    i = torch.arange(4)

    def obs(losses, probs=None, indices=i, reduction=0):
        return torch.ops.fastsel.observe_csrc(losses, probs, indices, *state_args(st), 0.1, reduction, True, True)
    with pytest.raises(ValueError, match=r"losses must be 1-D \[batch\] .*got shape \(4, 1\)"):
        obs(torch.rand(4, 1))
    with pytest.raises(TypeError, match="losses must be a floating dtype, got torch.int64"):
        obs(torch.arange(4))
    with pytest.raises(ValueError, match=r"probs must be 1-D with one entry per loss, shape \(4,\), got shape \(3,\)"):
        obs(torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match="indices has 3 entries but losses has 4 rows"):
        obs(torch.rand(4), indices=i[:3])
    with pytest.raises(ValueError, match="reduction must be"):
        obs(torch.rand(4), reduction=3)
    with pytest.raises(IndexError, match=r"indices: 1 sample index\(es\) outside \[0, 50\), e.g. 50"):
        obs(torch.rand(4), indices=torch.tensor([0, 50, 1, 2]))
    assert int(st.seen.sum()) == 0 and float(st.stats.abs().sum()) == 0


@needs_c
def test_select_uniform_shuffle_refuse_bad_arguments():
    ops = torch.ops.fastsel
    with pytest.raises(RuntimeError, match=r"keys must be float32, got Double \(cast with .float\(\)\)"):
        ops.select_csrc(torch.zeros(4, dtype=torch.float64), 2)
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        ops.select_csrc(torch.zeros(4, 2), 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 4\] \(the number of keys\), got 5"):
        ops.select_csrc(torch.zeros(4), 5)
    with pytest.raises(RuntimeError, match="idx must be int64 or int32"):
        ops.uniform_csrc(torch.zeros(4), 1, 1)
    with pytest.raises(RuntimeError, match="chosen must be a contiguous 1-D"):
        ops.shuffle_csrc(torch.zeros(2, 2, dtype=torch.long), 1)


# ---- edge cases of the C++ kernels against the reference ops -------------------------------

def _both(logits, target, indices, n=50, weight=None, grad_out=None, **over):
    """(out, d(out)/d(logits) through autograd, state) from the reference and csrc ops."""
    res = {}
    for impl in ("reference", "csrc"):
        st = SampleState(n)
        if weight is not None:
            st.weight.copy_(weight)
        x = logits.clone().requires_grad_(True)
        out = _step(x, target, indices, st, impl, **over)[0]
        out.backward(grad_out if grad_out is not None else torch.ones_like(out))
        res[impl] = (out.detach(), x.grad, st.state_dict())
    return res["reference"], res["csrc"]


def _assert_states(a, b):
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)


@needs_c
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nonfinite_rows_match_reference_including_gradients(reduction):
    """-inf off the label (finite), -inf on the label (inf), +inf / NaN / all -inf rows (NaN),
    also on ignored rows: loss, gradient (NaN where the reference's is) and state agree."""
    x, y, i = batch(0, 12, 6, 50, scale=1.0)
    y[5] = -100
    y[6] = -100
    i = torch.arange(12)
    x[0, (y[0] + 1) % 6] = float("-inf")
    x[1, y[1]] = float("-inf")
    x[2, 3] = float("inf")
    x[3, 1] = float("nan")
    x[4] = float("-inf")
    x[5, 2] = float("nan")  # ignored row with a NaN
    x[6, 0] = float("-inf")  # ignored row, finite max
    for smoothing in (0.0, 0.2):
        (lr, gr, sr), (lc, gc, sc) = _both(x, y, i, label_smoothing=smoothing, strict=False,
                                           reduction=REDUCTION[reduction])
        torch.testing.assert_close(lc, lr, equal_nan=True)
        torch.testing.assert_close(gc, gr, equal_nan=True)
        _assert_states(sr, sc)


@needs_c
def test_extreme_logits_and_wide_rows():
    """Large ranges exercise the vectorised exp (its underflow and range reduction)."""
    g = torch.Generator().manual_seed(1)
    b, c = 64, 3001
    x = torch.randn(b, c, generator=g) * 40.0
    x[::3] -= 1e4
    x[1::3, ::7] = -1e30
    y = torch.randint(0, c, (b,), generator=g)
    i = torch.randint(0, 50, (b,), generator=g)
    w = torch.rand(c, generator=g) + 0.1
    for over in ({}, {"label_smoothing": 0.1, "class_weight": w}):
        (lr, gr, sr), (lc, gc, sc) = _both(x, y, i, **over)
        torch.testing.assert_close(lc, lr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, gr, rtol=1e-5, atol=1e-6)
        _assert_states(sr, sc)


@needs_c
def test_int32_inputs_single_class_and_empty_batch():
    x, y, i = batch(0, 9, 1, 50, scale=1.0)
    (lr, gr, sr), (lc, gc, sc) = _both(x, y.int(), i.int(), label_smoothing=0.1)
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)
    _assert_states(sr, sc)
    # An empty batch, 2-D and K-dim, hard and soft.
    for shape in ((0, 4), (0, 4, 3)):
        for soft in (False, True):
            for reduction in ("mean", "sum", "none"):
                st = SampleState(50)
                x0 = torch.zeros(shape, requires_grad=True)
                t = torch.zeros(shape) if soft else torch.zeros((0,) + shape[2:], dtype=torch.long)
                out = _step(x0, t, torch.zeros(0, dtype=torch.long), st, reduction=REDUCTION[reduction])[0]
                ref = F.cross_entropy(torch.zeros(shape), t, reduction=reduction)
                torch.testing.assert_close(out, ref, equal_nan=True)
                out.sum().backward()
                assert x0.grad.shape == shape
                assert int(st.seen.sum()) == 0


@needs_c
def test_noncontiguous_inputs_through_the_backend_and_policy_weights_with_per_row_grad():
    """The op takes contiguous tensors (refused above otherwise); the backend makes them so."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 33, generator=g).t()  # [33, 10], not contiguous
    y = torch.randint(0, 10, (33,), generator=g)
    i = torch.randint(0, 20, (33,), generator=g)
    w = torch.rand(20, generator=g) * 2
    go = torch.randn(33, generator=g)
    (lr, gr, _), (lc, gc, _) = _both(x.contiguous(), y, i, n=20, weight=w, grad_out=go, reduction=2)
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)
    st = SampleState(20)
    st.weight.copy_(w)
    xb = x.clone().requires_grad_(True)
    out = get_backend("cpu", "cpu").step(xb, y, i, st, LossConfig(reduction="none"), 0)
    out.backward(go)
    torch.testing.assert_close(out.detach(), lc)
    torch.testing.assert_close(xb.grad, gc)


@needs_c
def test_backward_twice_with_retain_graph_and_scaled_grad_output():
    x, y, i = batch(0, 16, 7, 50, scale=1.0)
    grads = {}
    for impl in ("reference", "csrc"):
        xr = x.clone().requires_grad_(True)
        loss = _step(xr, y, i, SampleState(50), impl)[0]
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        (loss * 3.0).backward()
        grads[impl] = xr.grad
    torch.testing.assert_close(grads["csrc"], grads["reference"])
    xf = x.clone().requires_grad_(True)
    F.cross_entropy(xf, y).backward()
    torch.testing.assert_close(grads["csrc"], 5.0 * xf.grad)


@needs_c
def test_no_grad_step_updates_state_only():
    x, y, i = batch(0, 8, 5, 50, scale=1.0)
    st_r, st_c = SampleState(50), SampleState(50)
    with torch.no_grad():
        lr, gr, _ = _step(x, y, i, st_r, "reference", need_grad=False)
        lc, gc, sc = _step(x, y, i, st_c, need_grad=False)
    torch.testing.assert_close(lc, lr)
    assert gc.shape == (0,) and gc.dtype == x.dtype and float(sc) == 1.0
    _assert_states(st_r.state_dict(), st_c.state_dict())


@needs_c
@pytest.mark.parametrize("kdim", [False, True])
def test_strict_error_message_equals_reference(kdim):
    """Raised from inside the op, as IndexError, with fastsel.validation.tensors.raise_for_errors's words;
    nothing written."""
    x, y, i = batch(0, 8, 5, 50, scale=1.0)
    if kdim:
        x = torch.randn(8, 5, 3)
        y = torch.randint(0, 5, (8, 3))
    for bad in ("index", "label", "both"):
        ii, yy = i.clone(), y.clone()
        if bad in ("index", "both"):
            ii[3] = 99
            ii[5] = -4
        if bad in ("label", "both"):
            yy[2] = 5
            yy[6] = -7
        msgs = []
        for impl in ("reference", "csrc"):
            st = SampleState(50)
            with pytest.raises(IndexError) as ei:
                _step(x.clone().requires_grad_(True), yy, ii, st, impl)
            assert int(st.seen.sum()) == 0 and float(st.stats.abs().sum()) == 0
            assert int(st.errors.abs().sum()) == 0
            msgs.append(str(ei.value))
        assert msgs[0] == msgs[1], msgs
        n_labels = 6 if kdim else 2  # a K-dim row holds 3 bad elements: each counts
        assert msgs[1].startswith("indices: 2 sample index(es) outside [0, 50), e.g. 99" if bad != "label"
                                  else f"labels: {n_labels} label(s) outside [0, 5) and not ignore_index, e.g. 5")


@needs_c
def test_deferred_errors_accumulate_like_reference():
    x, y, i = batch(0, 8, 5, 50, scale=1.0)
    for r, (bi, bl) in enumerate([(60, None), (-5, 9), (None, -2)]):
        if bi is not None:
            i[r] = bi
        if bl is not None:
            y[r + 3] = bl
    errs = []
    for impl in ("reference", "csrc"):
        st = SampleState(50)
        for update in (True, False):  # recorded with or without a state update
            _step(x, y, i, st, impl, strict=False, update=update)
        errs.append(st.errors.clone())
    assert torch.equal(errs[0], errs[1]), errs
    assert errs[1].tolist() == [4, 60, 4, 9]


@needs_c
@pytest.mark.parametrize("n", [1, 7, 2049, 70000, 300001])
def test_select_edge_keys_equal_reference(n):
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(n, generator=g)
    pick = torch.rand(n, generator=g)
    keys[pick < 0.1] = float("nan")
    keys[(pick >= 0.1) & (pick < 0.15)] = float("-inf")
    keys[(pick >= 0.15) & (pick < 0.2)] = float("inf")
    keys[(pick >= 0.2) & (pick < 0.25)] = 0.0
    keys[(pick >= 0.25) & (pick < 0.3)] = -0.0
    keys[(pick >= 0.3) & (pick < 0.4)] = 1.5
    ops = torch.ops.fastsel
    for k in sorted({0, 1, n // 10, n // 2, n - 1, n}):
        assert torch.equal(ops.select_csrc(keys, k), ops.select_reference(keys, k)), k
    ref, cpu = get_backend("reference", "cpu"), get_backend("cpu", "cpu")
    assert torch.equal(cpu.select(keys, n + 5), ref.select(keys, n + 5))
    assert torch.equal(cpu.select(keys.double(), n // 2), ref.select(keys.double(), n // 2))


@needs_c
def test_shuffle_and_uniform_dtypes_and_sizes():
    ops = torch.ops.fastsel
    g = torch.Generator().manual_seed(5)
    for m in (0, 1, 5000, 200000):
        chosen = torch.randperm(max(m, 1) * 3, generator=g)[:m]
        for dt in (torch.int64, torch.int32):
            c = chosen.to(dt)
            assert torch.equal(ops.shuffle_csrc(c, 2**40 + 17), ops.shuffle_reference(c, 2**40 + 17))
    idx = torch.tensor([0, 1, 2**31 - 1, 2**32 + 5, -1, -(2**40)])
    for key, stream in ((0, 0), (2**31 - 2, 3), (2**45 + 1, -2)):
        assert torch.equal(ops.uniform_csrc(idx, key, stream), ops.uniform_reference(idx, key, stream))
        assert torch.equal(ops.uniform_csrc(idx.int()[:3], key, stream),
                           ops.uniform_reference(idx.int()[:3], key, stream))


@needs_c
@pytest.mark.parametrize("policy", ["uniform", "tftb", "p-sgd"])
def test_sampler_runs_identically_on_cpu_and_reference(policy):
    """A small training loop: the same selections, losses and state with either backend."""
    n, c = 300, 10
    g = torch.Generator().manual_seed(7)
    data = torch.randn(n, 16, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    runs = {}
    for name in ("reference", "cpu"):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, c)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = fastsel.Sampler(n, policy=policy, budget=0.4, epochs=4, seed=3, backend=name)
        seen, losses = [], []
        for _ in s.epochs():
            order = list(iter(s))
            seen.append(order)
            for k in range(0, len(order), 32):
                idx = torch.tensor(order[k:k + 32])
                loss = s.loss(model(data[idx]), target[idx], idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        runs[name] = (seen, losses, s.state.state_dict())
    assert runs["cpu"][0] == runs["reference"][0]
    torch.testing.assert_close(torch.tensor(runs["cpu"][1]), torch.tensor(runs["reference"][1]),
                               rtol=1e-4, atol=1e-5)
    _assert_states(runs["reference"][2], runs["cpu"][2])


# ---- the selection pass stays on the calling thread ----------------------------------------

#: Whether the extension can limit ATen's threads per thread (it is built with OpenMP, as
#: setup.py does on Linux when torch uses OpenMP).
LOCAL_THREADS = sys.platform.startswith("linux") and torch.backends.openmp.is_available()


@needs_c
def test_set_local_num_threads_changes_only_the_calling_thread():
    before = torch.get_num_threads()
    previous = _C.set_local_num_threads(1)
    try:
        assert previous == before
        other = []
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert other == [before]
        if LOCAL_THREADS:
            assert torch.get_num_threads() == 1
    finally:
        _C.set_local_num_threads(previous)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="n must be >= 1, got 0"):
        _C.set_local_num_threads(0)


class _ThreadProbe(fastsel.policies.Policy):
    """Uniform selection that records ATen's threads during the pass (and can fail)."""

    name = "thread-probe"

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.threads = None

    def select(self, ctx):
        self.threads = torch.get_num_threads()
        if self.fail:
            raise RuntimeError("probe failed")
        return self.uniform_selection(ctx)


@needs_c
@pytest.mark.parametrize("n", [50_000, SERIAL_MAX_N + 1])
def test_cpu_selection_pass_runs_on_the_calling_thread_up_to_serial_max_n(n):
    before = torch.get_num_threads()
    probe = _ThreadProbe()
    fastsel.Sampler(n, policy=probe, budget=0.5, epochs=1).epoch_indices()
    alone = LOCAL_THREADS and n <= SERIAL_MAX_N
    assert probe.threads == (1 if alone else before)
    assert torch.get_num_threads() == before
    failing = fastsel.Sampler(n, policy=_ThreadProbe(fail=True), budget=0.5, epochs=1)
    with pytest.raises(RuntimeError, match="probe failed"):
        failing.epoch_indices()
    assert torch.get_num_threads() == before


@needs_c
@pytest.mark.parametrize("policy", ["uniform", "tftb", "p-sgd", "infobatch"])
def test_selection_at_moderate_n_equals_reference(policy):
    """N = 50,000 (ATen would split its ops over threads; the pass keeps them on one): the
    same selection from either backend, drawn from the same trained-looking state."""
    n = 50_000
    g = torch.Generator().manual_seed(11)
    loss, var, p = torch.rand(n, generator=g) * 3, torch.rand(n, generator=g), torch.rand(n, generator=g)
    seen = (torch.rand(n, generator=g) < 0.9).int() * torch.randint(1, 4, (n,), generator=g, dtype=torch.int32)
    drawn = {}
    for name in ("reference", "cpu"):
        s = fastsel.Sampler(n, policy=policy, budget=0.3, epochs=4, seed=2, backend=name)
        st = s.state
        for buf, value in ((st.loss, loss), (st.loss_var, var), (st.p_true, p), (st.seen, seen)):
            buf.copy_(value)
        s.set_epoch(1)
        drawn[name] = (s.epoch_indices(), s.state.weight.clone())
    assert drawn["cpu"][0] == drawn["reference"][0]
    assert torch.equal(drawn["cpu"][1], drawn["reference"][1])
