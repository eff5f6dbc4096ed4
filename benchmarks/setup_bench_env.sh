#!/usr/bin/env bash
# Create .bench-venv: the benchmark's own environment with DeepCTR-Torch, kept out of the
# project's dependencies. torch is installed FIRST and pinned to the project's CPU build so that
# deepctr-torch (which only asks for torch>=2.4) never pulls a CUDA wheel.
# deepctr-torch 0.3.0 requires: torch>=2.4.0, tqdm, scikit-learn (read from its METADATA), and
# imports requests (undeclared) in deepctr_torch/utils.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=.bench-venv
TORCH_VERSION=2.13.0
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch=="$TORCH_VERSION"
"$VENV/bin/python" -m pip install -q "deepctr-torch==0.3.0" tqdm scikit-learn numpy requests  # deepctr_torch.utils imports requests without declaring it
# pin check: still the CPU torch we asked for
"$VENV/bin/python" - <<'PY'
import torch, deepctr_torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"a CUDA torch was installed: {torch.version.cuda}"
print("bench env ok: torch", torch.__version__, "deepctr-torch", deepctr_torch.__version__)
PY
