"""One check per fault at the op level: every metadata fault of a direct ``ce_step`` /
``observe`` call (the table in fastsel/validation/faults.py) raises, from every
implementation (``reference``, ``csrc`` where fastsel._C is built, ``triton`` where it runs),
the table's exception type with the template filled exactly as written here (shapes as
Python tuples, dtypes as ``torch.float32``, devices as ``cpu``/``cuda:0``, floats as
``repr``), and leaves every state tensor, the epoch's rows and the epoch unchanged. The cases
are derived from the table: a fault added to it without a case here fails
``test_every_fault_has_a_case``. Device faults need a second device (CUDA). Also: the
committed csrc/faults.h is the table's, setup.py regenerates it, the first of two faults is
the one every implementation reports, and the Sampler's own checks use the same words.
"""
import os

import pytest
import torch

import fastsel
from fastsel import layout, ops
from fastsel.backends import available
from fastsel.rows import EpochRows
from fastsel.validation import faults
import fastsel.backends.reference  # noqa: F401  (registers the reference ops)

try:
    from fastsel import _C
except ImportError:
    _C = None
HAS_TRITON = "triton" in available("cpu") or "triton" in available("cuda")
if HAS_TRITON:
    import fastsel.backends.triton  # noqa: F401  (registers the triton ops)

IMPLS = ["reference"] + (["csrc"] if _C is not None else []) + (["triton"] if HAS_TRITON else [])
CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, B, C = 6, 4, 5
NAMES = ("state_loss", "state_loss_var", "state_p_true", "state_seen", "state_last_epoch",
         "state_weight", "stats", "errors")
DTYPES = (torch.float32,) * 3 + (torch.int32,) * 2 + (torch.float32, torch.float64, torch.int64)
WRONG = {torch.float32: torch.float64, torch.int32: torch.int64, torch.float64: torch.float32,
         torch.int64: torch.int32}


def make_state():
    g = torch.Generator().manual_seed(0)
    seen = torch.randint(0, 3, (N + 1,), generator=g, dtype=torch.int32)
    seen[N] = 0
    return (torch.rand(N + 1, generator=g), torch.rand(N + 1, generator=g) * 0.1,
            torch.rand(N + 1, generator=g), seen, torch.where(seen > 0, 2, -1).to(torch.int32),
            torch.rand(N + 1, generator=g) + 0.5, torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64),
            torch.tensor([1, 7, 0, 0], dtype=torch.int64))


def make_rows():
    r = EpochRows(N)
    r.open(torch.arange(N), 3, 100, 8)
    return r


def base(op):
    """Valid arguments of ``op`` by name (the schema's), on the CPU."""
    g = torch.Generator().manual_seed(1)
    r = make_rows()
    common = dict(indices=torch.tensor([0, 1, 2, 3]), state=make_state(), member=r.member,
                  rows=r.counts, epoch=r.epoch)
    if op == "ce_step":
        return dict(common, logits=torch.randn(B, C, generator=g), target=torch.tensor([0, 4, 2, 1]),
                    class_weight=None, ignore_index=-100, label_smoothing=0.0, ema=0.3, reduction=0,
                    strict=False, update=True, need_grad=False)
    return dict(common, losses=torch.rand(B, generator=g), probs=None, ema=0.3, reduction=0,
                strict=False, update=True)


def call(op, impl, a):
    s = a["state"]
    if op == "ce_step":
        return ops.get(op, impl)(a["logits"], a["target"], a["indices"], *s, a["member"], a["rows"],
                                 a["epoch"], a["class_weight"], a["ignore_index"], a["label_smoothing"],
                                 a["ema"], a["reduction"], a["strict"], a["update"], a["need_grad"])
    return ops.get(op, impl)(a["losses"], a["probs"], a["indices"], *s, a["member"], a["rows"],
                             a["epoch"], a["ema"], a["reduction"], a["strict"], a["update"])


def swap(i, t):
    """Replace state tensor ``i`` by ``t``."""
    return lambda a: {"state": a["state"][:i] + (t,) + a["state"][i + 1:]}


def cuda(name):
    """Move argument ``name`` (a state tensor: ``state<i>``) to the GPU."""
    if name.startswith("state"):
        i = int(name[5:])
        return lambda a: {"state": a["state"][:i] + (a["state"][i].cuda(),) + a["state"][i + 1:]}
    return lambda a: {name: a[name].cuda()}


def case(fault, op, vid, change, needs_cuda=False, **fields):
    return pytest.param(fault, op, change, fields, id=f"{fault}-{op}-{vid}",
                        marks=[pytest.mark.skipif(not CUDA, reason="needs a second device (CUDA)")]
                        if needs_cuda else [])


CS, OB = "ce_step", "observe"
CASES = [
    case("logits_dim", CS, "1d", lambda a: {"logits": torch.randn(B)}, shape="(4,)"),
    case("logits_dtype", CS, "f64", lambda a: {"logits": a["logits"].double()}, dtype="torch.float64"),
    case("logits_dtype", CS, "i64", lambda a: {"logits": torch.zeros(B, C, dtype=torch.long)}, dtype="torch.int64"),
    case("logits_classes", CS, "0", lambda a: {"logits": torch.zeros(B, 0)}, shape="(4, 0)"),
    case("logits_contiguous", CS, "t", lambda a: {"logits": torch.randn(C, B).t()},
         name="logits", strides="(1, 4)", shape="(4, 5)"),
    case("target_dtype", CS, "u8", lambda a: {"target": a["target"].to(torch.uint8)}, dtype="torch.uint8"),
    case("target_dtype", CS, "bool", lambda a: {"target": a["target"] > 0}, dtype="torch.bool"),
    case("target_dtype", CS, "probs_f64", lambda a: {"target": torch.rand(B, C, dtype=torch.float64)},
         dtype="torch.float64"),
    case("target_probs_shape", CS, "3", lambda a: {"target": torch.rand(B, 3)},
         dtype="torch.float32", want="(4, 5)", shape="(4, 3)"),
    case("target_indices_shape", CS, "short", lambda a: {"target": a["target"][:3]},
         want="(4,)", logits="(4, 5)", shape="(3,)"),
    case("target_indices_shape", CS, "kdim", lambda a: {"logits": torch.randn(B, C, 3),
                                                        "target": torch.zeros(B, 2, dtype=torch.long)},
         want="(4, 3)", logits="(4, 5, 3)", shape="(4, 2)"),
    case("target_device", CS, "cuda", cuda("target"), True, device="cuda:0", want="cpu"),
    case("target_contiguous", CS, "kdim", lambda a: {"logits": torch.randn(B, C, 2),
                                                     "target": torch.zeros(2, B, dtype=torch.long).t()},
         name="target", strides="(1, 4)", shape="(4, 2)"),
    case("losses_dim", OB, "2d", lambda a: {"losses": torch.rand(B, 1)}, shape="(4, 1)"),
    case("losses_dtype", OB, "i64", lambda a: {"losses": torch.arange(B)}, dtype="torch.int64"),
    case("losses_contiguous", OB, "step", lambda a: {"losses": torch.rand(2 * B)[::2]},
         name="losses", strides="(2,)", shape="(4,)"),
    case("probs_dtype", OB, "i64", lambda a: {"probs": torch.arange(B)}, name="probs", dtype="torch.int64"),
    case("probs_shape", OB, "short", lambda a: {"probs": torch.rand(3)}, name="probs", want="(4,)", shape="(3,)"),
    case("probs_device", OB, "cuda", lambda a: {"probs": torch.rand(B, device="cuda")}, True,
         name="probs", device="cuda:0", want="cpu"),
    case("probs_contiguous", OB, "step", lambda a: {"probs": torch.rand(2 * B)[::2]},
         name="probs", strides="(2,)", shape="(4,)"),
    case("indices_dim", CS, "2d", lambda a: {"indices": a["indices"].view(2, 2)}, shape="(2, 2)"),
    case("indices_dim", OB, "0d", lambda a: {"indices": torch.tensor(1)}, shape="()"),
    case("indices_dtype", CS, "f32", lambda a: {"indices": a["indices"].float()}, dtype="torch.float32"),
    case("indices_dtype", OB, "i16", lambda a: {"indices": a["indices"].short()}, dtype="torch.int16"),
    case("indices_length", CS, "short", lambda a: {"indices": a["indices"][:3]},
         length="3", of="logits", batch="4"),
    case("indices_length", OB, "long", lambda a: {"indices": torch.arange(5)},
         length="5", of="losses", batch="4"),
    case("indices_device", CS, "cuda", cuda("indices"), True, device="cuda:0", of="logits", want="cpu"),
    case("indices_device", OB, "cuda", cuda("indices"), True, device="cuda:0", of="losses", want="cpu"),
    case("indices_contiguous", CS, "step", lambda a: {"indices": torch.arange(2 * B)[::2]},
         name="indices", strides="(2,)", shape="(4,)"),
    case("class_weight_dtype", CS, "f64", lambda a: {"class_weight": torch.ones(C, dtype=torch.float64)},
         dtype="torch.float64"),
    case("class_weight_shape", CS, "4", lambda a: {"class_weight": torch.ones(4)}, want="(5,)", shape="(4,)"),
    case("class_weight_device", CS, "cuda", lambda a: {"class_weight": torch.ones(C, device="cuda")}, True,
         device="cuda:0", want="cpu"),
    case("class_weight_contiguous", CS, "step", lambda a: {"class_weight": torch.ones(2 * C)[::2]},
         name="class_weight", strides="(2,)", shape="(5,)"),
    case("label_smoothing_range", CS, "1.5", lambda a: {"label_smoothing": 1.5}, value="1.5"),
    case("label_smoothing_range", CS, "neg", lambda a: {"label_smoothing": -0.25}, value="-0.25"),
    case("label_smoothing_range", CS, "nan", lambda a: {"label_smoothing": float("nan")}, value="nan"),
    case("ema_range", CS, "0", lambda a: {"ema": 0.0}, value="0.0"),
    case("ema_range", CS, "tiny_neg", lambda a: {"ema": -2.5e-07}, value="-2.5e-07"),
    case("ema_range", OB, "1e15", lambda a: {"ema": 1e15}, value="1000000000000000.0"),
    case("ema_range", OB, "1e16", lambda a: {"ema": 1e16}, value="1e+16"),
    case("ema_range", OB, "third", lambda a: {"ema": 4 / 3}, value="1.3333333333333333"),
    case("ema_range", CS, "inf", lambda a: {"ema": float("inf")}, value="inf"),
    case("reduction_range", CS, "7", lambda a: {"reduction": 7}, value="7"),
    case("reduction_range", OB, "neg", lambda a: {"reduction": -1}, value="-1"),
    case("state_size", CS, "1", swap(0, torch.zeros(1)), shape="(1,)"),
    case("state_size", OB, "2d", swap(0, torch.zeros(N + 1, 1)), shape="(7, 1)"),
    *[case("state_dtype", OB if i % 2 else CS, NAMES[i], swap(i, torch.zeros(
        layout.STAT_SIZE if i == 6 else layout.ERR_SIZE if i == 7 else N + 1, dtype=WRONG[DTYPES[i]])),
        name=NAMES[i], want=str(DTYPES[i]), dtype=str(WRONG[DTYPES[i]])) for i in range(8)],
    *[case("state_length", CS if i % 2 else OB, NAMES[i], swap(i, torch.zeros(N, dtype=DTYPES[i])),
           name=NAMES[i], length="7", shape="(6,)") for i in range(1, 6)],
    case("state_vector_length", CS, "stats", swap(6, torch.zeros(2, dtype=torch.float64)),
         name="stats", length="3", shape="(2,)"),
    case("state_vector_length", OB, "errors", swap(7, torch.zeros(3, dtype=torch.int64)),
         name="errors", length="4", shape="(3,)"),
    case("state_device", CS, "seen", cuda("state3"), True, name="state_seen", device="cuda:0", of="logits",
         want="cpu"),
    case("state_device", OB, "errors", cuda("state7"), True, name="errors", device="cuda:0", of="losses",
         want="cpu"),
    case("state_contiguous", CS, "p_true", swap(2, torch.zeros(2 * N + 2)[::2]),
         name="state_p_true", strides="(2,)"),
    case("state_contiguous", OB, "stats", swap(6, torch.zeros(6, dtype=torch.float64)[::2]),
         name="stats", strides="(2,)"),
    case("rows_together", CS, "member_alone", lambda a: {"rows": None}, member="given", rows="None"),
    case("rows_together", OB, "rows_alone", lambda a: {"member": None}, member="None", rows="given"),
    case("member_dtype", CS, "bool", lambda a: {"member": a["member"].bool()}, dtype="torch.bool"),
    case("member_length", CS, "short", lambda a: {"member": a["member"][:-1]}, length="7", shape="(6,)"),
    case("member_length", OB, "2d", lambda a: {"member": a["member"].view(1, N + 1)}, length="7",
         shape="(1, 7)"),
    case("rows_dtype", CS, "i32", lambda a: {"rows": a["rows"].int()}, dtype="torch.int32"),
    case("rows_dtype", OB, "f32", lambda a: {"rows": a["rows"].float()}, dtype="torch.float32"),
    case("rows_length", CS, "short", lambda a: {"rows": a["rows"][:5]}, length="8", shape="(5,)"),
    case("rows_device", CS, "member", cuda("member"), True, name="member", device="cuda:0", of="logits",
         want="cpu"),
    case("rows_device", OB, "rows", cuda("rows"), True, name="rows", device="cuda:0", of="losses", want="cpu"),
    case("rows_contiguous", CS, "member", lambda a: {"member": torch.zeros(2 * N + 2, dtype=torch.uint8)[::2]},
         name="member", strides="(2,)"),
    case("rows_contiguous", OB, "rows", lambda a: {"rows": a["rows"].repeat_interleave(2)[::2]},
         name="rows", strides="(2,)"),
    case("epoch_dtype", CS, "i32", lambda a: {"epoch": a["epoch"].int()}, dtype="torch.int32"),
    case("epoch_dtype", OB, "f32", lambda a: {"epoch": torch.tensor(3.0)}, dtype="torch.float32"),
    case("epoch_shape", CS, "1", lambda a: {"epoch": a["epoch"].reshape(1)}, shape="(1,)"),
    case("epoch_device", CS, "cuda", cuda("epoch"), True, device="cuda:0", of="logits", want="cpu"),
    case("epoch_range", CS, "2**40", lambda a: {"member": None, "rows": None, "epoch": torch.tensor(2 ** 40)},
         value="1099511627776"),
    case("epoch_range", OB, "below", lambda a: {"epoch": torch.tensor(-2 ** 31 - 1)}, value="-2147483649"),
]


def test_every_fault_has_a_case():
    assert {p.values[0] for p in CASES} == set(faults.FAULTS)


def test_every_case_fills_every_field_of_its_template():
    for p in CASES:
        fault, _, _, fields = p.values
        assert set(fields) == set(faults.fields(fault)), p.id


def snapshot(a):
    return [t.clone() for t in a["state"]] + [t.clone() for t in (a["member"], a["rows"], a["epoch"])
                                              if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("fault,op,change,fields", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_fault_raises_the_same_exception_and_words_from_every_implementation(impl, fault, op, change, fields):
    if impl == "csrc" and fault.endswith("_device") and (op == OB or not _C.with_cuda):
        pytest.skip("no csrc CUDA kernel of this op to dispatch a call with a CUDA tensor to")
    a = base(op)
    a.update(change(a))
    before = snapshot(a)
    exc = {"TypeError": TypeError, "ValueError": ValueError}[faults.FAULTS[fault][0]]
    with pytest.raises(Exception) as e:
        call(op, impl, a)
    assert type(e.value) is exc, (type(e.value), str(e.value))
    assert str(e.value) == faults.message(fault, **fields)
    after = snapshot(a)
    for x, y in zip(before, after):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("op,change,first", [
    (CS, lambda a: {"logits": a["logits"].double(), "indices": a["indices"][:3]}, "logits_dtype"),
    (CS, lambda a: {"reduction": 9, **swap(3, torch.zeros(N + 1))(a)}, "reduction_range"),
    (CS, lambda a: {"rows": a["rows"].int(), **swap(7, torch.zeros(3, dtype=torch.long))(a)}, "state_vector_length"),
    (CS, lambda a: {"rows": a["rows"].int(), "epoch": a["epoch"].int()}, "rows_dtype"),
    (CS, lambda a: {"class_weight": torch.ones(3), "label_smoothing": 2.0}, "class_weight_shape"),
    (OB, lambda a: {"probs": torch.rand(3), "indices": a["indices"].float(), "ema": 0.0}, "probs_shape"),
    (OB, lambda a: {"indices": a["indices"].float(), "ema": 0.0}, "indices_dtype"),
])
def test_the_first_fault_is_the_same_from_every_implementation(op, change, first):
    msgs = set()
    for impl in IMPLS:
        a = base(op)
        a.update(change(a))
        with pytest.raises((TypeError, ValueError)) as e:
            call(op, impl, a)
        msgs.add((type(e.value), str(e.value)))
    assert len(msgs) == 1, msgs
    (exc, msg), = msgs
    assert exc.__name__ == faults.FAULTS[first][0]
    prefix = faults.FAULTS[first][1].split("{")[0]
    assert msg.startswith(prefix), (msg, first)


def test_a_valid_call_passes_the_checks():
    for impl in IMPLS:
        for op in (CS, OB):
            call(op, impl, base(op))


@pytest.mark.skipif(_C is None, reason="fastsel._C is not built")
def test_check_state_raises_the_table_faults():
    from fastsel.backends.base import state_args
    from fastsel.state import SampleState
    st = SampleState(50)
    args = list(state_args(st))
    args[3] = torch.zeros(51)
    with pytest.raises(TypeError) as e:
        _C.check_state(*args)
    assert str(e.value) == faults.message("state_dtype", name="state_seen", want="torch.int32",
                                          dtype="torch.float32")
    with pytest.raises(ValueError) as e:
        _C.check_state(*state_args(st, 0, EpochRows(49)))
    assert str(e.value) == faults.message("member_length", length="51", shape="(50,)")


# ---- the Sampler's checks: the same words ---------------------------------------------------

def test_the_sampler_raises_the_ops_words_for_the_faults_they_share():
    s = fastsel.Sampler(100, policy="uniform", budget=0.5, epochs=2, backend="reference")
    idx = torch.tensor(s.epoch_indices()[:8])
    x, y = torch.randn(8, 5), idx % 5
    for args, fault, fields in [
        ((x[0], y, idx), "logits_dim", dict(shape="(5,)")),
        ((x.long(), y, idx), "logits_dtype", dict(dtype="torch.int64")),
        ((x, y.to(torch.uint8), idx), "target_dtype", dict(dtype="torch.uint8")),
        ((x, y[:, None], idx), "target_indices_shape", dict(want="(8,)", logits="(8, 5)", shape="(8, 1)")),
        ((x, y, idx[:-1]), "indices_length", dict(length="7", of="logits", batch="8")),
    ]:
        with pytest.raises((TypeError, ValueError)) as e:
            s.loss(*args)
        assert type(e.value).__name__ == faults.FAULTS[fault][0]
        assert str(e.value) == faults.message(fault, **fields)
    with pytest.raises(ValueError) as e:
        s.observe(torch.rand(8), idx, p_true=torch.rand(3))
    assert str(e.value) == faults.message("probs_shape", name="p_true", want="(8,)", shape="(3,)")


# ---- the generated header ---------------------------------------------------------------------

def test_committed_faults_header_is_generated_from_the_table():
    with open(os.path.join(ROOT, "csrc", "faults.h")) as f:
        assert f.read() == faults.header(), \
            "run `python fastsel/validation/faults.py` (setup.py does before a build)"


def test_faults_module_is_import_free_and_checks_cite_the_table():
    with open(faults.__file__) as f:
        src = f.read()
    body = src.split('if __name__ == "__main__":')[0]
    assert "\nimport " not in body and "\nfrom " not in body
    with open(os.path.join(ROOT, "csrc", "checks.cpp")) as f:
        checks = f.read()
    for name in faults.FAULTS:
        assert f"faults::{name.upper()}" in checks, f"csrc/checks.cpp never raises {name}"


def test_setup_regenerates_faults_header(monkeypatch, tmp_path):
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    ns = {"__name__": "fastsel_setup_under_test", "__file__": os.path.join(ROOT, "setup.py")}
    with open(os.path.join(ROOT, "setup.py")) as f:
        exec(compile(f.read(), "setup.py", "exec"), ns)
    (tmp_path / "fastsel" / "validation").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    with open(faults.__file__) as f:
        src = f.read()
    (tmp_path / "fastsel" / "validation" / "faults.py").write_text(
        src.replace("got shape {shape}\"),", "got the shape {shape}\"),", 1))
    (tmp_path / "csrc" / "faults.h").write_text("stale")
    ns["ROOT"] = str(tmp_path)
    ns["write_faults_header"]()
    text = (tmp_path / "csrc" / "faults.h").read_text()
    assert text.startswith("// Generated from fastsel/validation/faults.py") and "got the shape {shape}" in text
    mtime = os.stat(tmp_path / "csrc" / "faults.h").st_mtime_ns
    ns["write_faults_header"]()  # unchanged: not rewritten (no rebuild)
    assert os.stat(tmp_path / "csrc" / "faults.h").st_mtime_ns == mtime
