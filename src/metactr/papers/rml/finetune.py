"""The RML protocol's fine-tuning step (FT-A, FT-B, FT-C), shared by the protocol
(``papers.rml.protocol``), the bench jobs and the validation selection of its settings
(``papers.rml.ft_select``)."""

from __future__ import annotations

from typing import Any

import torch

from metactr.data.prepared import PreparedDataset, Split
from metactr.models.base import CTRModel
from metactr.strategies.plain import FineTune
from metactr.train.trainer import Trainer


def finetune(model: CTRModel, dataset: PreparedDataset, split: str | Split, opt: torch.optim.Optimizer,
             cfg: Any, gen: torch.Generator, clip_norm: float | None = 5.0,
             trainer: Trainer | None = None) -> int:
    """Fine-tune every model parameter on ``split`` (the training's optimizer, state and rate
    kept) as ``cfg`` (a ``protocol.ProtocolConfig``) says; returns the number of steps taken."""
    faithful = cfg.mode == "faithful"
    if not faithful and cfg.ft_epochs == 0:
        return 0
    if cfg.ft_lr is not None:
        for g in opt.param_groups:
            g["lr"] = cfg.ft_lr
    passes = 1 if faithful else cfg.ft_epochs
    # (a faithful FT set below one batch takes no step, but draws its shuffle)
    n = len(dataset.split(split) if isinstance(split, str) else split)
    result = (trainer or Trainer()).fit(model, dataset, split, FineTune(opt, clip_norm), epochs=passes,
                                        batch_size=cfg.ft_batch_size, generator=gen, drop_last=faithful)
    per = n // cfg.ft_batch_size if faithful else -(-n // cfg.ft_batch_size)
    return per * len(result.history)
