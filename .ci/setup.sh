#!/usr/bin/env bash
# Sets up everything fastsel needs on a fresh Debian machine with Python 3.11 and root:
# apt packages for FFCV, a virtual environment in .venv, torch (only if not importable),
# triton, the test tools, FFCV, and fastsel itself (building csrc/ where it can).
# Idempotent: a stamp keyed on the set-up inputs skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FASTSEL_VENV:-.venv}
stamp_key=$({ cat .ci/setup.sh setup.py pyproject.toml; { find csrc -type f 2>/dev/null || true; } | LC_ALL=C sort | xargs -r cat; } 2>/dev/null | sha256sum | cut -c1-16)
stamp="$VENV/.fastsel-setup-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

log() { printf '[setup] %s\n' "$*" >&2; }

# FFCV compiles against OpenCV and libjpeg-turbo and finds them with pkg-config.
need_apt=""
for pkg in pkg-config libopencv-dev libturbojpeg0-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt="$need_apt $pkg"
done
if [ -n "$need_apt" ]; then
  log "apt-get install$need_apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $need_apt >/dev/null
fi

# System site-packages stay visible, so a torch the machine already has is used as is.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

# Never let a dependency range pick torch: a plain 'torch' pulls gigabytes of CUDA wheels.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  log "installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi
torch_ver=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
# A constraints file pins the torch we have, so nothing below can replace it.
constraints="$VENV/fastsel-constraints.txt"
echo "torch==$torch_ver" > "$constraints"

log "installing triton, numpy, test and job tools"
# Triton and torchdata are pinned: the interpreter and the Stateful protocol are what the tests exercise.
pip_install -c "$constraints" "triton==3.9.0" numpy pytest pytest-benchmark tqdm scikit-learn "torchdata==0.11.0" matplotlib setuptools wheel ninja

# Lightning, Accelerate and Transformers (fastsel's optional integrations, tested by
# tests/test_lightning.py, tests/test_accelerate.py and tests/test_transformers.py); the
# constraints file keeps the installed torch. Not torchvision or timm: the registry's wheels
# do not load with a CPU torch here, and the tests build their models from configs.
log "installing lightning, accelerate, transformers"
pip_install -c "$constraints" "lightning==2.6.6" "accelerate==1.15.0" "transformers==5.25.0"

log "installing FFCV"
pip_install -c "$constraints" pillow numba opencv-python-headless
pip_install -c "$constraints" --no-build-isolation ffcv pillow

log "installing fastsel (with csrc/ where it builds)"
pip_install -c "$constraints" --no-build-isolation --no-deps -e .

rm -f "$VENV"/.fastsel-setup-*
touch "$stamp"
log "done"
