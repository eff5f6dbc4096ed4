"""Mixed precision for training and prediction: ``precision: fp32 | bf16``.

``bf16`` runs each forward pass under ``torch.autocast`` with bfloat16: the linear layers'
matrix products take bfloat16 inputs (fp32 accumulation), while the parameters, the optimizer
state, the embeddings and the loss stay in float32. It pays where matrix products dominate and
the hardware multiplies bfloat16 natively (CPUs with AVX512-BF16 or AMX, recent GPUs). On this
project's AMD EPYC (Zen 4) CPU, measured in one process with ``benchmarks/ab_step.py``, a DeepFM
training step runs 1.21x faster and a prediction batch 1.2x faster; DIN's 1.12-1.17x and 1.09x.
DIN's target attention opts out (``TargetAttention`` runs in float32 under autocast): its
element-wise Dice layers cost more in bfloat16 than its narrow matmuls save, which made the whole
step 1.4x slower. Test AUC after one epoch is unchanged within seed noise (``docs/training.md``).
``fp32`` stays the default: CPUs without native bfloat16 emulate it, slowly.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16"]  # the config field's type; PRECISIONS is derived from it
PRECISIONS: tuple[str, ...] = get_args(Precision)


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The context the forward pass runs in for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
