"""The generalized cold-start protocol of the RML paper (MM'22, sec. 4.2), and a toy dataset for it.

``run_protocol``: (meta-)train a model on ``{subset}_train`` with a strategy, then fine-tune it on
FT-A, FT-B and FT-C in turn and score ``{subset}_test`` before and after each stage (logloss,
AUC). ``ProtocolConfig.mode`` picks the authors' fine-tuning/scoring (``faithful``) or one that
uses and scores every sample (``full``).

``write_toy_rml_dataset``: a tiny synthetic dataset in the ml-1m-rml layout, for tests and CI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field as PField

from metactr.config import StrictModel
from metactr.data.prepared import PreparedDataset
from metactr.eval.metrics import auc as auc_score
from metactr.eval.metrics import bootstrap_ci95
from metactr.eval.metrics import logloss as logloss_score
from metactr.eval.predict import predict_proba
from metactr.strategies.base import StrategyConfig, apply_step, train
from metactr.models.base import CTRModel, build_model, objective
from metactr.utils import seed_everything

SUBSETS = ("wc", "cw")
STAGES = ("train", "finetune_a", "finetune_b", "finetune_c", "test")


def write_toy_rml_dataset(root: str | Path, *, n_users: int = 60, n_items: int = 80, rows_per_user: int = 12,
                          hist_len: int = 6, seed: int = 0) -> Path:
    """Write ``{wc,cw}_{train,finetune_a..c,test}.parquet``, ``users.parquet``, ``items.parquet``.

    Each user's last row goes to FT-A/FT-B/FT-C/test in turn, the others to train (the paper's
    protocol); WC and CW use disjoint users.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_all = 2 * n_users
    taste = rng.integers(0, 2, n_all + 1)
    kind = rng.integers(0, 2, n_items + 1)
    pl.DataFrame({"user_id": np.arange(1, n_all + 1, dtype=np.int32),
                  "gender": (taste[1:] + 1).astype(np.int16),
                  "age": rng.integers(1, 8, n_all).astype(np.int16),
                  "occupation": rng.integers(1, 22, n_all).astype(np.int16)}).write_parquet(root / "users.parquet")
    genres = [sorted(set(rng.integers(1, 6, 2).tolist())) for _ in range(n_items)]
    pl.DataFrame({"item_id": np.arange(1, n_items + 1, dtype=np.int32),
                  "rate": (kind[1:] + 1).astype(np.int16),
                  "year": rng.integers(1, 10, n_items).astype(np.int16),
                  "genres": pl.Series(genres, dtype=pl.List(pl.Int16)),
                  "directors": pl.Series([[int(x)] for x in rng.integers(1, 20, n_items)],
                                         dtype=pl.List(pl.Int32))}).write_parquet(root / "items.parquet")
    for s, subset in enumerate(SUBSETS):
        rows: dict[str, list] = {st: [] for st in STAGES}
        for k, u in enumerate(range(1 + s * n_users, 1 + (s + 1) * n_users)):
            items = rng.integers(1, n_items + 1, rows_per_user + hist_len)
            p = 0.2 + 0.6 * (kind[items] == taste[u])
            labels = (rng.random(items.size) < p).astype(np.int8)
            # the held-out (FT/test) row follows the rule without noise, alternating classes
            # across users so that every FT/test split holds both labels
            want = taste[u] if (k // 4) % 2 == 0 else 1 - taste[u]
            items[-1] = 1 + int(np.flatnonzero(kind[1:] == want)[k % max(1, int((kind[1:] == want).sum()))])
            labels[-1] = int(kind[items[-1]] == taste[u])
            for r in range(rows_per_user):
                t = hist_len + r
                lo = max(0, t - hist_len - r % 3)  # varying session lengths (padding in batches)
                row = (u, items[lo:t].tolist(), labels[lo:t].tolist(), int(items[t]), int(labels[t]))
                stage = "train" if r < rows_per_user - 1 else STAGES[1 + k % 4]
                rows[stage].append(row)
        for st, rs in rows.items():
            u, h, hl, tg, lb = zip(*rs, strict=True) if rs else ([], [], [], [], [])
            pl.DataFrame({"user_id": pl.Series(u, dtype=pl.Int32),
                          "hist_item_ids": pl.Series(h, dtype=pl.List(pl.Int32)),
                          "hist_labels": pl.Series(hl, dtype=pl.List(pl.Int8)),
                          "target_item_id": pl.Series(tg, dtype=pl.Int32),
                          "label": pl.Series(lb, dtype=pl.Int8)}).write_parquet(root / f"{subset}_{st}.parquet")
    return root


# =========================================================================== the protocol
FT_STAGES = ("finetune_a", "finetune_b", "finetune_c")
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
    ft_epochs: int = PField(1, ge=1)
    ft_lr: float | None = PField(None, gt=0)  # None: keep the optimizer's (decayed) rate
    bootstrap: int = PField(1000, ge=0)  # resamples for the single-test-set interval (0: off)


def finetune(model: CTRModel, dataset: PreparedDataset, split: str, opt: torch.optim.Optimizer,
             cfg: ProtocolConfig, gen: torch.Generator, clip_norm: float | None = 5.0) -> int:
    """Fine-tune every model parameter on ``split``; returns the number of steps taken."""
    if cfg.ft_lr is not None:
        for g in opt.param_groups:
            g["lr"] = cfg.ft_lr
    params = list(model.parameters())
    model.train()
    steps = 0
    passes = 1 if cfg.mode == "faithful" else cfg.ft_epochs
    for _ in range(passes):
        for batch in dataset.iter_batches(split, cfg.ft_batch_size, shuffle=True, generator=gen,
                                          drop_last=cfg.mode == "faithful"):
            loss, _ = objective(model, None, batch)
            apply_step(opt, params, loss, clip_norm)
            steps += 1
    return steps


def scored_rows(n: int, cfg: ProtocolConfig, gen: torch.Generator) -> torch.Tensor:
    """Which test rows count: all (full) or the complete shuffled batches (faithful)."""
    if cfg.mode == "full" or n < cfg.ft_batch_size:  # a test set smaller than one batch: score it all
        return torch.arange(n)
    keep = (n // cfg.ft_batch_size) * cfg.ft_batch_size
    return torch.randperm(n, generator=gen)[:keep]


def evaluate(model: CTRModel, dataset: PreparedDataset, split: str, rows: torch.Tensor) -> tuple[dict, list, list]:
    s = dataset.split(split).subset(rows)
    prob = predict_proba(model, dataset, s)
    y = s.label.numpy()
    return {"auc": auc_score(y, prob), "logloss": logloss_score(y, prob), "n_test": int(y.size)}, y, prob


def run_protocol(dataset: PreparedDataset, subset: str, model_name: str, model_kw: dict,
                 strategy: StrategyConfig, cfg: ProtocolConfig, seed: int,
                 log=None) -> list[dict]:
    """(Meta-)train ``model_name`` on ``{subset}_train``, then fine-tune on FT-A, FT-B, FT-C in
    turn and score ``{subset}_test`` before and after each. One row per stage."""
    for s in ("train", "test", *FT_STAGES):
        dataset.split(f"{subset}_{s}")  # fail early (DataError) on a missing split
    seed_everything(seed)
    model = build_model(model_name, dataset.spec, **model_kw)
    t0 = time.perf_counter()
    result = train(model, dataset, f"{subset}_train", strategy, seed=seed, log=log)
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed + 7919)
    test = f"{subset}_test"
    rows_idx = scored_rows(len(dataset.split(test)), cfg, gen)
    out = []
    for stage in ("before", *FT_STAGES):
        steps = 0
        if stage != "before":
            steps = finetune(model, dataset, f"{subset}_{stage}", result.optimizer, cfg, gen, strategy.clip_norm)
        m, y, prob = evaluate(model, dataset, test, rows_idx)
        row = {"subset": subset, "stage": stage, "seed": seed, "ft_steps": steps, **m, "train_s": round(train_s, 2)}
        if cfg.mode == "faithful":  # also every test row, to compare with the authors' partial scoring
            full, _, _ = evaluate(model, dataset, test, torch.arange(len(dataset.split(test))))
            row.update({f"{k}_all_rows": v for k, v in full.items()})
        if cfg.bootstrap and stage == "finetune_c":
            _, lo, hi = bootstrap_ci95(y, prob, n_boot=cfg.bootstrap, seed=seed)
            row["auc_boot95"] = [lo, hi]
        out.append(row)
    return out
