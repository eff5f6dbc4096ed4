"""The Trainer's free parts: one epoch's hot loop, evaluation, RNG state, the progress bar, the epoch line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from metactr.data.batch import move
from metactr.data.prepared import PreparedDataset, Split
from metactr.eval.metrics import classification_metrics
from metactr.eval.predict import predict_proba
from metactr.eval.report import fmt
from metactr.models.base import CTRModel
from metactr.strategies.base import Phase
from metactr.train.tracking import finite_or_none


def evaluate(model: CTRModel, dataset: PreparedDataset, split: str | Split, *, batch_size: int = 8192,
             device: torch.device | None = None, precision: str = "fp32") -> dict[str, float]:
    """AUC, LogLoss, GAUC (and n) of ``model`` on ``split``."""
    if device is not None:
        model.to(device)
    s = dataset.split(split) if isinstance(split, str) else split
    prob = predict_proba(model, dataset, s, batch_size=batch_size, precision=precision)
    return finite_or_none(classification_metrics(s.label.numpy(), prob, s.user_id.numpy()))


def _rng_state(gen: torch.Generator, device: torch.device, data: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state() if data is None else data}
    if device.type == "cuda":  # dropout on a GPU draws from the device's own generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _bar(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[speed]} samples/s"), TimeRemainingColumn(),
                    TextColumn("loss {task.fields[loss]}"), console=Console(stderr=True), transient=True)


def run_epoch(phase: Phase, limit: int, device: torch.device, on_step: Callable | None = None, *, start: int = 0,
              total0: float = 0.0, rows0: int = 0, every: int | None = None,
              save: Callable[[int, torch.Tensor, int], None] | None = None) -> tuple[float, int]:
    """``limit`` steps of ``phase`` (at most one pass of its stream); (sum of per-sample losses, rows).

    The hot loop: the loss stays a tensor on the device (no sync per step) unless ``on_step``
    reads it (the progress bar, every few dozen steps). A resumed epoch skips its first ``start``
    items (drawn, so that the stream's generators advance as they did, but not stepped) and continues
    the sums ``total0`` / ``rows0``; ``save(steps done, loss sum, rows)`` runs every ``every`` steps
    (not after the last: the epoch's own checkpoint follows)."""
    total = torch.full((), total0, dtype=torch.float64, device=device)
    rows = rows0
    for k, item in enumerate(phase.stream()):
        if k >= limit:
            break
        if k < start:
            continue
        if device.type != "cpu":
            item = move(item, device)
        loss = phase.step(item)
        b = phase.rows(item)
        total += loss.detach().double() * b
        rows += b
        if on_step is not None:
            on_step(k, loss, rows)
        if save is not None and every and (k + 1) % every == 0 and k + 1 < limit:
            save(k + 1, total, rows)
    return float(total), rows


def _epoch_line(r: dict[str, Any], state: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}"] + ([r["phase"]] if "phase" in r else []) + [
        f"loss {fmt(r['train_loss'])}", f"{r['train_samples_per_s']:,.0f} samples/s"]
    if "valid_auc" in r:
        parts += [f"valid AUC {fmt(r['valid_auc'])}", f"LogLoss {fmt(r['valid_logloss'])}"]
    if state["stopped_early"]:
        parts.append(f"early stop (best epoch {state['best_epoch']})")
    return " | ".join(parts)
