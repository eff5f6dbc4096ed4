"""``metactr models``, ``metactr train`` and ``metactr evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer



def models_command() -> None:
    """List the registered CTR models with their paper, parameter groups and whether they read the
    session (always; optional: the ``use_history`` argument; no)."""
    from rich.console import Console
    from rich.table import Table

    from metactr.data.batch import FeatureSpec, Field
    from metactr.models.base import registry

    spec = FeatureSpec(user=(Field("user_id", 4),), item=(Field("item_id", 4), Field("genre", 3, 2)),
                       context=(Field("hour", 3),), max_hist_len=3)
    table = Table("model", "paper", "parameter groups", "session")
    for name, cls in registry().items():
        try:  # groups of a tiny instance: the names, not the sizes, are what users choose from
            groups = ", ".join(cls(spec).param_groups())
        except Exception:  # a model that cannot be built on the toy spec still gets listed
            groups = ", ".join(cls.param_group_prefixes)
        table.add_row(name, cls.paper or (cls.__doc__ or "").strip().split("\n")[0], groups, cls.session_use())
    Console().print(table)


def train_command(
    config: Annotated[Path, typer.Argument(help="YAML training config (see configs/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: a.b=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint, with the "
                                         "run's settings (only epochs, out, progress, threads, device, tensorboard, "
                                         "tracking may change).")] = False,
    resume_override: Annotated[bool, typer.Option("--resume-override", help="--resume, applying changed settings "
                                                  "(recorded in config.yaml and metrics.jsonl).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the run directory if metactr wrote it (never "
                                        "another directory).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no per-epoch lines (metrics.jsonl "
                                        "still gets every epoch).")] = False,
) -> None:
    """Train a model as CONFIG says; runs unchanged under torchrun (DDP)."""
    from metactr.errors import ConfigError
    from metactr.train.config import load_train_config
    from metactr.train.run import run_training

    if force and (resume or resume_override):
        raise ConfigError("--force starts the run afresh: it cannot be combined with --resume", field="force")
    cfg = load_train_config(config, [*(set_ or []), *(["progress=false"] if quiet else [])])
    results = run_training(cfg, resume=resume, resume_override=resume_override, force=force,
                           log=(lambda s: None) if quiet else None)
    if results:
        typer.echo(json.dumps(results["metrics"], indent=2))


def evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (.safetensors or .json, e.g. runs/x/best.safetensors).")],
    data: Annotated[Path, typer.Option("--data", help="Prepared dataset directory.")],
    split: Annotated[str, typer.Option("--split", help="Split name, e.g. test.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the metrics JSON here (atomically; "
                                                "replaces only an earlier metrics file of metactr's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8192,
    precision: Annotated[Optional[str], typer.Option(
        "--precision", help="fp32 or bf16 (forward under autocast); default: what the checkpoint was trained with."
    )] = None,
) -> None:
    """Evaluate a checkpoint on a split: AUC, GAUC, LogLoss as JSON."""
    from metactr.train.run import evaluate_checkpoint
    from metactr.utils import check_out_file, write_json_atomic

    if out is not None:  # before the work: a directory or someone else's file is never replaced
        check_out_file(out, is_ours=_is_metrics_json, what="metrics")
    metrics = evaluate_checkpoint(checkpoint, data, split, batch_size=batch_size, precision=precision)
    if out is not None:
        write_json_atomic(out, metrics)
    typer.echo(json.dumps(metrics, indent=2))


EVALUATE_KEYS = {"checkpoint", "model", "data", "split", "precision"}  # what `evaluate --out` writes


def _is_metrics_json(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and EVALUATE_KEYS <= set(obj)


def register(app: typer.Typer) -> None:
    """Add this concern's commands to ``app``."""
    app.command("models")(models_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
