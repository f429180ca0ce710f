"""The GPU fast path (csrc/step_kernels.cu, csrc/select_kernels.cu, csrc/cuda_glue.cpp).

* Everywhere g++ is: the CUDA kernels themselves, compiled for the CPU against
  csrc/cuda_emulate.cuh (each thread a fiber, blocks in a random order, a missed barrier
  reported as a deadlock) and checked against the reference ops: the two-launch step (every
  class-count path, float16/bfloat16, weights, smoothing, reductions, bad rows, strict mode,
  duplicates in and across warps and blocks, a batch of one index, update=False, B = 0) with
  its scratch left zero after every step; which rows count (the epoch's ``member`` mask,
  ``rows`` counters and device ``epoch``): stray rows left out and counted (the first in row
  order whatever the block order), a call without room left out whole and recorded, strict
  mode's room / stray / range refusals in that order with nothing written, update=False;
  the selection (three radix passes, the candidate buffer, the order-preserving compaction,
  ties, NaN, +-inf, -0) and the shuffle (equal uniforms keep their order), bit for bit.
* On a GPU (skipped without one): the ``cuda`` backend's ops against the reference at the
  sizes bench/gpu_fastpath.py measures, with and without the epoch's rows, strict mode's
  messages, a step captured in a CUDA graph and replayed (across an epoch change made in
  place, and past the shard) against the same steps run eagerly, and a capture without an
  eager warm-up refused clearly.
* Everywhere: ``bench/gpu_fastpath.py --dry-run`` writes the results file's shape, the loss
  calls' launches and host time included.
"""
import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import types

import pytest
import torch

from fastsel import layout, rng
from fastsel.backends import reference
from helpers import batch, make_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
RED = {name: code for code, name in enumerate(layout.REDUCTIONS)}
LOGITS_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: ``kernel<<<grid, block, smem, stream>>>(`` -> ``emu::launch(emu::Cfg{grid, block, smem, stream}, kernel, ``
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(")
#: Bytes of the step's counters at the start of its control block (zero between steps).
CTL_COUNTERS = 8 * 4 + 5 * 8
#: strict_errors' slots after the ERR_* ones (csrc/cuda_launch.h, StrictSlot).
S_OVER, S_TRAINED, S_SHARD, S_STRAY_COUNT, S_STRAY_FIRST, S_EPOCH, STRICT_SIZE = range(4, 11)

API = r'''
#include <cstdint>
#include <vector>
#include "cuda_emulate.cuh"
#include "cuda_launch.h"
using namespace fastsel::cuda;

extern "C" {
const char* emu_error() { return emu::g_error.c_str(); }
void emu_reset(unsigned seed, int sms) { emu::g_error.clear(); emu::g_rng.seed(seed); emu::g_sms = sms; }
long long emu_step_ctl_bytes() { return step_ctl_bytes(); }
long long emu_step_group_bytes(long long b) { return step_group_bytes(b); }
long long emu_step_rows_bytes(long long b) { return step_rows_bytes(b); }

// p: logits labels indices class_weight | loss loss_var p_true seen last_epoch weight stats errors |
//    grad per_row out grad_scale strict_errors | ctl slot group rows | member row_counts epoch
// iv: logits_type labels64 indices64 b c n ignore_index reduction strict update
int emu_step(void** p, const long long* iv, double label_smoothing, double ema) {
  StepArgs a{};
  a.logits = p[0];
  a.logits_type = static_cast<int>(iv[0]);
  a.labels = p[1];
  a.labels64 = iv[1] != 0;
  a.indices = p[2];
  a.indices64 = iv[2] != 0;
  a.class_weight = static_cast<const float*>(p[3]);
  a.b = iv[3], a.c = iv[4], a.n = iv[5], a.ignore_index = iv[6];
  a.eps = static_cast<float>(label_smoothing);        // as cuda_glue.cpp
  a.one_minus_eps = static_cast<float>(1.0 - label_smoothing);
  a.ema = static_cast<float>(ema);
  a.one_minus_ema = static_cast<float>(1.0 - ema);
  a.reduction = static_cast<int>(iv[7]);
  a.strict = iv[8] != 0;
  a.update = iv[9] != 0;
  a.member = static_cast<const uint8_t*>(p[21]);
  a.row_counts = static_cast<int64_t*>(p[22]);
  a.epoch = static_cast<const int64_t*>(p[23]);
  a.loss = static_cast<float*>(p[4]);
  a.loss_var = static_cast<float*>(p[5]);
  a.p_true = static_cast<float*>(p[6]);
  a.seen = static_cast<int32_t*>(p[7]);
  a.last_epoch = static_cast<int32_t*>(p[8]);
  a.weight = static_cast<const float*>(p[9]);
  a.stats = static_cast<double*>(p[10]);
  a.errors = static_cast<int64_t*>(p[11]);
  a.grad = p[12];
  a.per_row = static_cast<float*>(p[13]);
  a.out = static_cast<float*>(p[14]);
  a.grad_scale = static_cast<float*>(p[15]);
  a.strict_errors = static_cast<int64_t*>(p[16]);
  StepWork w{p[17], static_cast<uint32_t*>(p[18]), p[19], p[20]};
  const char* err = launch_step(a, w, nullptr);
  if (!emu::g_error.empty()) return 2;
  return err ? 1 : 0;
}

// gv: g_row g_pos (per_row strides) | iv: type numel per_row c d
int emu_scale_grad(const void* grad, void* out, const float* g_out, const float* scale, const long long* gv,
                   const long long* iv) {
  ScaleGradArgs a{};
  a.grad = grad;
  a.out = out;
  a.g_out = g_out;
  a.scale = scale;
  a.g_row = gv[0], a.g_pos = gv[1];
  a.type = static_cast<int>(iv[0]);
  a.numel = iv[1];
  a.per_row = iv[2] != 0;
  a.c = iv[3], a.d = iv[4];
  const char* err = launch_scale_grad(a, nullptr);
  if (!emu::g_error.empty()) return 2;
  return err ? 1 : 0;
}

// The workspace starts as garbage: the launchers must not rely on its content.
int emu_select(const float* keys, long long n, long long k, long long* out) {
  std::vector<char> work(static_cast<size_t>(select_work_bytes(n, k)) + 256, static_cast<char>(0xA5));
  const char* err = launch_select(keys, n, k, reinterpret_cast<int64_t*>(out), work.data(), nullptr);
  if (!emu::g_error.empty()) return 2;
  return err ? 1 : 0;
}

int emu_shuffle(const void* chosen, int chosen64, long long m, long long key, void* out) {
  std::vector<char> work(static_cast<size_t>(shuffle_work_bytes(m, chosen64 != 0)) + 256, static_cast<char>(0xA5));
  const char* err = launch_shuffle(chosen, chosen64 != 0, m, key, out, work.data(), nullptr);
  if (!emu::g_error.empty()) return 2;
  return err ? 1 : 0;
}

int emu_uniform(const void* idx, int idx64, long long n, long long key, long long stream, float* out) {
  const char* err = launch_uniform(idx, idx64 != 0, n, key, stream, out, nullptr);
  if (!emu::g_error.empty()) return 2;
  return err ? 1 : 0;
}
}
'''


def _cxx():
    return shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The CUDA kernels built for the CPU against csrc/cuda_emulate.cuh (ctypes library)."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("cuda_emu")
    fake = d / "fake"
    (fake / "cub" / "device").mkdir(parents=True)
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cub/device/device_radix_sort.cuh"):
        (fake / name).write_text('#include "cuda_emulate.cuh"\n')
    sources = []
    for name in ("step_kernels.cu", "select_kernels.cu"):
        with open(os.path.join(CSRC, name)) as f:
            text, count = LAUNCH.subn(r"emu::launch(emu::Cfg{\2}, \1, ", f.read())
        assert count >= 2, f"no kernel launch found in {name}"
        assert "<<<" not in text, f"a launch in {name} was not rewritten"
        src = d / (name[:-3] + ".cpp")
        src.write_text('#include "cuda_emulate.cuh"\n' + text)
        sources.append(str(src))
    (d / "api.cpp").write_text(API)
    sources.append(str(d / "api.cpp"))
    lib = d / "libfastsel_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
           "-Wno-unused-variable", "-Wno-unused-but-set-variable", f"-I{fake}", f"-I{CSRC}",
           "-DFASTSEL_STEP_MAX_BLOCKS=3", *sources, "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
    h = ctypes.CDLL(str(lib))
    h.emu_error.restype = ctypes.c_char_p
    for f in ("emu_step_ctl_bytes", "emu_step_group_bytes", "emu_step_rows_bytes"):
        getattr(h, f).restype = ctypes.c_longlong
    h.emu_step_group_bytes.argtypes = h.emu_step_rows_bytes.argtypes = [ctypes.c_longlong]
    h.emu_reset.argtypes = [ctypes.c_uint, ctypes.c_int]
    h.emu_scale_grad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.POINTER(ctypes.c_longlong)] * 2
    h.emu_step.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong), ctypes.c_double,
                           ctypes.c_double]
    h.emu_select.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
    h.emu_shuffle.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
    h.emu_uniform.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                              ctypes.c_longlong, ctypes.c_void_p]
    h.emu_reset(1, 1)
    return h


def _check_rc(lib, rc):
    assert rc == 0, (rc, lib.emu_error().decode())


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class Scratch:
    """The step's scratch as cuda_glue.cpp keeps it: zeroed once, grown, never cleared."""

    def __init__(self, lib):
        self.lib = lib
        self.ctl = torch.zeros(lib.emu_step_ctl_bytes(), dtype=torch.uint8)
        self.slot = torch.zeros(1, dtype=torch.int32)
        self.group = torch.zeros(lib.emu_step_group_bytes(1), dtype=torch.uint8)
        self.rows = torch.full((lib.emu_step_rows_bytes(1),), 0xA5, dtype=torch.uint8)

    def fit(self, n, b):
        if self.slot.numel() < max(n, 1):
            self.slot = torch.zeros(max(n, 1), dtype=torch.int32)
        if self.group.numel() < self.lib.emu_step_group_bytes(b):
            self.group = torch.zeros(self.lib.emu_step_group_bytes(b), dtype=torch.uint8)
        if self.rows.numel() < self.lib.emu_step_rows_bytes(b):
            self.rows = torch.full((self.lib.emu_step_rows_bytes(b),), 0xA5, dtype=torch.uint8)

    def assert_zero(self):
        assert int(self.ctl[:CTL_COUNTERS].abs().sum()) == 0, "the step left its counters non-zero"
        assert int(self.slot.abs().sum()) == 0, "the step left a sample's slot claimed"
        assert int(self.group.abs().sum()) == 0, "the step left a group sum non-zero"


def _epoch(epoch):
    return epoch if isinstance(epoch, torch.Tensor) else torch.tensor(int(epoch), dtype=torch.int64)


def emu_step(lib, scratch, logits, target, indices, state, class_weight=None, ignore_index=-100,
             label_smoothing=0.0, ema=0.3, reduction="mean", strict=False, epoch=3, update=True,
             need_grad=True, member=None, rows=None):
    """ce_step_csrc as cuda_glue.cpp runs it, on the emulated kernels: (out, grad, grad_scale,
    strict_errors); nothing raised (the caller checks strict_errors)."""
    b, c = logits.shape
    n = state[0].numel() - 1
    scratch.fit(n, b)
    none = reduction == "none"
    out = torch.empty(b) if none else torch.empty(())
    grad_scale = torch.empty(())
    grad = torch.empty_like(logits) if need_grad else None
    strict_errors = torch.full((STRICT_SIZE,), -7, dtype=torch.int64) if strict else None
    ptrs = [logits, target, indices, class_weight, *state, grad, out if none else None,
            None if none else out, grad_scale, strict_errors, scratch.ctl, scratch.slot, scratch.group,
            scratch.rows, member, rows, _epoch(epoch)]
    arr = (ctypes.c_void_p * len(ptrs))(*[None if t is None else t.data_ptr() for t in ptrs])
    ints = [LOGITS_TYPE[logits.dtype], target.dtype == torch.int64, indices.dtype == torch.int64, b, c, n,
            ignore_index, RED[reduction], strict, update]
    iv = (ctypes.c_longlong * len(ints))(*[int(v) for v in ints])
    _check_rc(lib, lib.emu_step(arr, iv, float(label_smoothing), float(ema)))
    scratch.assert_zero()
    return out, grad, grad_scale, strict_errors


def ref_step(logits, target, indices, state, class_weight=None, ignore_index=-100, label_smoothing=0.0,
             ema=0.3, reduction="mean", strict=False, epoch=3, update=True, need_grad=True, member=None,
             rows=None):
    return reference.ce_step(logits, target, indices, *state, member, rows, _epoch(epoch), class_weight,
                             ignore_index, label_smoothing, ema, RED[reduction], strict, update, need_grad)


def assert_states(got, want, tol=1.0):
    names = ("loss", "loss_var", "p_true", "seen", "last_epoch", "weight", "stats", "errors")
    for name, x, y in zip(names, got, want):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-5 * tol, atol=1e-6 * tol, equal_nan=True, msg=name)
        else:
            assert torch.equal(x, y), (name, x, y)


def run_both(lib, scratch, logits, target, indices, n=23, seed=0, grad_tol=1.0, **kw):
    st_e, st_r = make_state(n, seed), make_state(n, seed)
    out, grad, scale, se = emu_step(lib, scratch, logits, target, indices, st_e, **kw)
    ref_out, ref_grad, _ = ref_step(logits, target, indices, st_r, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
    if kw.get("need_grad", True):
        g = grad.float() * scale
        tol = 1.0 if logits.dtype == torch.float32 else 300.0
        torch.testing.assert_close(g, ref_grad.float(), rtol=1e-5 * tol * grad_tol, atol=1e-6 * tol * grad_tol,
                                   equal_nan=True)
    assert_states(st_e, st_r)
    return st_e, se


# ---- the step on the emulated kernels --------------------------------------------------------

# One C per kernel configuration: lanes per row 4, 8, 16, 32 with 1 logit per lane; 32 lanes
# with 2, 4, 8, 16, 32 logits per lane; wider rows streamed.
CLASS_COUNTS = [1, 3, 7, 16, 31, 50, 100, 200, 400, 1000, 1100]


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_emulated_step_every_class_count_path(emu, c):
    s = Scratch(emu)
    for reduction in ("mean", "sum", "none"):
        x, y, i = batch(c, 37, c, 23, pool=9, faults=True)
        run_both(emu, s, x, y, i, reduction=reduction, label_smoothing=0.1 if reduction == "sum" else 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_step_low_precision_logits(emu, dtype):
    s = Scratch(emu)
    for c in (10, 300, 1500):
        x, y, i = batch(c, 21, c, 23, dtype, pool=11, faults=True)
        run_both(emu, s, x, y, i)


def test_emulated_step_class_weights_smoothing_and_ignore_index(emu):
    s = Scratch(emu)
    for c in (5, 77):
        w = torch.rand(c, generator=torch.Generator().manual_seed(c)) + 0.2
        for ls in (0.0, 0.2):
            for reduction in ("mean", "sum", "none"):
                x, y, i = batch(c + 1, 29, c, 23, pool=13, faults=True)
                y[7] = 3
                run_both(emu, s, x, y, i, class_weight=w, label_smoothing=ls, reduction=reduction, ignore_index=3)


def test_emulated_step_duplicates_and_one_index_batch(emu):
    """Duplicates within a warp, across warps and across blocks (the grid is capped at 3 blocks
    here, so blocks also loop over tiles), and a batch whose rows all carry one index."""
    s = Scratch(emu)
    for c, b in ((4, 300), (20, 70), (64, 90), (2000, 19)):
        x, y, i = batch(b, b, c, 23)
        i[:] = 5
        run_both(emu, s, x, y, i)
        x, y, i = batch(b + 1, b, c, 23, pool=3, faults=True)
        run_both(emu, s, x, y, i, ema=0.9)


def test_emulated_step_consecutive_steps_share_the_scratch(emu):
    """The scratch is never cleared by the caller: each step must leave it zero for the next;
    also N and B change between steps (the slot array and group buffer grow)."""
    s = Scratch(emu)
    st_e, st_r = make_state(40, 1), make_state(40, 1)
    for step, (b, c) in enumerate([(9, 5), (50, 40), (3, 5), (64, 300), (0, 7), (33, 2)]):
        x, y, i = batch(step, b, c, 40, pool=12 if step % 2 else None, faults=True)
        for kw in ({}, {"update": False}, {"need_grad": False, "reduction": "sum"}):
            out, grad, scale, _ = emu_step(emu, s, x, y, i, st_e, epoch=step, **kw)
            ref_out, ref_grad, _ = ref_step(x, y, i, st_r, epoch=step, **kw)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
            if grad is not None:
                torch.testing.assert_close(grad * scale, ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
            assert_states(st_e, st_r)


def test_emulated_step_nonfinite_rows_and_int32_inputs(emu):
    s = Scratch(emu)
    for c in (6, 90, 1200):
        x, y, i = batch(c, 24, c, 23, pool=8, faults=True)
        x[0, 2] = float("nan")
        x[2] = float("-inf")
        x[6, 0] = float("inf")
        x[7] = 1e30
        x[8, y[8]] = float("-inf")
        run_both(emu, s, x, y.int(), i.int())
        run_both(emu, s, x, y, i, label_smoothing=0.3, reduction="none")


def test_emulated_step_strict_mode_refuses_before_any_write(emu):
    s = Scratch(emu)
    x, y, i = batch(4, 30, 12, 23, pool=6, faults=True)
    st = make_state(23, 2)
    before = [t.clone() for t in st]
    _, _, _, se = emu_step(emu, s, x, y, i, st, strict=True)
    assert se[:S_OVER].tolist() == [2, int(i[3]), 1, int(y[4])]
    assert se[S_OVER:].tolist() == [0, 0, 0, 0, 0, 3]  # every row counts (no rows given): no room or stray figures
    assert_states(st, before)
    x, y, i = batch(5, 30, 12, 23, pool=6)  # nothing bad: a normal step
    st_e, se = run_both(emu, s, x, y, i, strict=True)
    assert se[:S_OVER].tolist() == [0, 0, 0, 0] and se[S_STRAY_COUNT] == 0


def test_emulated_step_empty_batch(emu):
    s = Scratch(emu)
    e = torch.empty(0, dtype=torch.int64)
    for reduction in ("mean", "sum", "none"):
        run_both(emu, s, torch.empty(0, 5), e, e, reduction=reduction)


# ---- the backward's one launch (scale_grad) on the emulated kernels ---------------------------

def _formula_backward(grad, g_out, scale, per_row):
    """fastsel/ops.py's ce_step backward (_ce_step_backward) on these saved tensors."""
    from fastsel import ops
    ctx = types.SimpleNamespace(saved_tensors=(grad, scale), per_row=per_row, impl="csrc")
    return ops._ce_step_backward(ctx, g_out)[0]


def assert_same_bits(got, want):
    """Bit for bit, a NaN where the other has a NaN (its payload aside: the GPU's are canonical)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ints = {4: torch.int32, 2: torch.int16}[got.element_size()]
    same = got.view(ints) == want.view(ints)
    assert bool((same | nan).all()), (got[~(same | nan)][:8], want[~(same | nan)][:8])


def emu_scale_grad(lib, grad, g_out, scale, per_row):
    """cuda_glue.cpp's scale_grad_cuda on the emulated kernel: grad * (g_out * scale)."""
    out = torch.full_like(grad, float("nan"))  # every entry must be written
    c, d, g_row, g_pos = 1, 1, 0, 0
    if per_row:
        c = grad.shape[1]
        for k in grad.shape[2:]:
            d *= k
        g_row, g_pos = g_out.view(grad.shape[0], d).stride()  # as computeStride finds them
    gv = (ctypes.c_longlong * 2)(g_row, g_pos)
    iv = (ctypes.c_longlong * 5)(LOGITS_TYPE[grad.dtype], grad.numel(), int(per_row), c, d)
    _check_rc(lib, lib.emu_scale_grad(_ptr(grad), _ptr(out), _ptr(g_out), _ptr(scale), gv, iv))
    return out


def _saved_grad(shape, dtype, seed):
    """A saved gradient with the forward's special values: NaN rows, +-inf, +-0, subnormals,
    values the product rounds or overflows in half precision."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(8) * 3e4
    flat = x.view(-1)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-42, -3e-39, 65504.0,
                            6.1e-5, 1.0 / 3.0])
    if flat.numel() >= 2 * len(special):
        pos = torch.randperm(flat.numel(), generator=g)[:len(special)]
        flat[pos] = special
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_scale_grad_is_the_backward_formula_bit_for_bit(emu, dtype):
    """The CUDA backward's one launch against fastsel/ops.py's formula, bit for bit: mean and
    sum (a 0-d grad_output times grad_scale) and none (one grad_output per row: contiguous,
    expanded as a sum's backward gives it, strided; [B, C, d1, d2] with [B, d1, d2]), B and C
    not powers of two (more entries than the capped grid's threads: the grid-stride loop)."""
    for b, c in ((37, 13), (5, 1100), (1, 3), (300, 7), (0, 5)):
        grad = _saved_grad((b, c), dtype, seed=b * c + 1)
        for g_out, scale in ((torch.tensor(1.0), torch.tensor(1.0 / 37)), (torch.tensor(-2.5), torch.tensor(1.0)),
                             (torch.tensor(0.3), torch.tensor(1.0 / 37)), (torch.tensor(-1.7), torch.tensor(1.0 / 300)),
                             (torch.tensor(0.3), torch.tensor(float("inf"))), (torch.tensor(1e-30), torch.tensor(0.0))):
            assert_same_bits(emu_scale_grad(emu, grad, g_out, scale, False),
                             _formula_backward(grad, g_out, scale, False))
        rows = torch.randn(2 * b, generator=torch.Generator().manual_seed(b)) * 4
        if b > 2:
            rows[1], rows[2] = float("nan"), 0.0
        for g_out, scale in ((rows[:b].contiguous(), torch.tensor(1.0)), (torch.tensor(0.75).expand(b), torch.tensor(1.0)),
                             (rows[::2], torch.tensor(1.0 / 3))):
            assert_same_bits(emu_scale_grad(emu, grad, g_out, scale, True), _formula_backward(grad, g_out, scale, True))
    for b, c, dims in ((7, 5, (3, 2)), (3, 300, (5,))):
        grad = _saved_grad((b, c) + dims, dtype, seed=c)
        rows = torch.randn((b,) + dims, generator=torch.Generator().manual_seed(c))
        for g_out, scale in ((rows, torch.tensor(1.0)), (torch.tensor(-1.5).expand((b,) + dims), torch.tensor(0.1))):
            assert_same_bits(emu_scale_grad(emu, grad, g_out, scale, True), _formula_backward(grad, g_out, scale, True))


# ---- which rows count: member, rows, epoch (fastsel/ops.py) on the emulated kernels ------------

def make_rows(n, seed, trained=0, shard=10 ** 6):
    """EpochRows' tensors: ``member`` with about a third of the samples not selected, the counters."""
    g = torch.Generator().manual_seed(seed)
    member = (torch.rand(n + 1, generator=g) > 0.35).to(torch.uint8)
    member[n] = 0
    rows = torch.zeros(layout.ROW_SIZE, dtype=torch.int64)
    rows[layout.ROW_TRAINED], rows[layout.ROW_SHARD] = trained, shard
    return member, rows


def run_rows(lib, scratch, x, y, i, member, rows, n=23, st=None, **kw):
    """run_both with the epoch's rows: the counters too must equal the reference's; the
    emulated call's counters are written back into ``rows``; returns strict_errors."""
    st_e, st_r = (make_state(n, 0), make_state(n, 0)) if st is None else st
    rows_e, rows_r = rows.clone(), rows.clone()
    out, grad, scale, se = emu_step(lib, scratch, x, y, i, st_e, member=member, rows=rows_e, **kw)
    ref_out, ref_grad, _ = ref_step(x, y, i, st_r, member=member, rows=rows_r, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
    if kw.get("need_grad", True):
        torch.testing.assert_close(grad.float() * scale, ref_grad.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert_states(st_e, st_r)
    assert rows_e.tolist() == rows_r.tolist(), (rows_e.tolist(), rows_r.tolist())
    rows.copy_(rows_e)
    return se


def _stray_batch(b, c, n, member, seed, strays=(), dup_pool=None):
    """A batch of selected samples (member 1) but for the rows in ``strays``."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.nonzero(member[:n]).flatten()
    other = torch.nonzero(member[:n] == 0).flatten()
    pool = chosen[:dup_pool] if dup_pool else chosen
    x = torch.randn(b, c, generator=g) * 3
    y = torch.randint(0, c, (b,), generator=g)
    i = pool[torch.randint(0, pool.numel(), (b,), generator=g)]
    for k, r in enumerate(strays):
        i[r] = other[k % min(2, other.numel())]  # two stray samples: stray duplicates too
    return x, y, i


@pytest.mark.parametrize("c", [3, 50, 1100])
def test_emulated_step_stray_rows_left_out_and_counted(emu, c):
    """Rows whose sample the epoch did not select add nothing (loss, divisor, gradient,
    state) and are counted; the first one is the lowest row whatever the block order (the
    grid is 3 blocks here, so later tiles run first half the time); calls accumulate, the
    first stray sample kept; with bad rows, ignore_index, duplicates, int32 inputs."""
    s = Scratch(emu)
    n = 23
    member, rows = make_rows(n, seed=c)
    st = make_state(n, 0), make_state(n, 0)
    for call, (b, strays) in enumerate([(300, (250, 130, 70, 71)), (90, (5, 6, 60)), (40, ())]):
        x, y, i = _stray_batch(b, c, n, member, seed=call, strays=strays, dup_pool=6 if call else None)
        if call == 1:
            y[7] = -100                   # an ignored row
            i[8] = n                      # out of range: an index error, not a stray row
            y[5] = c + 4                  # a stray row's bad label is still a label error
            y[9] = 2 if c > 2 else 0
            kw = {"ignore_index": 2 if c > 2 else 0, "label_smoothing": 0.1}
        else:
            kw = {}
        for red in ("mean", "sum", "none"):
            r0 = rows.clone()
            state_pair = tuple([t.clone() for t in half] for half in st)
            run_rows(emu, s, x, y, i, member, r0, st=state_pair, reduction=red, **kw)
        se = run_rows(emu, s, x.clone(), y.int(), i.int(), member, rows, st=st, epoch=5 + call, **kw)
    assert rows[layout.ROW_STRAY_COUNT] == 7 and rows[layout.ROW_TRAINED] == 430 and rows[layout.ROW_CALLS] == 3
    first = _stray_batch(300, c, n, member, seed=0, strays=(250, 130, 70, 71))[2][70]
    assert rows[layout.ROW_STRAY_VALUE] == int(first)


def test_emulated_step_a_call_without_room_is_left_out_whole(emu):
    """No epoch in progress, or B past the shard: every row is left out (an all-masked mean:
    NaN loss, a zero gradient), its range errors and non-finite rows are not recorded, the
    state is untouched, and ROW_OVER_* record the first such call; an admitted call after it
    counts as usual."""
    s = Scratch(emu)
    n = 23
    member, rows = make_rows(n, seed=1, shard=-1)
    member[:n] = 1
    st = make_state(n, 0), make_state(n, 0)
    x, y, i = batch(3, 37, 12, n, pool=5, faults=True)   # with bad rows
    x[0, 1] = float("nan")
    for red in ("mean", "sum", "none"):
        r0 = rows.clone()
        run_rows(emu, s, x, y, i, member, r0, st=tuple([t.clone() for t in h] for h in st), reduction=red)
        assert r0.tolist() == [0, -1, 0, 0, 0, 37, -1, 3]
    out, grad, scale, _ = emu_step(emu, s, x, y, i, make_state(n, 0), member=member, rows=rows.clone())
    assert torch.isnan(out) and float(scale) == 0.0 and torch.equal((grad * scale)[1:], torch.zeros(36, 12))
    for call, (trained, shard, b) in enumerate([(0, -1, 37), (0, -1, 0), (40, 50, 11), (40, 50, 10), (50, 50, 0),
                                                (50, 50, 1)]):
        rows[layout.ROW_TRAINED], rows[layout.ROW_SHARD] = trained, shard
        x, y, i = batch(call, b, 7, n, pool=4, faults=True)
        run_rows(emu, s, x, y, i, member, rows, st=st, epoch=call)
    assert rows.tolist() == [50, 50, 2, 0, 0, 37 + 11 + 1, -1, 0]


def test_emulated_step_strict_rows_refuse_before_any_write(emu):
    """Strict mode: no room, then stray rows, then range errors, each refusing the whole call
    with nothing written (state, errors, stats, counters); strict_errors carries what the host
    raises, the reference's messages."""
    from fastsel.rows import room_message, stray_message
    s = Scratch(emu)
    n = 23
    member, _ = make_rows(n, seed=2)
    cases = [(-1, 0, ()), (100, 95, ()), (10 ** 6, 0, (40, 9)), (10 ** 6, 0, ())]
    for shard, trained, strays in cases:
        rows = torch.tensor([trained, shard, 4, 0, 0, 0, 0, 0], dtype=torch.int64)
        x, y, i = _stray_batch(60, 9, n, member, seed=shard % 97, strays=strays)
        y[20] = 9          # a bad label, refused last
        st = make_state(n, 1)
        before, rows_before = [t.clone() for t in st], rows.clone()
        _, _, _, se = emu_step(emu, s, x, y, i, st, strict=True, member=member, rows=rows, epoch=6)
        assert_states(st, before)
        assert torch.equal(rows, rows_before)
        assert se[S_EPOCH] == 6 and se[S_TRAINED] == trained and se[S_SHARD] == shard
        with pytest.raises((ValueError, IndexError)) as ref:
            ref_step(x, y, i, make_state(n, 1), strict=True, member=member, rows=rows.clone(), epoch=6)
        if se[S_OVER]:
            assert shard < 0 or trained + 60 > shard
            assert str(ref.value) == room_message(60, 6, int(se[S_TRAINED]), int(se[S_SHARD]))
            continue
        if se[S_STRAY_COUNT]:
            assert (se[S_STRAY_COUNT], se[S_STRAY_FIRST]) == (2, int(i[9]))
            assert str(ref.value) == stray_message(int(se[S_STRAY_COUNT]), 6, int(se[S_STRAY_FIRST]))
            continue
        assert se[:S_OVER].tolist() == [0, 0, 1, 9] and "label" in str(ref.value).lower()
    # A clean strict call counts as a non-strict one.
    rows = torch.tensor([0, 10 ** 6, 0, 0, 0, 0, 0, 0], dtype=torch.int64)
    x, y, i = _stray_batch(60, 9, n, member, seed=4)
    se = run_rows(emu, s, x, y, i, member, rows, strict=True)
    assert se[S_OVER:S_EPOCH].tolist() == [0, 0, 10 ** 6, 0, 0] and rows.tolist()[:3] == [60, 10 ** 6, 1]


def test_emulated_step_update_false_ignores_the_rows(emu):
    """update=False: no room or membership check (stray rows count in the loss), nothing
    counted."""
    s = Scratch(emu)
    n = 23
    member, rows = make_rows(n, seed=3, shard=-1)
    x, y, i = _stray_batch(50, 6, n, member, seed=1, strays=(3, 30))
    for red in ("mean", "none"):
        run_rows(emu, s, x, y, i, member, rows, update=False, reduction=red)
        out, _, _, _ = emu_step(emu, s, x, y, i, make_state(n, 0), update=False, reduction=red)
        out_rows, _, _, _ = emu_step(emu, s, x, y, i, make_state(n, 0), update=False, reduction=red,
                                     member=member, rows=rows)
        assert torch.equal(out, out_rows)
    assert rows.tolist() == [0, -1, 0, 0, 0, 0, 0, 0]


# ---- the selection pass on the emulated kernels ----------------------------------------------

def emu_select(lib, keys, k):
    out = torch.full((k,), -1, dtype=torch.int64)
    if k:
        _check_rc(lib, lib.emu_select(_ptr(keys), keys.numel(), k, _ptr(out)))
    return out


def _keys(n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        keys = torch.randint(0, 7, (n,), generator=g).float()
        keys[torch.rand(n, generator=g) < 0.05] = float("nan")
    elif kind == "special":
        big = torch.finfo(torch.float32).max
        pool = torch.tensor([float("nan"), -big, float("inf"), 0.0, float("-inf"), big, -0.0, 1.0, -1.0, 1e-40])
        keys = pool[torch.randint(0, len(pool), (n,), generator=g)]
    elif kind == "equal":
        keys = torch.full((n,), 0.25)
    elif kind == "close":  # one top bucket, spread over the low bits
        keys = 1.0 + torch.randint(0, 3000, (n,), generator=g).float() * 2.0 ** -23
    else:
        keys = torch.randn(n, generator=g)
    return keys


@pytest.mark.parametrize("kind", ["ties", "special", "equal", "close", "spread"])
def test_emulated_select_equals_reference(emu, kind):
    for n in (1, 5, 300, 4097, 13000):
        keys = _keys(n, kind, n)
        want = reference.select(keys, n)
        for k in sorted({1, max(1, n // 3), max(1, n - 1), n}):
            got = emu_select(emu, keys, k)
            assert torch.equal(got, want[:k]), (kind, n, k)


def test_emulated_select_with_more_blocks_and_rounds(emu):
    """More blocks than the histogram passes cap (2 per SM): each block loops over rounds."""
    for sms in (1, 3):
        emu.emu_reset(7, sms)
        for kind in ("ties", "spread"):
            keys = _keys(20000, kind, sms)
            assert torch.equal(emu_select(emu, keys, 6000), reference.select(keys, 6000))
    emu.emu_reset(1, 1)


def test_emulated_select_scans_more_chunks_than_a_block_has_threads(emu):
    """Over 256 chunks of 4096 keys: the last block scans the chunk counts in several rounds."""
    emu.emu_reset(5, 8)
    n = 256 * 4096 + 12345
    keys = _keys(n, "ties", 1)
    k = int(0.3 * n)
    assert torch.equal(emu_select(emu, keys, k), reference.select(keys, k))
    emu.emu_reset(1, 1)


def _colliding_indices(key):
    """Sample indices whose STREAM_SHUFFLE uniforms are equal (groups of 2 or more)."""
    idx = torch.arange(1 << 18)
    u = rng.uniform(idx, key, rng.STREAM_SHUFFLE)
    _, inv, counts = torch.unique(u, return_inverse=True, return_counts=True)
    return idx[counts[inv] > 1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_emulated_shuffle_and_uniform_bit_exact(emu, dtype):
    g = torch.Generator().manual_seed(3)
    coll = _colliding_indices(777)
    assert coll.numel() > 100
    chosen = torch.cat([coll[torch.randperm(coll.numel(), generator=g)][:600],
                        torch.randperm(1 << 18, generator=g)[:900]])
    chosen = chosen[torch.randperm(chosen.numel(), generator=g)].to(dtype)
    out = torch.empty_like(chosen)
    _check_rc(emu, emu.emu_shuffle(_ptr(chosen), dtype == torch.int64, chosen.numel(), 777, _ptr(out)))
    assert torch.equal(out, reference.shuffle(chosen, 777))
    u = torch.empty(chosen.numel())
    _check_rc(emu, emu.emu_uniform(_ptr(chosen), dtype == torch.int64, chosen.numel(), 12345, 1, _ptr(u)))
    assert torch.equal(u, rng.uniform(chosen, 12345, 1))


# ---- on a GPU --------------------------------------------------------------------------------

def _cuda_ready():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from fastsel.backends import get_backend  # noqa: F401
    from fastsel.backends.cuda import CudaBackend
    return CudaBackend().unavailable()


_WHY = _cuda_ready()
needs_gpu = pytest.mark.skipif(_WHY is not None, reason=f"needs the cuda backend: {_WHY}")


def _gpu_op(name):
    return getattr(torch.ops.fastsel, f"{name}_csrc")


def _to(state, dev):
    return [t.to(dev) for t in state]


@needs_gpu
@pytest.mark.parametrize("b,c", [(256, 10), (1024, 100), (4096, 1000), (300, 5000)])
def test_gpu_step_matches_reference(b, c):
    dev = "cuda"
    for dup in (None, 50, 1):
        x, y, i = batch(b + c, b, c, 5000, pool=dup, faults=True)
        x, y, i = x.to(dev), y.to(dev), i.to(dev)
        for kw in ({}, {"reduction": "none", "label_smoothing": 0.1}, {"update": False}):
            st_c, st_r = _to(make_state(5000, 1), dev), _to(make_state(5000, 1), dev)
            red = RED[kw.get("reduction", "mean")]
            args = (None, None, torch.tensor(4, device=dev), None, -100, kw.get("label_smoothing", 0.0), 0.3, red,
                    False, kw.get("update", True), True)
            out, grad, scale = _gpu_op("ce_step")(x, y, i, *st_c, *args)
            ref_out, ref_grad, _ = reference.ce_step(x, y, i, *st_r, *args)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(grad * scale, ref_grad, rtol=1e-4, atol=1e-6, equal_nan=True)
            assert_states([t.cpu() for t in st_c], [t.cpu() for t in st_r])


@needs_gpu
@pytest.mark.parametrize("b,c", [(256, 10), (4096, 1000)])
def test_gpu_step_rows_match_reference(b, c):
    """The epoch's rows on the GPU: stray rows (duplicates, int32 indices), a call past the
    shard, then no epoch, each call's counters equal to the reference's."""
    dev, n = "cuda", 5000
    member, rows = make_rows(n, seed=b)
    rows[layout.ROW_SHARD] = 3 * b
    member, rows_c, rows_r = member.to(dev), rows.to(dev), rows.to(dev).clone()
    st_c, st_r = _to(make_state(n, 1), dev), _to(make_state(n, 1), dev)
    for call in range(5):
        x, y, i = _stray_batch(b, c, n, member.cpu(), seed=call, strays=(b - 1, b // 2, 7, 8),
                               dup_pool=40 if call % 2 else None)
        if call == 4:
            rows_c[layout.ROW_SHARD] = rows_r[layout.ROW_SHARD] = -1
        x, y, i = x.to(dev), y.to(dev), (i.int() if call == 1 else i).to(dev)
        args = (torch.tensor(call, device=dev), None, -100, 0.0, 0.3, RED["mean"], False, True, True)
        out, grad, scale = _gpu_op("ce_step")(x, y, i, *st_c, member, rows_c, *args)
        ref_out, ref_grad, _ = reference.ce_step(x, y, i, *st_r, member, rows_r, *args)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(grad * scale, ref_grad, rtol=1e-4, atol=1e-6, equal_nan=True)
        assert_states([t.cpu() for t in st_c], [t.cpu() for t in st_r])
        assert rows_c.tolist() == rows_r.tolist(), call
    assert rows_c[layout.ROW_OVER_COUNT] == 2 * b and rows_c[layout.ROW_STRAY_COUNT] == 12


@needs_gpu
def test_gpu_strict_rows_raise_the_reference_messages():
    """Strict mode on the GPU: room, then stray rows, then range errors, with the reference's
    types and words, and nothing written."""
    dev, n, b = "cuda", 500, 64
    member, _ = make_rows(n, seed=9)
    for shard, strays, bad_label in ((-1, (), True), (10 ** 6, (30, 3), True), (10 ** 6, (), True)):
        rows = torch.tensor([0, shard, 0, 0, 0, 0, 0, 0], dtype=torch.int64, device=dev)
        x, y, i = _stray_batch(b, 10, n, member, seed=1, strays=strays)
        if bad_label:
            y[11] = 10
        x, y, i = x.to(dev), y.to(dev), i.to(dev)
        args = (torch.tensor(2, device=dev), None, -100, 0.0, 0.3, RED["mean"], True, True, True)
        st = _to(make_state(n, 1), dev)
        before = [t.clone() for t in st] + [rows.clone()]
        with pytest.raises((ValueError, IndexError)) as got:
            _gpu_op("ce_step")(x, y, i, *st, member.to(dev), rows, *args)
        with pytest.raises((ValueError, IndexError)) as want:
            reference.ce_step(x, y, i, *_to(make_state(n, 1), dev), member.to(dev), rows.clone(), *args)
        assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
        for t, u in zip(st + [rows], before):
            assert torch.equal(t, u)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backward_is_the_formula_bit_for_bit(dtype):
    """The CUDA backward (autograd.cpp -> one scale_grad launch) against fastsel/ops.py's
    formula run on the same device, bit for bit, for every reduction and grad_output form."""
    dev, n = "cuda", 5000
    for b, c in ((300, 7), (1024, 1000)):
        x, y, i = batch(b + c, b, c, n, dtype, pool=50, faults=True)
        x, y, i = x.to(dev).requires_grad_(True), y.to(dev), i.to(dev)
        for red in ("mean", "sum", "none"):
            args = (None, None, torch.tensor(4, device=dev), None, -100, 0.1, 0.3, RED[red], False, True, True)
            out, grad, scale = _gpu_op("ce_step")(x, y, i, *_to(make_state(n, 1), dev), *args)
            gos = [torch.ones_like(out), torch.rand_like(out) * 3 - 1]
            if red == "none":
                gos += [torch.ones((), device=dev).expand(b), torch.rand(2 * b, device=dev)[::2]]
            for go in gos:
                got, = torch.autograd.grad(out, x, go, retain_graph=True)
                assert_same_bits(got, _formula_backward(grad, go, scale, red == "none"))


#: Runtime / driver calls that launch a kernel (bench/gpu_fastpath.py's LAUNCH_CALLS).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch")


def _launches(fn):
    """(kernel-launch calls, names of the device kernels) of one ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    launches = sum(e.name in LAUNCH_CALLS for e in prof.events())
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not re.search(r"memcpy|memset", e.name, re.IGNORECASE)]
    return launches, kernels


@needs_gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_loss_backward_is_one_launch(reduction):
    """sampler.loss(...) on the cuda backend: its backward is ONE launch (scale_grad_kernel),
    grad_output and grad_scale read on the device, no copy; with the engine's own grad_output
    (loss.backward() of a scalar: its ones fill) two in all, one of them ours."""
    import fastsel
    dev, b, c = "cuda", 256, 100
    s = fastsel.Sampler(b * 64, "uniform", budget=1.0, epochs=1, seed=0, backend="cuda", device=dev,
                        reduction=reduction)
    iter(s)  # draws the epoch: the loss calls count towards it
    idx = torch.as_tensor(s.epoch_array()[:b]).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, c, device=dev, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (b,), device=dev, generator=g)
    go = torch.full((b,) if reduction == "none" else (), 0.5, device=dev)
    for _ in range(2):  # warm-up: the scratch, the allocator's blocks
        x.grad = None
        s.loss(x, y, idx).backward(go)
    x.grad = None
    out = s.loss(x, y, idx)
    launches, kernels = _launches(lambda: out.backward(go))
    assert launches == 1 and len(kernels) == 1 and "scale_grad_kernel" in kernels[0], (launches, kernels)
    if reduction == "mean":
        x.grad = None
        out = s.loss(x, y, idx)
        launches, kernels = _launches(out.backward)
        assert launches == 2 and len(kernels) == 2, (launches, kernels)
        assert sum("scale_grad_kernel" in k for k in kernels) == 1, kernels


@needs_gpu
@pytest.mark.parametrize("n", [1_280_000, 10_000_000])
def test_gpu_select_and_shuffle_match_reference(n):
    for kind in ("ties", "spread"):
        keys = _keys(n, kind, n).cuda()
        k = int(0.3 * n)
        got = _gpu_op("select")(keys, k)
        want = reference.select(keys, k)
        assert torch.equal(got, want), kind
        assert torch.equal(_gpu_op("shuffle")(got, 99), reference.shuffle(want, 99)), kind


@needs_gpu
def test_gpu_step_captured_in_a_cuda_graph_replays_like_eager():
    """A strict=False step (forward with grad, state update, duplicates) captured once and
    replayed on new batches copied into its inputs leaves the state eager steps leave."""
    dev = "cuda"
    n, b, c = 3000, 512, 100
    batches = [batch(s, b, c, n, pool=400, faults=True) for s in range(4)]
    op = _gpu_op("ce_step")

    # The epoch's rows, changed in place between calls as EpochRows does: a new epoch after
    # two calls (member, counters and epoch), and a last call past the shard.
    member0, _ = make_rows(n, seed=5)
    epochs = [(2, member0, 0, 10 ** 6), None, (3, torch.ones(n + 1, dtype=torch.uint8), 0, b + b // 2), None]

    def rows_for():
        return (torch.zeros(n + 1, dtype=torch.uint8, device=dev), torch.zeros(layout.ROW_SIZE, dtype=torch.int64,
                device=dev), torch.zeros((), dtype=torch.int64, device=dev))

    def open_epoch(rows, e):
        if e is not None:
            rows[0].copy_(e[1])
            rows[1].zero_()
            rows[1][layout.ROW_TRAINED], rows[1][layout.ROW_SHARD] = e[2], e[3]
            rows[2].fill_(e[0])

    def step(x, y, i, st, rows):
        return op(x, y, i, *st, *rows, None, -100, 0.0, 0.3, RED["mean"], False, True, True)

    eager, eager_rows = _to(make_state(n, 3), dev), rows_for()
    eager_out = []
    for (x, y, i), e in zip(batches, epochs):
        open_epoch(eager_rows, e)
        out, grad, scale = step(x.to(dev), y.to(dev), i.to(dev), eager, eager_rows)
        eager_out.append((out.clone(), (grad * scale).clone(), eager_rows[1].clone()))
    assert eager_out[-1][2][layout.ROW_OVER_COUNT] == b and eager_out[1][2][layout.ROW_STRAY_COUNT] > 0

    graphed, g_rows = _to(make_state(n, 3), dev), rows_for()
    open_epoch(g_rows, epochs[0])
    sx, sy, si = (t.to(dev).clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        warm, warm_rows = _to(make_state(n, 3), dev), rows_for()
        open_epoch(warm_rows, epochs[0])
        for _ in range(2):
            step(sx, sy, si, warm, warm_rows)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        g_out, g_grad, g_scale = step(sx, sy, si, graphed, g_rows)
    # Capture recorded the step without running it: the state is untouched so far.
    assert_states([t.cpu() for t in graphed], make_state(n, 3))
    assert g_rows[1].tolist() == [0, 10 ** 6, 0, 0, 0, 0, 0, 0]
    for (x, y, i), e, (out, grad, counts) in zip(batches, epochs, eager_out):
        open_epoch(g_rows, e)
        sx.copy_(x)
        sy.copy_(y)
        si.copy_(i)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(g_out, out, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g_grad * g_scale, grad, rtol=0, atol=0)
        assert g_rows[1].tolist() == counts.tolist()
    # (float64 atomics sum a sample's duplicates: the same bits unless a sum is inexact)
    assert_states([t.cpu() for t in graphed], [t.cpu() for t in eager], tol=0.1)


@needs_gpu
def test_gpu_capture_without_warm_up_is_refused_clearly():
    """A capture cannot allocate or zero the scratch: a state larger than any eager step's
    is refused with the fix (an eager warm-up call), not run on a half-made scratch."""
    dev = "cuda"
    n = 12_000_001  # more samples than any other test's state: the slot array would have to grow
    st = _to(make_state(n, 0), dev)
    x, y, i = (t.to(dev) for t in batch(0, 64, 10, n, faults=True))
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(g):
            _gpu_op("ce_step")(x, y, i, *st, None, None, torch.tensor(0, device=dev), None, -100, 0.0, 0.3,
                               RED["mean"], False, True, True)


# ---- the GPU script's results file, dry-run on the CPU ---------------------------------------

def test_gpu_fastpath_dry_run_writes_the_results_schema(tmp_path):
    out = tmp_path / "gpu_fastpath_cpu.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_fastpath.py"), "--dry-run",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"device", "command", "rows"}
    assert isinstance(data["device"], str) and "gpu_fastpath.py" in data["command"]
    steps = [r for r in data["rows"] if r["op"] == "step"]
    selects = [r for r in data["rows"] if r["op"] == "select"]
    assert steps and selects and len(steps) + len(selects) == len(data["rows"])
    assert {r["impl"] for r in steps} >= {"plain", "bare_ce"} and {r["impl"] for r in selects} >= {"topk"}
    assert {r["impl"] for r in data["rows"]} <= {"cuda", "triton", "plain", "bare_ce", "topk"}
    for r in steps:
        assert {"B", "C", "gpu_us", "host_us"} <= set(r) and not {"N", "k"} & set(r)
    for r in selects:
        assert {"N", "k", "gpu_us", "host_us"} <= set(r) and not {"B", "C"} & set(r)
    for r in data["rows"]:
        assert all(isinstance(r[f], (int, float)) and r[f] >= 0 for f in ("gpu_us", "host_us"))
    # Every impl was measured at every size of its op.
    for rows, size in ((steps, ("B", "C")), (selects, ("N", "k"))):
        sizes = {tuple(r[f] for f in size) for r in rows}
        for impl in {r["impl"] for r in rows}:
            assert {tuple(r[f] for f in size) for r in rows if r["impl"] == impl} == sizes, impl
    # The whole loss call (sampler.loss + backward) of each fused backend: launches and host time.
    calls = data["loss_calls"]
    assert {(r["B"], r["C"]) for r in calls} == {(256, 10), (256, 100), (256, 1000)}
    assert {r["impl"] for r in calls} == {"cuda"}  # triton needs a GPU
    for r in calls:
        assert {"host_us", "launches", "kernels", "copies", "syncs", "top"} <= set(r)
        assert r["host_us"] > 0 and all(isinstance(r[f], (int, float)) and r[f] >= 0
                                        for f in ("launches", "kernels", "copies", "syncs"))
