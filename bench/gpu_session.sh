#!/usr/bin/env bash
# A GPU machine's whole check in one call, under 10 minutes: build fastsel._C with CUDA
# (skipped when nothing it is built from changed: a rerun does not rebuild), run the GPU
# tests, then bench/gpu_fastpath.py (the fused step and the selection next to plain PyTorch,
# torch.topk and bare F.cross_entropy, measured in the same run; and, under "loss_calls", the
# profiler's count of kernel launches, kernels, copies and host syncs per whole loss call,
# sampler.loss(logits, y, idx).backward(), with its host microseconds, for the cuda and
# triton backends at B=256, C=10/100/1000). The results JSON goes to
# $OUT/gpu_fastpath_<gpu>.json and bench/results/gpu_fastpath_<gpu>.json; logs to $OUT/logs
# ($OUT: default a fresh temporary folder). Copy the JSON from $OUT into bench/results/ to keep it.
#
#   bash bench/gpu_session.sh [all|tests|bench|extra]      (default all)
#     all    build, GPU tests, gpu_fastpath.py          (the one short run)
#     tests  build, GPU tests
#     bench  build, gpu_fastpath.py
#     extra  build, the older and longer benchmarks: bench_triton.py, `fastsel bench --full`, gpu_profile.py
#   env: PY (python3), DEADLINE (570: seconds for the whole run; each stage gets what is left),
#        TESTS_EXTRA (more test files), GPU_TAG (name of the result files), ARCH (9.0, TORCH_CUDA_ARCH_LIST)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs" bench/results
what=${1:-all}
PY=${PY:-python3}
ARCH=${ARCH:-9.0}
DEADLINE=${DEADLINE:-570}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
# min(cap, time left - reserve): a stage never eats the time of the ones after it.
budget() { local b=$(( $(left) - $2 )); (( b > $1 )) && b=$1; (( b < 10 )) && b=10; echo $b; }
# The result files are named for the GPU (e.g. h100, h200), or GPU_TAG.
TAG=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E "[a-z][0-9]{2,3}" | head -1 | tr 'A-Z' 'a-z')}
TAG=${TAG:-gpu}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/logs/env.txt"

# ---- build, cached on what it is built from -----------------------------------------------------
# (layout.h is left out: setup.py rewrites it from fastsel/layout.py, which is in)
key=$({ cat setup.py fastsel/layout.py; find csrc -type f ! -name cuda_emulate.cuh ! -name layout.h | LC_ALL=C sort | xargs cat;
        echo "$ARCH"; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; nvcc --version; } 2>&1 | sha256sum | cut -c1-16)
stamp="build/.fastsel-gpu-build-$key"
if [[ -f $stamp ]] && $PY -c "import fastsel._C as c, sys; sys.exit(0 if c.with_cuda else 1)" 2>/dev/null; then
  echo "build: cached ($stamp)" | tee -a "$OUT/logs/env.txt"
else
  start=$(date +%s)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} timeout "$(budget 360 200)" \
    $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/logs/build.log" 2>&1
  rc=$?
  echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/logs/env.txt"
  tail -5 "$OUT/logs/build.log"
  if [[ $rc == 0 ]]; then mkdir -p build && rm -f build/.fastsel-gpu-build-* && touch "$stamp"; fi
fi
$PY -c "import fastsel; print('backends', fastsel.list_backends())" 2>&1 | tee -a "$OUT/logs/env.txt"

# ---- tests ---------------------------------------------------------------------------------------
if [[ $what == tests || $what == all ]]; then
  xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n 8"
  timeout "$(budget 300 $([[ $what == all ]] && echo 150 || echo 5))" $PY -m pytest -q --maxfail=40 -p no:cacheprovider $xdist \
    tests/test_gpu_fastpath.py tests/test_backends.py tests/test_csrc.py tests/test_triton.py tests/test_no_sync.py \
    tests/test_sampler.py ${TESTS_EXTRA:-} > "$OUT/logs/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/logs/tests.log"
fi

# ---- the fast path's numbers ---------------------------------------------------------------------
if [[ $what == bench || $what == all ]]; then
  timeout "$(budget 300 5)" $PY bench/gpu_fastpath.py --out "$OUT/gpu_fastpath_$TAG.json" \
    > "$OUT/logs/gpu_fastpath.log" 2>&1
  echo "gpu_fastpath rc=$?"; grep -v -i -E "warn|profiler_st" "$OUT/logs/gpu_fastpath.log" | grep -E "^loss " | tail -6
  grep -v -i -E "warn|profiler_st" "$OUT/logs/gpu_fastpath.log" | tail -24
  [[ -f $OUT/gpu_fastpath_$TAG.json ]] && cp "$OUT/gpu_fastpath_$TAG.json" bench/results/
fi

if [[ $what == extra ]]; then
  timeout "$(budget 200 100)" $PY bench/bench_triton.py --out "$OUT/triton_bench_$TAG.json" > "$OUT/logs/bench.log" 2>&1
  echo "bench_triton rc=$?"
  timeout "$(budget 200 60)" $PY -m fastsel bench --device cuda --full --out "$OUT/core_cuda_$TAG.json" 2>&1 | tee -a "$OUT/logs/bench.log" | tail -30
  echo "bench_core rc=${PIPESTATUS[0]}"
  timeout "$(budget 200 5)" $PY bench/gpu_profile.py --out "$OUT/gpu_profile_$TAG.json" 2>&1 | tee -a "$OUT/logs/bench.log" | grep -v -i warn | tail -26
  echo "gpu_profile rc=${PIPESTATUS[0]}"
fi
echo "session: $(( $(date +%s) - t0 )) s, results in $OUT"
