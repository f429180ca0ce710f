#!/usr/bin/env bash
# The four synthetic settings (clean, noisy, redundant, noisy + redundant) of
# docs/comparisons.md, from any checkout: `bash bench/compare_synthetic.sh OUT [SETTING...]`.
# Each setting's results land in OUT/<setting>/ (results.json, results.md, plots) and its log
# in OUT/<setting>.log. Knobs (environment): N_TRAIN (3000), SEEDS (5), BUDGETS (0.2,0.3),
# POLICIES (uniform,rs2,p-sgd,tftb,infobatch,rho,sb), BASELINE (rs2), EPOCHS (10).
# One thread per run (OMP_NUM_THREADS=1): two threads ran 3x slower on this shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/compare_synthetic.sh OUT [clean noisy redundant noisy_redundant]}
shift
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(clean noisy redundant noisy_redundant)
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
common=(--dataset synthetic --n-train "${N_TRAIN:-3000}" --n-test 1000 --epochs "${EPOCHS:-10}"
        --seeds "${SEEDS:-5}" --budgets "${BUDGETS:-0.2,0.3}" --baseline "${BASELINE:-rs2}"
        --policies "${POLICIES:-uniform,rs2,p-sgd,tftb,infobatch,rho,sb}" --no-progress)
mkdir -p "$out"
for s in "${settings[@]}"; do
  case $s in
    clean) extra=() ;;
    noisy) extra=(--label-noise 0.2) ;;
    redundant) extra=(--redundancy 0.5) ;;
    noisy_redundant) extra=(--label-noise 0.2 --redundancy 0.5) ;;
    *) echo "unknown setting $s (clean, noisy, redundant, noisy_redundant)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  echo "== $s start $(date -u +%FT%TZ): fastsel compare ${common[*]} ${extra[*]} --out $out/$s"
  "$PY" -m fastsel compare "${common[@]}" "${extra[@]}" --out "$out/$s" > "$out/$s.log" 2>&1
  echo "== $s rc=$? wall $(( $(date +%s) - start )) s"
done
