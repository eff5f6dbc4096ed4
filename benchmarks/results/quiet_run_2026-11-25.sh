#!/usr/bin/env bash
cd /work/main
export OMP_WAIT_POLICY=PASSIVE
D=../shared/datasets
echo "### start $(date -u +%T) load $(cat /proc/loadavg)"
echo "### bench_meta"; .venv/bin/python benchmarks/bench_meta.py --data $D/ml-1m-rml --models rml,deepfm --steps 1,5 --reps 3 --threads 2 --epoch --out /tmp/bench/meta.json 2>&1 | tail -25
echo "### bench_selector $(date -u +%T)"; .venv/bin/python benchmarks/bench_selector.py --dataset ml-100k --data-dir $D/ml-100k --episodes 5 --warmup 1 2>&1 | tail -5
echo "### bench_prepare $(date -u +%T)"; .venv/bin/python benchmarks/bench_prepare.py --rows 10000000 --pandas-rows 2000000 --workdir /tmp/bench/prep 2>&1 | tail -15
echo "### bench_ctr $(date -u +%T)"; .venv/bin/python benchmarks/bench_ctr.py 2>&1 | tail -25
echo "### end $(date -u +%T) load $(cat /proc/loadavg)"
