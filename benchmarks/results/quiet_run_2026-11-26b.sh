#!/usr/bin/env bash
# The benchmark runs quoted in the stop-8 closing note (2026-11-26, second session), on this
# 2-core machine with nothing else running. Output: quiet_run_2026-11-26b.log next to this file
# and the JSON files named below.
cd "$(dirname "$0")/../.."
D=../shared/datasets
R=benchmarks/results
echo "### start $(date -u +%T) load $(cat /proc/loadavg)"
echo "### bench_ctr (OpenMP default wait policy)"
.venv/bin/python benchmarks/bench_ctr.py --omp-wait-policy "" --out $R/bench_ctr_omp_default.json 2>&1 | tail -8
echo "### bench_ctr (OMP_WAIT_POLICY=PASSIVE, as the metactr CLI sets it) $(date -u +%T)"
.venv/bin/python benchmarks/bench_ctr.py --out $R/bench_ctr.json 2>&1 | tail -8
echo "### bench_meta $(date -u +%T)"
OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_meta.py --data $D/ml-1m-rml --models rml,deepfm --steps 1,5 \
  --reps 3 --threads 2 --impls vmap,vmap-dense,loop-func,loop-l2l --epoch --epoch-threads 1,2 --out $R/bench_meta.json 2>&1 | tail -12
for t in 2 1; do
  for ds in "ml-100k ml-100k" "ml-1m ml-1m-partial"; do
    set -- $ds
    echo "### bench_selector $1, $t thread(s) $(date -u +%T)"
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_selector.py --dataset $1 --data-dir $D/$2 \
      --episodes 5 --warmup 1 --threads $t 2>&1 | tail -6
  done
done
echo "### end $(date -u +%T) load $(cat /proc/loadavg)"
# Added after the first pass: the CTR comparison again, 3 alternating rounds per model, median ratios
# (single runs of the same code varied by up to 50% for prediction on this machine).
echo "### bench_ctr --repeat 3 (OpenMP default wait policy) $(date -u +%T)"
.venv/bin/python benchmarks/bench_ctr.py --omp-wait-policy "" --repeat 3 --out $R/bench_ctr_omp_default.json 2>&1 | tail -16
echo "### end $(date -u +%T) load $(cat /proc/loadavg)"
