"""``metactr train``: a config in, a run directory out.

``run_training`` does everything the command does (threads, device, process group under torchrun,
data, model) and ``fit`` runs the one Trainer (``train.trainer``) with the config's strategy: the
plain strategy with the config's optimizer (``optim``), per-epoch ``lr_decay`` and ``grad_clip``
unless ``strategy:`` names another (two_phase, maml, ...). Then the best weights are reloaded and
scored on the validation and test splits: ``results.json`` and ``results.md`` join the Trainer's
files in the run directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metactr.config import validate
from metactr.data.prepared import PreparedDataset
from metactr.engine.device import resolve_device
from metactr.engine.distributed import DistInfo, barrier, init_from_env, shutdown
from metactr.engine.precision import PRECISIONS
from metactr.errors import ConfigError, DataError
from metactr.eval.report import markdown_table, write_run
from metactr.models.base import CTRModel, build_model
from metactr.strategies import build_strategy
from metactr.strategies.plain import Plain
from metactr.train import checkpoint as ckpt
from metactr.train.config import RESUME_FREE_KEYS, DataConfig, TrainConfig
from metactr.train.tracking import finite_or_none
from metactr.train.trainer import Trainer, evaluate
from metactr.utils import expand_path, seed_everything

Logger = Callable[[str], None]


# --------------------------------------------------------------------------- set-up helpers
def prepared_dir(data: DataConfig, run_out: str | Path) -> Path:
    """The prepared directory of ``data``: given, or made from raw files (cached)."""
    if data.prepared is not None:
        return expand_path(data.prepared)
    from metactr.data.pipeline import PrepareConfig, prepare  # the data concern's API

    out = expand_path(data.out) if data.out else Path(run_out).parent / "prepared" / f"{data.dataset}-{data.protocol}"
    pcfg = validate(PrepareConfig, {**data.prepare, "protocol": data.protocol}, prefix="data.prepare")
    return Path(prepare(data.dataset, expand_path(data.raw_dir), out, pcfg, force=False))


def load_dataset(data: DataConfig, run_out: str | Path) -> PreparedDataset:
    return PreparedDataset(prepared_dir(data, run_out), use_ids=data.use_ids, max_hist_len=data.max_hist_len)


def fit(model: CTRModel, dataset: PreparedDataset, cfg: TrainConfig, *, run_dir: str | Path | None = None,
        resume: bool = False, dist: DistInfo | None = None, device: torch.device | None = None,
        log: Logger | None = None, resume_override: bool = False, force: bool = False) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` as ``cfg`` says (any strategy); return the results (also in ``run_dir``).

    ``run_dir`` must be absent, empty or a run of metactr's (``force``: replaced). ``resume`` with
    settings other than the run's config.yaml (``RESUME_FREE_KEYS`` aside) is an error unless
    ``resume_override`` (then they are applied and recorded)."""
    dist = dist or DistInfo()
    device = device or torch.device("cpu")
    run_dir = Path(run_dir or expand_path(cfg.out))
    log = log if log is not None else (lambda s: print(s, file=sys.stderr))
    data = cfg.data
    valid_name = data.valid_split if data.valid_split in dataset.split_names else None
    if data.valid_split and valid_name is None:
        raise DataError(f"no validation split '{data.valid_split}' (available: {', '.join(dataset.split_names)}); "
                        "set data.valid_split: null to train without one", path=dataset.root)
    if data.train_split not in dataset.split_names:
        dataset.split(data.train_split)  # the DataError naming the missing split
    meta = ckpt.model_meta(model, dict(cfg.model.params),
                           {"use_ids": data.use_ids, "max_hist_len": model.spec.max_hist_len,
                            "prepared": str(dataset.root)})
    meta["precision"] = cfg.precision  # `metactr evaluate` predicts as training did unless told otherwise
    meta["strategy"] = cfg.strategy.name if cfg.strategy is not None else "plain"
    strategy = (Plain(optim=cfg.optim, lr_decay=cfg.lr_decay, grad_clip=cfg.grad_clip) if cfg.strategy is None
                else build_strategy(cfg.strategy))
    trainer = Trainer(device=device, precision=cfg.precision, dist=dist, run_dir=run_dir, config=cfg,
                      progress=cfg.progress, log=log, tracking=cfg.tracking, tensorboard=cfg.tensorboard,
                      valid_split=valid_name, patience=cfg.early_stopping.patience,
                      min_delta=cfg.early_stopping.min_delta, eval_batch_size=cfg.eval_batch_size,
                      checkpoint_meta=meta, checkpoint_every_steps=cfg.checkpoint_every_steps, force=force,
                      resume_override=resume_override, resume_free_keys=RESUME_FREE_KEYS)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = trainer.fit(model, dataset, data.train_split, strategy, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         generator=gen, resume=resume)
    results: dict[str, Any] = {}
    if dist.is_main:
        results = _finish(model, dataset, cfg, run_dir, result.state, valid_name, device)
        if result.extra:
            results["strategy"] = finite_or_none(result.extra)
    barrier(dist)
    return results


def _finish(model: CTRModel, dataset: PreparedDataset, cfg: TrainConfig, run_dir: Path,
            state: dict[str, Any], valid_name: str | None, device: torch.device) -> dict[str, Any]:
    """Reload the best weights, evaluate valid/test, write results.json and results.md."""
    best = run_dir / "best"
    if best.with_suffix(".json").is_file():
        tensors = ckpt.read_tensors(best, ckpt.read_meta(best))
        ckpt.load_state(model, tensors, best.with_suffix(".safetensors"))
    results: dict[str, Any] = {
        "model": model.name, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "stopped_early": state["stopped_early"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_time_s": sum(r["train_time_s"] for r in state["history"]),
        "checkpoint": str(best.with_suffix(".safetensors")), "metrics": {},
    }
    test_name = cfg.data.test_split if cfg.data.test_split in dataset.split_names else None
    if cfg.data.test_split and test_name is None:
        raise DataError(f"no test split '{cfg.data.test_split}'", path=dataset.root)
    for split in (valid_name, test_name):
        if split:
            results["metrics"][split] = evaluate(model, dataset, split, batch_size=cfg.eval_batch_size, device=device,
                                                 precision=cfg.precision)
    rows = [[s, m["auc"], m.get("gauc", float("nan")), m["logloss"], m["n"]] for s, m in results["metrics"].items()]
    md = (f"# {model.name}: best epoch {state['best_epoch']} of {state['epoch']}\n\n"
          + markdown_table(["split", "AUC", "GAUC", "LogLoss", "n"], rows))
    write_run(run_dir, finite_or_none(results), md)
    return results


# --------------------------------------------------------------------------- the `train` command
def run_training(cfg: TrainConfig, *, resume: bool = False, log: Logger | None = None, resume_override: bool = False,
                 force: bool = False) -> dict[str, Any]:
    """Everything ``metactr train`` does: device, threads, process group, data, model, fit."""
    resume = resume or resume_override
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = init_from_env(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        run_dir = expand_path(cfg.out)
        if dist.is_main or cfg.data.prepared is not None:
            dataset = load_dataset(cfg.data, run_dir)
        barrier(dist)  # rank 0 prepared (and cached) the data first; the others now read the cache
        if not dist.is_main and cfg.data.prepared is None:
            dataset = load_dataset(cfg.data, run_dir)
        seed_everything(cfg.seed)  # same initial weights on every rank
        model = build_model(cfg.model.name, dataset.spec, **cfg.model.params)
        return fit(model, dataset, cfg, run_dir=run_dir, resume=resume, dist=dist, device=device, log=log,
                   resume_override=resume_override, force=force)
    finally:
        shutdown(dist)


# --------------------------------------------------------------------------- the `evaluate` command
def check_spec(model_spec: dict, data_spec: dict, data_path: Path) -> None:
    """The data must have the model's fields, and no id beyond the model's vocabularies."""
    for group in ("user", "item", "context"):
        m, d = model_spec[group], data_spec[group]
        if [(f["name"], f["max_len"]) for f in m] != [(f["name"], f["max_len"]) for f in d]:
            raise DataError(f"{group} fields {[f['name'] for f in d]} differ from the model's "
                            f"{[f['name'] for f in m]}", path=data_path, field=group)
        for fm, fd in zip(m, d, strict=True):
            if fd["vocab_size"] > fm["vocab_size"]:
                raise DataError(f"ids up to {fd['vocab_size'] - 1} exceed the model's vocabulary "
                                f"({fm['vocab_size']})", path=data_path, field=f"{group}.{fm['name']}")


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str, *, batch_size: int = 8192,
                        precision: str | None = None) -> dict[str, Any]:
    """AUC, GAUC, LogLoss of a checkpoint on a prepared split (in the checkpoint's precision unless told)."""
    model, meta = ckpt.load_model(checkpoint)
    precision = precision or meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'",
                          field="precision")
    opts = meta.get("data", {})
    dataset = PreparedDataset(data, use_ids=opts.get("use_ids", True), max_hist_len=model.spec.max_hist_len)
    check_spec(model.spec.to_dict(), dataset.spec.to_dict(), Path(data))
    return {"checkpoint": str(checkpoint), "model": meta["model"], "data": str(data), "split": split,
            "precision": precision, **evaluate(model, dataset, split, batch_size=batch_size, precision=precision)}
