"""Strategy settings (e.g. session MAML's inner rate) chosen on validation rows cut from the
training split, never from test.

``ProtocolConfig.strategy_select`` maps strategy settings to candidate values, e.g.
``{inner_lr: [0.1, 3.0, 30.0]}``. Before the real run the protocol imitates itself inside the
training split (the cut of ``papers.rml.ft_select.validation_cut``: the latest
``ft_valid_fraction`` of the training rows, halved in time into pseudo-FT and pseudo-test rows):

1. for every combination of candidates (in the order given; the product over settings), a probe
   model is trained on the remaining rows with those settings (same model, epochs, seed);
2. it is fine-tuned on the pseudo-FT rows as the protocol fine-tunes (``finetune``) and scored
   (AUC) on the pseudo-test rows as the protocol scores test rows (each session or user adapted
   first where the strategy does so at test, with the candidate's own settings);
3. the best combination is used for the real run. Ties keep the earlier one.

Cost: one training on 1 - ``ft_valid_fraction`` of the training rows per combination.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from metactr.data.prepared import PreparedDataset
from metactr.papers.rml.finetune import finetune
from metactr.papers.rml.ft_select import (
    best_of,
    select_finetuning,
    train_probe,
    valid_auc,
    validation_cut,
)
from metactr.train.trainer import Trainer


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the candidates, the first setting varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def with_settings(strategy: Any, settings: dict[str, Any]) -> Any:
    """The strategy config with ``settings`` replaced (validated as the config itself validates)."""
    return type(strategy).model_validate({**strategy.model_dump(), **settings})


def unknown_settings(strategy: Any, grid: dict[str, list]) -> list[str]:
    """The keys of ``grid`` that ``strategy`` (a strategy config) does not have."""
    return sorted(set(grid) - set(type(strategy).model_fields))


def select_strategy(dataset: PreparedDataset, subset: str, model_name: str, model_kw: dict, strategy: Any,
                    cfg, seed: int, *, epochs: float, batch_size: int,
                    trainer: Trainer | None = None) -> tuple[Any, dict]:
    """(the strategy config with the chosen settings, a record of the choice)."""
    trainer = trainer or Trainer()
    fit, ft, test = validation_cut(dataset.split(f"{subset}_train"), cfg.ft_valid_fraction)
    table = []
    for settings in combinations(cfg.strategy_select):
        cand = with_settings(strategy, settings)
        model, fitted = train_probe(dataset, fit, model_name, model_kw, cand, seed, epochs=epochs,
                                    batch_size=batch_size, trainer=trainer)
        finetune(model, dataset, ft, fitted.strategy.optimizer, cfg, torch.Generator().manual_seed(seed + 7919),
                 cand.clip_norm, trainer)
        table.append({**settings, "valid_auc": valid_auc(model, dataset, test, fitted.strategy, [fit, ft])})
    chosen = {k: best_of(table)[k] for k in cfg.strategy_select}
    record = {"chosen": chosen, "candidates": table,
              "rows": {"fit": len(fit), "pseudo_ft": len(ft), "pseudo_test": len(test)}}
    return with_settings(strategy, chosen), record


def choose_settings(dataset: PreparedDataset, subset: str, model_name: str, model_kw: dict, strategy: Any,
                    cfg, seed: int, *, epochs: float, batch_size: int,
                    trainer: Trainer | None = None) -> tuple[Any, Any, dict]:
    """(strategy config, protocol config, records) after the selections ``cfg`` asks for: the
    strategy settings first (``strategy_select``), then the FT rate and passes for that strategy
    (``ft_select``, ``papers.rml.ft_select``). The one entry of the protocol and the bench jobs."""
    records = {}
    if cfg.strategy_select:
        strategy, records["strategy_selection"] = select_strategy(
            dataset, subset, model_name, model_kw, strategy, cfg, seed, epochs=epochs, batch_size=batch_size,
            trainer=trainer)
    if cfg.ft_select:
        cfg, records["ft_selection"] = select_finetuning(
            dataset, subset, model_name, model_kw, strategy, cfg, seed, epochs=epochs, batch_size=batch_size,
            trainer=trainer)
    return strategy, cfg, records


def check_selection(strategy: Any, cfg, method: str) -> None:
    """ConfigError (naming the field) when a ``strategy_select`` setting is not the strategy's or a
    candidate value is not valid for it: before any work."""
    from metactr.errors import ConfigError

    if not cfg.strategy_select:
        return
    field = f"method.{method}.protocol.strategy_select"
    bad = unknown_settings(strategy, cfg.strategy_select)
    if bad:
        raise ConfigError(f"method '{method}': strategy '{getattr(strategy, 'name', '?')}' has no setting(s) "
                          f"{', '.join(bad)}", field=field)
    for settings in combinations(cfg.strategy_select):
        try:
            with_settings(strategy, settings)
        except ValueError as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"method '{method}': bad candidate {settings}: {msg[:200]}", field=field) from None
