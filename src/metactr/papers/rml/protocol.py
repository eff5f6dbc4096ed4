"""The generalized cold-start protocol of the RML paper (MM'22, sec. 4.2).

``run_protocol``: (meta-)train a model on ``{subset}_train`` with a strategy, then fine-tune it on
FT-A, FT-B and FT-C in turn and score ``{subset}_test`` before and after each stage (logloss,
AUC). Training and fine-tuning both run in the one Trainer (no run directory: nothing is
written). ``ProtocolConfig.mode`` picks the authors' fine-tuning/scoring (``faithful``) or one
that uses and scores every sample (``full``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field as PField
from pydantic import model_validator

from metactr.config import StrictModel
from metactr.data.prepared import PreparedDataset
from metactr.eval.metrics import auc as auc_score
from metactr.eval.metrics import bootstrap_ci95
from metactr.eval.metrics import logloss as logloss_score
from metactr.eval.adapted import protocol_proba
from metactr.data.split import FT_STAGES
from metactr.models.base import CTRModel, build_model
from metactr.strategies import build_strategy
from metactr.papers.rml.finetune import finetune  # noqa: F401 (re-exported: protocol.finetune)
from metactr.train.trainer import Trainer
from metactr.utils import seed_everything

# =========================================================================== the protocol
STAGE_LABELS = {"before": "before FT", "finetune_a": "FT-A", "finetune_b": "FT-B", "finetune_c": "FT-C"}


class ProtocolConfig(StrictModel):
    """How fine-tuning and scoring are done after (meta-)training (RML paper sec. 3.3/4.2).

    ``faithful`` (the authors' code): one pass over each FT set in shuffled batches of
    ``ft_batch_size``, incomplete batches skipped (a 128-row FT set is one step), with the
    training's global Adam (state and decayed learning rate kept); the test set is scored in
    shuffled batches of ``ft_batch_size`` with the incomplete last batch skipped too (so 256 of
    WC's 320 and 128 of CW's 248 test rows count). ``full``: every FT sample is used
    (``ft_epochs`` passes, last batch kept) and every test sample is scored.
    """

    mode: Literal["faithful", "full"] = "faithful"
    ft_batch_size: int = PField(128, gt=0)
    ft_epochs: int = PField(1, ge=0)  # full mode: 0 = no fine-tuning
    ft_lr: float | None = PField(None, gt=0)  # None: keep the optimizer's (decayed) rate
    bootstrap: int = PField(1000, ge=0)  # resamples for the single-test-set interval (0: off)
    # choose ft_lr / ft_epochs on validation rows cut from the training split (``ft_select``)
    ft_select: bool = False
    ft_lr_grid: list[float] = PField([3e-4, 1e-3, 3e-3], min_length=1)
    ft_epochs_grid: list[int] = PField([1, 3], min_length=1)
    ft_valid_fraction: float = PField(0.2, gt=0, lt=0.5)
    # strategy settings chosen on the same validation cut, e.g. {inner_lr: [0.1, 3.0, 30.0]}
    # (``papers.rml.strategy_select``); {} = none
    strategy_select: dict[str, list[float | int | bool]] = {}

    @model_validator(mode="after")
    def _check(self) -> ProtocolConfig:
        if self.ft_select and self.mode != "full":
            raise ValueError("ft_select needs mode: full (the faithful mode fine-tunes as the authors did)")
        if self.ft_epochs == 0 and self.mode != "full":
            raise ValueError("ft_epochs: 0 (no fine-tuning) needs mode: full")
        if self.strategy_select and self.mode != "full":
            raise ValueError("strategy_select needs mode: full")
        if any(not v for v in self.strategy_select.values()):
            raise ValueError("strategy_select: every setting needs at least one candidate value")
        if any(x <= 0 for x in self.ft_lr_grid) or any(e < 1 for e in self.ft_epochs_grid):
            raise ValueError("ft_lr_grid rates must be > 0 and ft_epochs_grid passes >= 1")
        return self

    def key_dump(self) -> dict:
        """``model_dump()`` without the selection settings while ``ft_select`` is off: the job keys of
        runs made before they existed stay valid."""
        d = self.model_dump()
        if not self.strategy_select:
            d.pop("strategy_select")
        if not self.ft_select:
            for k in ("ft_select", "ft_lr_grid", "ft_epochs_grid"):
                d.pop(k)
            if not self.strategy_select:
                d.pop("ft_valid_fraction")
        return d


def scored_rows(n: int, cfg: ProtocolConfig, gen: torch.Generator) -> torch.Tensor:
    """Which test rows count: all (full) or the complete shuffled batches (faithful)."""
    if cfg.mode == "full" or n < cfg.ft_batch_size:  # a test set smaller than one batch: score it all
        return torch.arange(n)
    keep = (n // cfg.ft_batch_size) * cfg.ft_batch_size
    return torch.randperm(n, generator=gen)[:keep]


def evaluate(model: CTRModel, dataset: PreparedDataset, split: str, rows: torch.Tensor,
             strategy=None, seen: list[str] = ()) -> tuple[dict, list, list]:
    """Metrics of ``rows`` of ``split``, scored as ``eval.adapted.protocol_proba`` says for the
    trained ``strategy`` (per-session or per-user adaptation on the ``seen`` splits, else plain)."""
    s = dataset.split(split).subset(rows)
    prob = protocol_proba(model, dataset, s, strategy, seen)
    y = s.label.numpy()
    return {"auc": auc_score(y, prob), "logloss": logloss_score(y, prob), "n_test": int(y.size)}, y, prob


def run_protocol(dataset: PreparedDataset, subset: str, model_name: str, model_kw: dict,
                 strategy: Any, cfg: ProtocolConfig, seed: int, *, epochs: float = 10.0, batch_size: int = 128,
                 trainer: Trainer | None = None, on_scores=None) -> list[dict]:
    """(Meta-)train ``model_name`` on ``{subset}_train`` with ``strategy`` (a strategy config) for
    ``epochs`` in batches of ``batch_size``, then fine-tune on FT-A, FT-B, FT-C in turn and score
    ``{subset}_test`` before and after each. One row per stage; ``on_scores(stage, y, prob)``
    receives the scored rows' labels and probabilities (for intervals over test users)."""
    for s in ("train", "test", *FT_STAGES):
        dataset.split(f"{subset}_{s}")  # fail early (DataError) on a missing split
    trainer = trainer or Trainer()
    chosen = {}
    if cfg.strategy_select or cfg.ft_select:  # settings chosen on rows cut from the training split
        from metactr.papers.rml.strategy_select import choose_settings

        strategy, cfg, chosen = choose_settings(dataset, subset, model_name, model_kw, strategy, cfg, seed,
                                                epochs=epochs, batch_size=batch_size, trainer=trainer)
    seed_everything(seed)
    model = build_model(model_name, dataset.spec, **model_kw)
    t0 = time.perf_counter()
    fitted = trainer.fit(model, dataset, f"{subset}_train", build_strategy(strategy), epochs=epochs,
                         batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed + 7919)
    test = f"{subset}_test"
    rows_idx = scored_rows(len(dataset.split(test)), cfg, gen)
    out, seen = [], [f"{subset}_train"]
    for stage in ("before", *FT_STAGES):
        steps = 0
        if stage != "before":
            steps = finetune(model, dataset, f"{subset}_{stage}", fitted.strategy.optimizer, cfg, gen,
                             strategy.clip_norm, trainer)
            seen.append(f"{subset}_{stage}")
        m, y, prob = evaluate(model, dataset, test, rows_idx, fitted.strategy, seen)
        if on_scores is not None:
            on_scores(stage, y, prob)
        row = {"subset": subset, "stage": stage, "seed": seed, "ft_steps": steps, **m, "train_s": round(train_s, 2)}
        row.update({k: rec["chosen"] for k, rec in chosen.items()})  # ft_selection / strategy_selection
        if cfg.mode == "faithful":  # also every test row, to compare with the authors' partial scoring
            full, _, _ = evaluate(model, dataset, test, torch.arange(len(dataset.split(test))), fitted.strategy, seen)
            row.update({f"{k}_all_rows": v for k, v in full.items()})
        if cfg.bootstrap and stage == "finetune_c":
            _, lo, hi = bootstrap_ci95(y, prob, n_boot=cfg.bootstrap, seed=seed)
            row["auc_boot95"] = [lo, hi]
        out.append(row)
    return out
