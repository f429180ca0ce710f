"""csrc/: the CUDA sources compile (nvcc, sm_80 and sm_90), the C++ ops refuse bad input with
clear errors, and the CPU extension's own edge cases match the reference backend.

The shared oracle suite (tests/test_backends.py) checks the "cpu" backend's semantics; this
file covers what is specific to the extension.
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
from fastsel.backends import get_backend
from fastsel.backends.cpu import REDUCTION_CODES, step_args
from fastsel.config import LossConfig
from fastsel.state import SampleState
from fastsel.threads import SERIAL_MAX_N

try:
    from fastsel import _C
except ImportError:
    _C = None
#: Tests of the built extension skip without it; test_cpu_backend_is_available fails instead,
#: so a build that silently produced no extension does not pass unnoticed.
needs_c = pytest.mark.skipif(_C is None, reason="fastsel._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


def _nvcc():
    cands = [shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        cands.insert(0, os.path.join(home, "bin", "nvcc"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


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
    """The torch glue of the CUDA build includes no CUDA header, so its syntax and types are
    checked here against the CPU torch (it links only in a CUDA build)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-DFASTSEL_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_C", *inc, os.path.join(CSRC, "cuda_glue.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


# ---- setup.py's switches ------------------------------------------------------------------

def _setup_namespace(monkeypatch):
    """setup.py's functions, without running setup()."""
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    ns = {"__name__": "fastsel_setup_under_test", "__file__": os.path.join(ROOT, "setup.py")}
    with open(os.path.join(ROOT, "setup.py")) as f:
        exec(compile(f.read(), "setup.py", "exec"), ns)
    return ns


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


# ---- the extension loads, or says why not -------------------------------------------------

def test_cpu_backend_is_available_and_auto_picks_it():
    if os.environ.get("FASTSEL_SKIP_EXT_BUILD") == "1":
        pytest.skip("FASTSEL_SKIP_EXT_BUILD=1: built without the extension")
    assert fastsel.backends()["cpu"].startswith("available"), fastsel.backends()
    assert get_backend("auto", "cpu").name == "cpu"
    assert "cuda" in fastsel.backends()  # a one-line reason here: no CUDA build / no GPU


def test_import_works_without_the_extension():
    code = ("import sys; sys.modules['fastsel._C'] = None\n"
            "import fastsel\nfrom fastsel.backends import get_backend\n"
            "r = fastsel.backends()\nassert 'not importable' in r['cpu'], r\n"
            "assert '\\n' not in r['cpu']\n"
            "assert get_backend('auto', 'cpu').name == 'reference'\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---- C++ input checks ---------------------------------------------------------------------

def _call(x, y, i, state=None, cfg=None, **over):
    state = state or SampleState(50)
    cfg = cfg or LossConfig()
    args = list(step_args(x, y, i, state, cfg))
    names = ["logits", "labels", "indices", "loss", "loss_var", "p_true", "seen", "last_epoch",
             "weight", "stats", "errors", "class_weight", "n", "ignore_index", "label_smoothing",
             "ema", "reduction", "strict"]
    for k, v in over.items():
        args[names.index(k)] = v
    return _C.step(*args, 0, True)


def _batch(b=8, c=5, n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g), \
        torch.randint(0, n, (b,), generator=g)


@needs_c
@pytest.mark.parametrize("case,match", [
    ("logits_dtype", "logits must be float32, float16 or bfloat16"),
    ("logits_1d", "logits must be 2-D"),
    ("logits_noncontig", "logits must be contiguous"),
    ("logits_meta", "logits must be on the CPU"),
    ("labels_dtype", "labels must be int64 or int32"),
    ("labels_len", "labels has 7 entries but logits has 8 rows"),
    ("indices_2d", "indices must be 1-D"),
    ("indices_noncontig", "indices must be contiguous"),
    ("indices_device", "indices is on meta"),
    ("state_size", "state buffer 'loss' must be 1-D with 51 entries"),
    ("state_dtype", "state buffer 'seen' must be Int"),
    ("class_weight", "class_weight must be a contiguous float32 vector of 5 entries"),
    ("reduction", "reduction code"),
    ("zero_classes", "at least one class"),
])
def test_step_refuses_bad_arguments_clearly(case, match):
    x, y, i = _batch()
    st = SampleState(50)
    before = {k: v.clone() for k, v in st.buffers().items()}
    over = {}
    if case == "logits_dtype":
        over["logits"] = x.double()
    elif case == "logits_1d":
        over["logits"] = x[0]
    elif case == "logits_noncontig":
        over["logits"] = torch.randn(5, 8).t()
    elif case == "logits_meta":
        over["logits"] = x.to("meta")
    elif case == "labels_dtype":
        over["labels"] = y.float()
    elif case == "labels_len":
        over["labels"] = y[:7]
    elif case == "indices_2d":
        over["indices"] = i.view(2, 4)
    elif case == "indices_noncontig":
        over["indices"] = torch.arange(16)[::2]
    elif case == "indices_device":
        over["indices"] = i.to("meta")
    elif case == "state_size":
        over["loss"] = torch.zeros(50)
    elif case == "state_dtype":
        over["seen"] = torch.zeros(51)
    elif case == "class_weight":
        over["class_weight"] = torch.ones(4)
    elif case == "reduction":
        over["reduction"] = 7
    elif case == "zero_classes":
        over["logits"] = torch.zeros(8, 0)
    with pytest.raises(RuntimeError, match=match):
        _call(x, y, i, state=st, **over)
    for k, v in st.buffers().items():
        assert torch.equal(v, before[k]), k


@needs_c
def test_select_uniform_shuffle_refuse_bad_arguments():
    C = _C
    with pytest.raises(RuntimeError, match="keys must be float32"):
        C.select(torch.zeros(4, dtype=torch.float64), 2)
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        C.select(torch.zeros(4, 2), 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 4\]"):
        C.select(torch.zeros(4), 5)
    with pytest.raises(RuntimeError, match="keys must be on the CPU"):
        C.select(torch.zeros(4, device="meta"), 2)
    with pytest.raises(RuntimeError, match="idx must be int64 or int32"):
        C.uniform(torch.zeros(4), 1, 1)
    with pytest.raises(RuntimeError, match="chosen must be a contiguous 1-D"):
        C.shuffle(torch.zeros(2, 2, dtype=torch.long), 1)


# ---- edge cases of the CPU extension against the reference --------------------------------

def _both(logits, labels, indices, cfg, n=50, weight=None, grad_out=None):
    out = {}
    for name in ("reference", "cpu"):
        st = SampleState(n)
        if weight is not None:
            st.weight.copy_(weight)
        x = logits.clone().requires_grad_(True)
        loss = get_backend(name, "cpu").step(x, labels, indices, st, cfg, 3)
        loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
        out[name] = (loss.detach(), x.grad, st.state_dict())
    return out["reference"], out["cpu"]


def _assert_states(a, b):
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)


@needs_c
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nonfinite_rows_match_reference_including_gradients(reduction):
    """-inf off the label (finite), -inf on the label (inf), +inf / NaN / all -inf rows (NaN),
    also on ignored rows: loss, gradient (NaN where the reference's is) and state agree."""
    x, y, i = _batch(b=12, c=6)
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
        cfg = LossConfig(reduction=reduction, label_smoothing=smoothing)
        (lr, gr, sr), (lc, gc, sc) = _both(x, y, i, cfg)
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
    for cfg in (LossConfig(), LossConfig(label_smoothing=0.1, class_weight=torch.rand(c, generator=g) + 0.1)):
        (lr, gr, sr), (lc, gc, sc) = _both(x, y, i, cfg)
        torch.testing.assert_close(lc, lr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, gr, rtol=1e-5, atol=1e-6)
        _assert_states(sr, sc)


@needs_c
def test_int32_inputs_single_class_and_empty_batch():
    x, y, i = _batch(b=9, c=1)
    cfg = LossConfig(label_smoothing=0.1)
    (lr, gr, sr), (lc, gc, sc) = _both(x, y.int(), i.int(), cfg)
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)
    _assert_states(sr, sc)
    # An empty batch (the reference backend cannot take one: its argmax needs a row).
    for reduction in ("mean", "sum", "none"):
        st = SampleState(50)
        x0 = torch.zeros(0, 4, requires_grad=True)
        e = torch.zeros(0, dtype=torch.long)
        out = get_backend("cpu", "cpu").step(x0, e, e, st, LossConfig(reduction=reduction), 0)
        ref = F.cross_entropy(torch.zeros(0, 4), e, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)
        out.sum().backward()
        assert x0.grad.shape == (0, 4)
        assert int(st.seen.sum()) == 0


@needs_c
def test_noncontiguous_logits_and_policy_weights_with_per_row_grad():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 33, generator=g).t()  # [33, 10], not contiguous
    y = torch.randint(0, 10, (33,), generator=g)
    i = torch.randint(0, 20, (33,), generator=g)
    w = torch.rand(20, generator=g) * 2
    go = torch.randn(33, generator=g)
    (lr, gr, sr), (lc, gc, sc) = _both(x, y, i, LossConfig(reduction="none"), n=20, weight=w, grad_out=go)
    torch.testing.assert_close(lc, lr)
    torch.testing.assert_close(gc, gr)


@needs_c
def test_backward_twice_with_retain_graph_and_scaled_grad_output():
    x, y, i = _batch(b=16, c=7)
    for name in ("reference", "cpu"):
        st = SampleState(50)
        xr = x.clone().requires_grad_(True)
        loss = get_backend(name, "cpu").step(xr, y, i, st, LossConfig(), 0)
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        (loss * 3.0).backward()
        if name == "reference":
            ref = xr.grad.clone()
        else:
            torch.testing.assert_close(xr.grad, ref)


@needs_c
def test_no_grad_step_updates_state_only():
    x, y, i = _batch()
    st_r, st_c = SampleState(50), SampleState(50)
    with torch.no_grad():
        lr = get_backend("reference", "cpu").step(x, y, i, st_r, LossConfig(), 1)
        lc = get_backend("cpu", "cpu").step(x, y, i, st_c, LossConfig(), 1)
    torch.testing.assert_close(lc, lr)
    _assert_states(st_r.state_dict(), st_c.state_dict())


@needs_c
def test_strict_error_message_equals_reference():
    x, y, i = _batch()
    i[3] = 99
    msgs = []
    for name in ("reference", "cpu"):
        st = SampleState(50)
        with pytest.raises(IndexError) as ei:
            get_backend(name, "cpu").step(x.clone().requires_grad_(True), y, i, st, LossConfig(strict=True), 0)
        assert int(st.seen.sum()) == 0 and int(st.stats.abs().sum()) == 0
        msgs.append(str(ei.value))
    assert msgs[0] == msgs[1]


@needs_c
def test_deferred_errors_accumulate_like_reference():
    x, y, i = _batch()
    for r, (bi, bl) in enumerate([(60, None), (-5, 9), (None, -2)]):
        if bi is not None:
            i[r] = bi
        if bl is not None:
            y[r + 3] = bl
    errs = []
    for name in ("reference", "cpu"):
        st = SampleState(50)
        for _ in range(2):
            get_backend(name, "cpu").step(x, y, i, st, LossConfig(strict=False), 0)
        errs.append(st.errors.clone())
        _ = st
    assert torch.equal(errs[0], errs[1]), errs


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
    ref, cpu = get_backend("reference", "cpu"), get_backend("cpu", "cpu")
    for k in sorted({0, 1, n // 10, n // 2, n - 1, n, n + 5, -1}):
        assert torch.equal(cpu.select(keys, k), ref.select(keys, k)), k
    assert torch.equal(cpu.select(keys.double(), n // 2), ref.select(keys.double(), n // 2))


@needs_c
def test_shuffle_and_uniform_dtypes_and_sizes():
    ref, cpu = get_backend("reference", "cpu"), get_backend("cpu", "cpu")
    g = torch.Generator().manual_seed(5)
    for m in (0, 1, 5000, 200000):
        chosen = torch.randperm(max(m, 1) * 3, generator=g)[:m]
        for dt in (torch.int64, torch.int32):
            c = chosen.to(dt)
            assert torch.equal(cpu.shuffle(c, 2**40 + 17), ref.shuffle(c, 2**40 + 17))
    idx = torch.tensor([0, 1, 2**31 - 1, 2**32 + 5, -1, -(2**40)])
    for key, stream in ((0, 0), (2**31 - 2, 3), (2**45 + 1, -2)):
        assert torch.equal(cpu.uniform(idx, key, stream), ref.uniform(idx, key, stream))
        assert torch.equal(cpu.uniform(idx.int()[:3], key, stream), ref.uniform(idx.int()[:3], key, stream))


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


@needs_c
def test_reduction_codes_cover_config():
    from fastsel.config import REDUCTIONS
    assert set(REDUCTION_CODES) == set(REDUCTIONS)


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
