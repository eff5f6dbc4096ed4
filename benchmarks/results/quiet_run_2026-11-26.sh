#!/usr/bin/env bash
# The benchmark runs quoted in the 2026-11-26 closing note, on this 2-core machine with nothing else
# running. Output: benchmarks/results/quiet_run_2026-11-26.log and the JSON files named below.
cd "$(dirname "$0")/../.."
D=../shared/datasets
R=benchmarks/results
echo "### start $(date -u +%T) load $(cat /proc/loadavg)"
echo "### bench_ctr (OMP_WAIT_POLICY=PASSIVE, as the metactr CLI sets it)"
.venv/bin/python benchmarks/bench_ctr.py --out $R/bench_ctr.json 2>&1 | tail -8
echo "### bench_ctr (OpenMP default wait policy) $(date -u +%T)"
.venv/bin/python benchmarks/bench_ctr.py --omp-wait-policy "" --out $R/bench_ctr_omp_default.json 2>&1 | tail -8
echo "### bench_meta $(date -u +%T)"
OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_meta.py --data $D/ml-1m-rml --models rml,deepfm --steps 1,5 \
  --reps 3 --threads 2 --impls vmap,vmap-dense,loop-func,loop-l2l --epoch --out $R/bench_meta.json 2>&1 | tail -12
echo "### bench_selector ml-100k $(date -u +%T)"
OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_selector.py --dataset ml-100k --data-dir $D/ml-100k \
  --episodes 5 --warmup 1 --threads 2 2>&1 | tail -6
echo "### bench_selector ml-1m-partial $(date -u +%T)"
OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_selector.py --dataset ml-1m --data-dir $D/ml-1m-partial \
  --episodes 5 --warmup 1 --threads 2 2>&1 | tail -6
echo "### end $(date -u +%T) load $(cat /proc/loadavg)"
