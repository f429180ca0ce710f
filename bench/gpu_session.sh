#!/usr/bin/env bash
# A GPU machine's whole check in one call: build fastsel._C with CUDA, run the test files that
# exercise the GPU backends, then the GPU benchmarks (bench_triton.py, `fastsel bench --device
# cuda --full`, gpu_profile.py). JSON goes to $OUT and logs to $OUT/logs (default: a fresh temporary folder);
# copy the JSON into bench/results/ to keep it.
#   bash bench/gpu_session.sh [tests|bench|all]   (default all; PY, TEST_TIMEOUT, TESTS_EXTRA)
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
what=${1:-all}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
# The result files are named for the GPU (e.g. h100, h200), or GPU_TAG.
TAG=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E "[a-z][0-9]{2,3}" | head -1 | tr 'A-Z' 'a-z')}
TAG=${TAG:-gpu}
# Logs go to $OUT/logs/ (a device call brings back at most 8 files: the 3 JSON + these).
mkdir -p "$OUT/logs"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/logs/env.txt"

start=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/logs/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/logs/env.txt"
tail -5 "$OUT/logs/build.log"
$PY -c "import fastsel; print('backends', fastsel.list_backends())" 2>&1 | tee -a "$OUT/logs/env.txt"

if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-400} $PY -m pytest -q --maxfail=40 -p no:cacheprovider -n 8 \
    tests/test_backends.py tests/test_triton.py tests/test_csrc.py tests/test_no_sync.py \
    tests/test_sampler.py tests/test_resume.py tests/test_selective.py ${TESTS_EXTRA:-} \
    > "$OUT/logs/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/logs/tests.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 200 $PY bench/bench_triton.py --out "$OUT/triton_bench_$TAG.json" > "$OUT/logs/bench.log" 2>&1
  echo "bench_triton rc=$?"
  timeout 200 $PY -m fastsel bench --device cuda --full --out "$OUT/core_cuda_$TAG.json" 2>&1 | tee -a "$OUT/logs/bench.log" | tail -30
  echo "bench_core rc=${PIPESTATUS[0]}"
  timeout 200 $PY bench/gpu_profile.py --out "$OUT/gpu_profile_$TAG.json" 2>&1 | tee -a "$OUT/logs/bench.log" | grep -v -i warn | tail -26
  echo "gpu_profile rc=${PIPESTATUS[0]}"
fi
