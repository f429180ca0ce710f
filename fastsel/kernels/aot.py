"""Ahead-of-time build of every kernel at every configuration the launcher can choose, for
sm_80 and sm_90, without a GPU; and each build's registers, spills and shared memory.

The interpreter replaces ``@triton.jit`` at decoration time when ``TRITON_INTERPRET=1``,
so this must run in a process whose kernels were imported without it: ``run_subprocess``
starts one with the variable removed. CLI (from the repository root):
``python -m fastsel.kernels.aot --out report.json`` (installed), or
``python -c "from fastsel.backends.triton import load_kernels as l; l('aot').main()"``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ARCHS = (80, 90)

_F32, _F64, _I64, _I32, _U8 = "*fp32", "*fp64", "*i64", "*i32", "*u8"
#: Runtime argument types of each kernel, in order; ``{dtype}`` is the logits' element type
#: and ``{index}`` that of labels and indices.
SIGNATURES: Dict[str, List[tuple]] = {
    "ce_step_kernel": [("logits_ptr", "*{dtype}"), ("stride_row", "i32"),
                       ("labels_ptr", "*{index}"), ("indices_ptr", "*{index}"), ("pweight_ptr", _F32), ("cweight_ptr", _F32),
                       ("loss_ptr", _F32), ("ptrue_ptr", _F32), ("row_ptr", _F32),
                       ("wy_ptr", _F32), ("flags_ptr", _I32), ("grad_ptr", "*{dtype}"),
                       ("dup_ptr", _I32), ("acc_ptr", _F64), ("grp_ptr", _I32),
                       ("member_ptr", _U8), ("rows_ptr", _I64),
                       ("B", "i32"), ("C", "i32"), ("N", "i32"), ("ignore_index", "i32"),
                       ("eps", "fp32"), ("one_m_eps", "fp32"), ("count", "i32"),
                       ("check", "i32")],
    "merge_update_kernel": [("flags_ptr", _I32), ("indices_ptr", _I64), ("labels_ptr", _I64),
                            ("loss_ptr", _F32), ("ptrue_ptr", _F32), ("row_ptr", _F32),
                            ("wy_ptr", _F32), ("s_loss_ptr", _F32),
                            ("s_var_ptr", _F32), ("s_p_ptr", _F32), ("s_seen_ptr", _I32),
                            ("s_last_ptr", _I32), ("stats_ptr", _F64), ("errors_ptr", _I64),
                            ("out_ptr", _F32), ("scale_ptr", _F32),
                            ("dup_ptr", _I32), ("acc_ptr", _F64), ("grp_ptr", _I32),
                            ("part_ptr", _F64), ("rows_ptr", _I64), ("epoch_ptr", _I64),
                            ("B", "i32"), ("N", "i32"), ("ema", "fp32"),
                            ("one_m_ema", "fp32"), ("update", "i32"),
                            ("reduction", "i32"), ("safe_mean", "i32"), ("check", "i32")],
    "observe_rows_kernel": [("losses_ptr", "*{dtype}"), ("probs_ptr", "*{dtype}"),
                            ("indices_ptr", "*{index}"), ("pweight_ptr", _F32),
                            ("loss_ptr", _F32), ("ptrue_ptr", _F32), ("row_ptr", _F32),
                            ("wy_ptr", _F32), ("flags_ptr", _I32), ("scale_ptr", _F32),
                            ("dup_ptr", _I32), ("acc_ptr", _F64), ("grp_ptr", _I32),
                            ("member_ptr", _U8), ("rows_ptr", _I64),
                            ("B", "i32"), ("N", "i32"), ("count", "i32"), ("check", "i32")],
    "scale_grad_kernel": [("grad_ptr", "*{dtype}"), ("gout_ptr", _F32), ("gout_stride", "i32"),
                          ("scale_ptr", _F32), ("out_ptr", "*{dtype}"), ("numel", "i64"),
                          ("C", "i32")],
    "radix_first_kernel": [("keys_ptr", _F32), ("N", "i32"), ("k", "i32"), ("ctrl_ptr", _I64),
                           ("hist_ptr", _I32)],
    "radix_filter_kernel": [("keys_ptr", _F32), ("N", "i32"), ("ctrl_ptr", _I64),
                            ("hist_ptr", _I32), ("cand_ptr", _I32)],
    "radix_cand_kernel": [("keys_ptr", _F32), ("ctrl_ptr", _I64), ("hist_ptr", _I32),
                          ("cand_ptr", _I32)],
    "select_compact_kernel": [("keys_ptr", _F32), ("N", "i32"), ("ctrl_ptr", _I64),
                              ("status_ptr", _I64), ("out_idx_ptr", _I64), ("out_key_ptr", _I32)],
    "batch_topk_kernel": [("keys_ptr", _F32), ("B", "i32"), ("k", "i32"), ("out_ptr", _I64)],
    "uniform_kernel": [("idx_ptr", _I64), ("out_ptr", _F32), ("n", "i32"), ("base", "i64")],
}
#: The ``fastsel.kernels`` module that defines each kernel.
KERNEL_MODULES: Dict[str, str] = {
    "ce_step_kernel": "cross_entropy", "observe_rows_kernel": "observe",
    "merge_update_kernel": "merge", "scale_grad_kernel": "scale_grad",
    "radix_first_kernel": "select", "radix_filter_kernel": "select", "radix_cand_kernel": "select",
    "select_compact_kernel": "select", "batch_topk_kernel": "select", "uniform_kernel": "noise"}


def _kernel(name: str):
    from fastsel.backends.triton import load_kernels
    return getattr(load_kernels(KERNEL_MODULES[name]), name)


def _ptxas(arch: int) -> Optional[str]:
    """The ptxas Triton itself uses for ``arch``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:
        return None


def _resources(ptx: str, shared: int, sm: int) -> Dict[str, object]:
    """Registers and spills from ``ptxas -v`` on the kernel's PTX; shared memory from Triton."""
    out: Dict[str, object] = {"shared_bytes": shared}
    ptxas = _ptxas(sm)
    if ptxas is None:
        return out
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch.group(1) if arch else 'sm_80'}",
                            src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    info = r.stderr + r.stdout
    m = re.search(r"Used (\d+) registers", info)
    s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    out["registers"] = int(m.group(1)) if m else None
    out["spill_store_bytes"] = int(s.group(1)) if s else None
    out["spill_load_bytes"] = int(s.group(2)) if s else None
    return out


def compile_one(cfg: Dict, arch: int) -> Dict[str, object]:
    """Compile one configuration for ``sm_<arch>``; return its description and resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = cfg["kernel"]
    dtype = cfg.get("dtype", "fp32")
    index = cfg.get("index", "i64")
    sig = {a: t.format(dtype=dtype, index=index) for a, t in SIGNATURES[name]}
    consts = dict(cfg["constexprs"])
    for k in consts:
        sig[k] = "constexpr"
    t0 = time.perf_counter()
    src = ASTSource(fn=_kernel(name), signature=sig, constexprs=consts)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": cfg["num_warps"], **cfg.get("options", {})})
    rec: Dict[str, object] = {"kernel": name, "target": f"cuda:sm_{arch}", "dtype": dtype,
                              "index": index,
                              "num_warps": cfg["num_warps"], "constexprs": consts,
                              "compile_s": round(time.perf_counter() - t0, 3),
                              "cubin_bytes": len(ck.asm["cubin"])}
    rec.update(_resources(ck.asm["ptx"], int(ck.metadata.shared), arch))
    return rec


def compile_all(archs: Sequence[int] = ARCHS, kernels: Optional[Sequence[str]] = None,
                resources: bool = True) -> List[Dict[str, object]]:
    """Compile every launcher configuration (optionally only some kernels) for each arch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs kernels imported without TRITON_INTERPRET=1; "
                           "use run_subprocess()")
    from fastsel.backends.triton import load_kernels
    cfgs = load_kernels("configs").gpu_configs()
    if kernels is not None:
        cfgs = [c for c in cfgs if c["kernel"] in kernels]
    out = []
    for arch in archs:
        for cfg in cfgs:
            rec = compile_one(cfg, arch)
            if not resources:
                for k in ("registers", "spill_store_bytes", "spill_load_bytes"):
                    rec.pop(k, None)
            out.append(rec)
    return out


def run_subprocess(args: Sequence[str] = (), timeout: float = 900,
                   archs: Sequence[int] = ARCHS) -> Dict[str, object]:
    """Run ``main(args)`` without ``TRITON_INTERPRET``, one fresh interpreter per arch in
    parallel; return the merged JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import sys; from fastsel.backends.triton import load_kernels as l; "
            "l('aot').main(sys.argv[1:])")
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for arch in archs:
            out = os.path.join(d, f"aot{arch}.json")
            p = subprocess.Popen([sys.executable, "-c", code, "--out", out, "--arch", str(arch),
                                  *args], env=env, cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            procs.append((p, out))
        reports = []
        for p, out in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"AOT build failed (rc={p.returncode}):\n{err[-4000:]}")
            reports.append(json.loads(Path(out).read_text()))
    merged = dict(reports[0])
    merged["targets"] = [t for r in reports for t in r["targets"]]
    merged["total_compile_s"] = round(sum(r["total_compile_s"] for r in reports), 2)
    merged["kernels"] = [k for r in reports for k in r["kernels"]]
    merged["command"] = "python -m fastsel.kernels.aot " + " ".join(args)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON report here (default: stdout)")
    ap.add_argument("--arch", type=int, action="append", help="sm_XX to build (default 80, 90)")
    ap.add_argument("--kernel", action="append", help="only these kernels")
    ap.add_argument("--no-resources", action="store_true", help="skip ptxas -v (faster)")
    a = ap.parse_args(argv)
    import triton
    t0 = time.perf_counter()
    recs = compile_all(a.arch or ARCHS, a.kernel, resources=not a.no_resources)
    report = {"triton": triton.__version__, "targets": [f"cuda:sm_{x}" for x in (a.arch or ARCHS)],
              "command": "python -m fastsel.kernels.aot " + " ".join(argv or sys.argv[1:]),
              "total_compile_s": round(time.perf_counter() - t0, 2), "kernels": recs}
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
