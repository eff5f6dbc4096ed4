"""The public functions that are more than a re-export (``metactr/__init__.py`` lists them all).

``fit``: any registered model with any strategy, in the one Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metactr.data.prepared import PreparedDataset, Split
from metactr.engine.device import resolve_device
from metactr.models.base import CTRModel
from metactr.strategies import Strategy, build_strategy, strategy_config
from metactr.strategies.plain import Plain
from metactr.train.checkpoint import model_meta
from metactr.train.config import OptimConfig
from metactr.train.trainer import FitResult, Trainer


def fit(model: CTRModel, dataset: PreparedDataset, split: str | Split = "train",
        strategy: str | dict | Any | Strategy = "plain", *, epochs: float = 1.0, batch_size: int = 128,
        seed: int = 0, device: str = "cpu", precision: str = "fp32", valid_split: str | None = None,
        patience: int | None = None, run_dir: str | Path | None = None, resume: bool = False,
        progress: bool = False, log=None) -> FitResult:
    """Train ``model`` on ``split`` with ``strategy`` (a name, a dict of its settings with ``name``,
    a config from ``metactr.strategy_config`` or a ``Strategy``) in the one Trainer.

    ``strategy="plain"`` is Adam at lr 1e-3 with no decay (as ``metactr train`` without a
    ``strategy:`` block); a ``run_dir`` gets checkpoints, ``metrics.jsonl`` and ``--resume``.
    """
    if isinstance(strategy, Strategy):
        strat = strategy
    elif strategy == "plain":
        strat = Plain(optim=OptimConfig())
    elif isinstance(strategy, str):
        strat = build_strategy(strategy_config(strategy))
    elif isinstance(strategy, dict):
        values = dict(strategy)
        strat = build_strategy(strategy_config(values.pop("name", "plain"), values, strict=True))
    else:
        strat = build_strategy(strategy)
    meta = None
    if run_dir is not None:  # checkpoints that `load_checkpoint` / `metactr evaluate` / `metactr serve` read
        meta = model_meta(model, getattr(model, "build_kwargs", {}),
                          {"use_ids": dataset.use_ids, "max_hist_len": model.spec.max_hist_len,
                           "prepared": str(dataset.root)})
        meta["precision"] = precision
    trainer = Trainer(device=resolve_device(device), precision=precision, run_dir=run_dir, progress=progress,
                      log=log, valid_split=valid_split, patience=patience, checkpoint_meta=meta)
    return trainer.fit(model, dataset, split, strat, epochs=epochs, batch_size=batch_size,
                       generator=torch.Generator().manual_seed(seed), resume=resume)
