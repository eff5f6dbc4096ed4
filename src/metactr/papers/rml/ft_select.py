"""Fine-tuning settings chosen on validation rows cut from the training split (never from test).

The RML protocol fine-tunes on FT-A, FT-B and FT-C in turn at one rate for one pass. Whether more
steps or another rate help depends on the data and the model, and test rows must not say. With
``ProtocolConfig.ft_select`` the protocol first imitates itself inside the training split:

1. ``validation_cut``: the latest ``ft_valid_fraction`` of the training rows (by target timestamp;
   file order without timestamps) are held out; their earlier half plays the FT set, their later
   half the test set. A probe model is trained on the remaining rows with the same strategy,
   epochs and seed.
2. Each candidate (no fine-tuning, and every ``ft_lr_grid`` x ``ft_epochs_grid`` pair) fine-tunes
   a copy of the probe (weights and optimizer state restored before each) on the pseudo-FT rows
   and is scored (AUC) on the pseudo-test rows as the protocol scores test rows (each session or
   user adapted first where the strategy does so at test).
3. The best candidate's rate and passes are used for FT-A/B/C of the real run (``ft_epochs`` 0:
   no fine-tuning). Ties keep the earlier candidate, so "no fine-tuning" wins unless a candidate
   beats it.

Cost: one more training on 1 - ``ft_valid_fraction`` of the rows plus the candidates' short runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from metactr.data.prepared import PreparedDataset, Split
from metactr.eval.adapted import protocol_proba
from metactr.eval.metrics import auc as auc_score
from metactr.models.base import build_model
from metactr.papers.rml.finetune import finetune
from metactr.strategies import build_strategy
from metactr.train.trainer import Trainer
from metactr.utils import seed_everything


def validation_cut(split: Split, fraction: float) -> tuple[Split, Split, Split]:
    """(fit rows, pseudo-FT rows, pseudo-test rows) of a training split: the latest ``fraction``
    of its rows (by timestamp, ties and missing timestamps in file order), halved in time."""
    n = len(split)
    k = int(round(n * fraction))
    if k < 4 or n - k < 1:
        raise ValueError(f"split '{split.name}' has {n} rows: too few to cut {fraction:.0%} for validation")
    order = (torch.arange(n) if split.timestamp is None
             else torch.sort(split.timestamp, stable=True).indices)
    fit, held = order[: n - k], order[n - k:]
    half = len(held) // 2
    return (split.subset(torch.sort(fit).values), split.subset(torch.sort(held[:half]).values),
            split.subset(torch.sort(held[half:]).values))


def train_probe(dataset: PreparedDataset, fit: Split, model_name: str, model_kw: dict, strategy: Any, seed: int, *,
                epochs: float, batch_size: int, trainer: Trainer):
    """(model, fitted) trained on the ``fit`` rows exactly as the real run trains: same seed, model,
    strategy, epochs and batch size."""
    seed_everything(seed)
    model = build_model(model_name, dataset.spec, **model_kw)
    fitted = trainer.fit(model, dataset, fit, build_strategy(strategy), epochs=epochs, batch_size=batch_size,
                         generator=torch.Generator().manual_seed(seed))
    return model, fitted


def valid_auc(model, dataset: PreparedDataset, test: Split, strategy, seen: list[Split]) -> float | None:
    """AUC on the pseudo-test rows, scored as the protocol scores test rows (``protocol_proba``)."""
    return auc_score(test.label.numpy(), protocol_proba(model, dataset, test, strategy, seen))


def best_of(table: list[dict]) -> dict:
    """The candidate with the highest ``valid_auc`` (ties: the earlier; none scored: the first)."""
    return max((c for c in table if c["valid_auc"] is not None), key=lambda c: c["valid_auc"], default=table[0])


def candidates(cfg) -> list[tuple[float | None, int]]:
    """(rate, passes) pairs in the order they are tried: no fine-tuning first."""
    return [(None, 0)] + [(lr, ep) for ep in cfg.ft_epochs_grid for lr in cfg.ft_lr_grid]


def select_finetuning(dataset: PreparedDataset, subset: str, model_name: str, model_kw: dict, strategy: Any,
                      cfg, seed: int, *, epochs: float, batch_size: int,
                      trainer: Trainer | None = None) -> tuple[Any, dict]:
    """(the protocol config with the chosen ``ft_lr`` / ``ft_epochs``, a record of the choice).

    The candidates fine-tune with the protocol's own ``finetune`` (and the strategy's clip norm),
    exactly as the real stages will."""
    trainer = trainer or Trainer()
    fit, ft, test = validation_cut(dataset.split(f"{subset}_train"), cfg.ft_valid_fraction)
    model, fitted = train_probe(dataset, fit, model_name, model_kw, strategy, seed, epochs=epochs,
                                batch_size=batch_size, trainer=trainer)
    opt = fitted.strategy.optimizer
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    table = []
    for lr, passes in candidates(cfg):
        model.load_state_dict(weights)
        opt.load_state_dict(copy.deepcopy(opt_state))
        if passes:
            finetune(model, dataset, ft, opt, cfg.model_copy(update={"ft_lr": lr, "ft_epochs": passes}),
                     torch.Generator().manual_seed(seed + 7919), strategy.clip_norm, trainer)
        seen = [fit] + ([ft] if passes else [])  # what a user-level variant may adapt on
        table.append({"ft_lr": lr, "ft_epochs": passes,
                      "valid_auc": valid_auc(model, dataset, test, fitted.strategy, seen)})
    best = best_of(table)
    record = {"chosen": {"ft_lr": best["ft_lr"], "ft_epochs": best["ft_epochs"]}, "candidates": table,
              "rows": {"fit": len(fit), "pseudo_ft": len(ft), "pseudo_test": len(test)}}
    return cfg.model_copy(update={"ft_lr": best["ft_lr"], "ft_epochs": best["ft_epochs"]}), record
