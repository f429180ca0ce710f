#!/bin/bash
# The four synthetic settings of issue 15, one after the other.
cd /work/main
export OMP_NUM_THREADS=1
COMMON="--dataset synthetic --n-train 1500 --n-test 1000 --epochs 10 --seeds 3 --budgets 0.2,0.3 --policies uniform,p-sgd,tftb,infobatch,rho --no-progress"
run() {
  name=$1; shift
  start=$(date +%s)
  echo "== $name start $(date -u +%FT%TZ): OMP_NUM_THREADS=1 fastsel compare $COMMON $* --out results/compare_$name"
  .venv/bin/python -m fastsel compare $COMMON "$@" --out results/compare_$name > results/compare_$name.log 2>&1
  echo "== $name rc=$? wall $(( $(date +%s) - start )) s"
}
run clean
run noisy --label-noise 0.2
run redundant --redundancy 0.5
run noisy_redundant --label-noise 0.2 --redundancy 0.5
