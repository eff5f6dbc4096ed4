"""Batched prediction with a model's own or given (adapted) parameters."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from metactr.data.prepared import PreparedDataset, Split
from metactr.engine.host import retain_freed_memory
from metactr.engine.precision import autocast
from metactr.models.base import CTRModel


@torch.inference_mode()
def predict_proba(model: CTRModel, dataset: PreparedDataset, split: Split | str, *,
                  params: Mapping[str, Tensor] | None = None, batch_size: int = 4096,
                  precision: str = "fp32") -> np.ndarray:
    """Click probabilities for every sample of ``split`` (in order), model in eval mode;
    ``precision`` as in ``metactr.engine.precision`` (bf16: forward under autocast)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cpu":
        retain_freed_memory()
    try:
        outs = []
        with autocast(device, precision):  # one region for all batches: the weights are cast to bf16 once
            for batch in dataset.iter_batches(split, batch_size):
                batch = batch.to(device)
                out = model(batch) if params is None else functional_call(model, dict(params), (batch,))
                outs.append(torch.sigmoid(out.logit.float()).cpu())
        return torch.cat(outs).numpy() if outs else np.zeros(0, dtype=np.float32)
    finally:
        model.train(was_training)
