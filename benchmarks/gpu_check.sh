#!/usr/bin/env bash
# The CUDA paths of metactr, checked on a GPU machine in one time-boxed run.
#
#   On the lent device machine (its tool sets OUT; the wheels and data travel as .whl, .devdata):
#       PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh
#   Dry run on a CPU machine (same stages, device=cpu, ML-100K and small sizes), e.g.
#       DEVICE=cpu OUT=$(mktemp -d) PY=.venv/bin/python BENCH_PY=.bench-venv/bin/python DATASET=ml100k \
#         METACTR_DATA=../shared/datasets BENCH_ROWS=5000 BENCH_TEST_ROWS=1000 THREADS=1 \
#         taskset -c 1 bash benchmarks/gpu_check.sh
#   Rerun some stages only: STAGES="pytest_cuda bench_ctr" bash benchmarks/gpu_check.sh
#   Mixed precision: PRECISION=bf16 (the CLI stages and our side of bench_ctr)
#
# Stages (each under `timeout`; a failing stage does not stop the others; a PASS/FAIL summary
# ends the log): env facts, tests/test_cuda.py, the CLI end to end on ML-1M-partial (train
# DeepFM on DEVICE, --resume, evaluate the device checkpoint on CPU; train DIN), the same train
# under torchrun --nproc_per_node=1, GPU throughput (bench_ctr.py ours vs DeepCTR-Torch,
# bench_meta.py), and the CPU trainer/DDP tests. Everything written back goes to $OUT (5 files):
#   gpu_check.log   the whole log          gpu_check.json  stages, env facts, CLI run results
#   bench_ctr.json  bench_ctr.py report    bench_meta_{deepfm,rml}.json  bench_meta.py reports
#
# Packages missing on the device image go to $SITE from wheels in .whl/ (installed only when
# `import polars, pydantic` fails). They were fetched with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#     polars==2.1.0 polars-runtime-32==2.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing_extensions==4.16.0 typer==0.29.2 annotated-doc==0.0.7 rich==15.0.0 \
#     deepctr-torch==0.3.0
# (the project venv's versions; typer 0.29 needs pydantic; deepctr-torch's needs are on the image).
# Data: $METACTR_DATA, else .devdata/ (ml-1m-rml/ and ml-1m-partial.tar.xz, unpacked to $WORK).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WORK=${WORK:-/tmp/metactr_gpu_check}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-400}          # the whole script; stages that would not fit are skipped
STAGE_TIMEOUT=${STAGE_TIMEOUT:-120}
EPOCHS=${EPOCHS:-1}                # CLI training epochs (the --resume stage adds one)
BENCH_ROWS=${BENCH_ROWS:-200000}
BENCH_TEST_ROWS=${BENCH_TEST_ROWS:-50000}
THREADS=${THREADS:-4}               # torch threads of the CLI runs and benchmarks
DATASET=${DATASET:-ml1m}           # configs/{deepfm,din}_$DATASET.yaml
STAGES=${STAGES:-}                 # space-separated subset; empty = all
PRECISION=${PRECISION:-fp32}       # the CLI runs' and bench_ctr's (ours) precision: fp32 or bf16
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
REC=$WORK/stages.tsv
: >"$LOG"
: >"$REC"
T_START=$SECONDS

log() { echo "$*" | tee -a "$LOG"; }

# --------------------------------------------------------------------------- environment
if [ -d .whl ] && ! "$PY" -c "import polars, pydantic" 2>/dev/null; then
  log "installing $(ls .whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | tail -5 | tee -a "$LOG"
  rm -rf "$SITE/tests"  # deepctr-torch ships a top-level tests package
fi
export PYTHONPATH="$ROOT/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} CI=1   # CI: no progress bars in the log
BENCH_PY=${BENCH_PY:-$(command -v "$PY")}  # bench_ctr.py wants a path

if [ -z "${METACTR_DATA:-}" ]; then
  export METACTR_DATA=$WORK/data
  mkdir -p "$METACTR_DATA"
  [ -e "$METACTR_DATA/ml-1m-rml" ] || ln -s "$ROOT/.devdata/ml-1m-rml" "$METACTR_DATA/ml-1m-rml"
  if [ ! -d "$METACTR_DATA/ml-1m-partial" ] && [ -f .devdata/ml-1m-partial.tar.xz ]; then
    tar -xJf .devdata/ml-1m-partial.tar.xz -C "$METACTR_DATA"
  fi
fi
RUNS=$WORK/runs
PREP=$WORK/prepared/$DATASET-random
log "device=$DEVICE python=$PY METACTR_DATA=$METACTR_DATA WORK=$WORK OUT=$OUT budget=${BUDGET_S}s"

# --------------------------------------------------------------------------- stage runner
wanted() { [ -z "$STAGES" ] || [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME TIMEOUT_S CMD...: run CMD under timeout, log it, record PASS/FAIL/TIMEOUT/SKIP
stage() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET_S - (SECONDS - T_START) - 5))
  if [ "$left" -lt 15 ]; then
    log "=== [$name] SKIP: ${left}s of the budget left"
    printf '%s\tSKIP\t0\t-\n' "$name" >>"$REC"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "=== [$name] (timeout ${limit}s) $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} status=PASS
  [ "$rc" -ne 0 ] && status=FAIL
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=TIMEOUT
  log "=== [$name] $status rc=$rc in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$rc" >>"$REC"
}

CLI=("$PY" -m metactr.cli)
TRAIN_SET=(--set "device=$DEVICE" --set "data.out=$PREP" --set progress=false --set tensorboard=false
           --set "threads=$THREADS" --set "precision=$PRECISION")

# --------------------------------------------------------------------------- stages
stage env 60 "$PY" -c "
import json, platform, torch
f = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
     'cuda_available': torch.cuda.is_available(), 'device_count': torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    f.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
             capability='%d.%d' % (p.major, p.minor), nccl=torch.cuda.nccl.version(),
             cudnn=torch.backends.cudnn.version())
import polars, pydantic, typer, rich
f.update(polars=polars.__version__, pydantic=pydantic.__version__, typer=typer.__version__)
try:
    import deepctr_torch; f['deepctr_torch'] = deepctr_torch.__version__
except Exception as e:
    f['deepctr_torch'] = 'missing: %s' % e
print(json.dumps(f))
open('$WORK/env.json', 'w').write(json.dumps(f))
"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"

export METACTR_TEST_DEVICE=$DEVICE
stage pytest_cuda 180 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
  --durations=8 -o addopts="-ra"

# the CLI end to end on real data: prepare + train on DEVICE, resume, evaluate on CPU
rm -rf "$RUNS"
stage train_deepfm 150 "${CLI[@]}" train configs/deepfm_$DATASET.yaml "${TRAIN_SET[@]}" --set "epochs=$EPOCHS" \
  --set "out=$RUNS/deepfm"
stage resume_deepfm 90 "${CLI[@]}" train configs/deepfm_$DATASET.yaml "${TRAIN_SET[@]}" \
  --set "epochs=$((EPOCHS + 1))" --set "out=$RUNS/deepfm" --resume
stage evaluate_deepfm 60 "${CLI[@]}" evaluate "$RUNS/deepfm/best.safetensors" --data "$PREP" --split test \
  --out "$WORK/evaluate_deepfm.json"
stage evaluate_matches_train 30 "$PY" -c "
import json, sys
ev = json.load(open('$WORK/evaluate_deepfm.json'))
tr = json.load(open('$RUNS/deepfm/results.json'))['metrics']['test']
d = abs(ev['auc'] - tr['auc'])
tol = 1e-4 if ev.get('precision', 'fp32') == 'fp32' else 2e-3  # bf16 rounds differently on CPU and GPU
print('evaluate (CPU, %s) AUC %.6f, train (%s) test AUC %.6f, |diff| %.2g (tolerance %g)'
      % (ev.get('precision', 'fp32'), ev['auc'], '$DEVICE', tr['auc'], d, tol))
sys.exit(0 if d < tol else 1)
"
stage train_din 150 "${CLI[@]}" train configs/din_$DATASET.yaml "${TRAIN_SET[@]}" --set "epochs=$EPOCHS" \
  --set "out=$RUNS/din"
# one process: torchrun sets WORLD_SIZE=1, so the trainer starts no process group (NCCL needs one
# GPU per rank; tests/test_cuda.py runs DDP over NCCL with one rank instead)
stage torchrun_deepfm 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m metactr.cli train \
  configs/deepfm_$DATASET.yaml "${TRAIN_SET[@]}" --set "epochs=$EPOCHS" --set "out=$RUNS/deepfm_torchrun"

stage bench_ctr 200 "$PY" benchmarks/bench_ctr.py --device "$DEVICE" --rows "$BENCH_ROWS" \
  --test-rows "$BENCH_TEST_ROWS" --threads "$THREADS" --bench-python "$BENCH_PY" \
  --data-dir "$WORK/bench_ctr_data" --precision "$PRECISION" --out "$OUT/bench_ctr.json"
# one stage (and file) per model: a timeout loses only that model's numbers. RML's per-task loops
# run ~9 tasks/s at 1 inner step on an H200, so RML is timed at 1 step only.
for m in deepfm:1,5 rml:1; do
  stage "bench_meta_${m%%:*}" 90 "$PY" benchmarks/bench_meta.py --device "$DEVICE" --data "$METACTR_DATA/ml-1m-rml" \
    --models "${m%%:*}" --steps "${m#*:}" --reps 3 --threads "$THREADS" \
    --impls vmap,vmap-dense,loop-func,loop-l2l --out "$OUT/bench_meta_${m%%:*}.json"
done

stage pytest_trainer_ddp 120 "$PY" -m pytest tests/test_ddp.py tests/test_trainer.py -q -x -p no:cacheprovider

# --------------------------------------------------------------------------- summary
"$PY" - "$REC" "$WORK" "$RUNS" "$OUT/gpu_check.json" "$DEVICE" "$((SECONDS - T_START))" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

rec, work, runs, out, device, wall = sys.argv[1:]
stages = []
for line in Path(rec).read_text().splitlines():
    name, status, secs, rc = line.split("\t")
    stages.append({"stage": name, "status": status, "seconds": int(secs), "rc": rc})


def read(p):
    try:
        return json.loads(Path(p).read_text())
    except Exception:
        return None


def run_summary(d):
    d = Path(d)
    hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    res = read(d / "results.json") or {}
    return {"epochs": [{k: r.get(k) for k in ("epoch", "train_loss", "train_time_s", "train_samples_per_s",
                                              "valid_auc", "valid_logloss")} for r in hist],
            "test": (res.get("metrics") or {}).get("test"), "n_params": res.get("n_params")}


report = {"device": device, "wall_s": int(wall), "env": read(Path(work) / "env.json"), "stages": stages,
          "runs": {p.name: run_summary(p) for p in sorted(Path(runs).glob("*")) if p.is_dir()},
          "evaluate_deepfm": read(Path(work) / "evaluate_deepfm.json")}
Path(out).write_text(json.dumps(report, indent=2))
print(f"\nSUMMARY ({device}, {wall}s)")
for s in stages:
    print(f"  {s['status']:8s} {s['stage']:24s} {s['seconds']:>4d}s  rc={s['rc']}")
for name, r in report["runs"].items():
    for e in r["epochs"]:
        print(f"  {name}: epoch {e['epoch']} {e['train_time_s']:.1f}s {e['train_samples_per_s']:,.0f} samples/s "
              f"valid AUC {e['valid_auc']}")
bad = [s["stage"] for s in stages if s["status"] != "PASS"]
print("ALL PASS" if not bad else f"NOT PASSED: {' '.join(bad)}")
EOF
