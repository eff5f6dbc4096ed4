"""Plain supervised training of one CTR model: the simplest strategy.

``fit`` trains with Adam / Adagrad / SGD / FTRL-Proximal, exponential LR decay per epoch,
gradient clipping and early stopping on validation AUC; it writes a checkpoint per epoch and can
resume from the last one so that the resumed run equals the uninterrupted one bit for bit on CPU
(weights, optimizer and scheduler state, torch's RNG and the shuffling generator are restored).

The loss is ``metactr.models.objective`` (the one loss every strategy shares) and evaluation is
``metactr.eval.predict.predict_proba``. Under ``torchrun`` every rank takes a disjoint share of
each global batch; its mean loss is scaled by ``b_rank * world / B`` so that DDP's gradient
*average* equals the gradient of the mean loss over the whole global batch of B rows (the
single-process gradient), whatever the split of B across ranks.

Run directory (rank 0 writes it):

    config.yaml            resolved config
    metrics.jsonl          one line per epoch (train loss, valid AUC/LogLoss/GAUC, lr, time)
    checkpoints/epoch_XXX.safetensors + .json
    best.safetensors + best.json   weights of the best validation epoch (last when no valid split)
    results.json, results.md       valid and test metrics of the best weights
    tb/                     TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metactr.config import dump_config, validate
from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError, DataError
from metactr.engine.device import resolve_device
from metactr.eval.metrics import classification_metrics
from metactr.eval.predict import predict_proba
from metactr.eval.report import append_jsonl, fmt, markdown_table, write_run
from metactr.models.base import CTRModel, build_model, objective
from metactr.train import checkpoint as ckpt
from metactr.train.config import DataConfig, TrainConfig, expand_path
from metactr.train.distributed import DistInfo, barrier, broadcast_float, init_from_env, shutdown
from metactr.engine.optim import build_optimizer
from metactr.engine.precision import autocast
from metactr.utils import seed_everything, write_text_atomic

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


class LossModule(nn.Module):
    """``objective`` as a module, so that DDP's forward (which arms its gradient hooks) runs it."""

    def __init__(self, model: CTRModel, precision: str = "fp32") -> None:
        super().__init__()
        self.model = model
        self.precision = precision

    def forward(self, batch, scale: float):
        with autocast(batch.label.device, self.precision):
            loss, _ = objective(self.model, None, batch)
        loss = loss.float()  # a bf16 model's logit may make the loss bf16: sum and scale it in fp32
        return (loss * scale if scale != 1.0 else loss), loss.detach()


def evaluate(model: CTRModel, dataset: PreparedDataset, split: str, *, batch_size: int = 8192,
             device: torch.device | None = None, precision: str = "fp32") -> dict[str, float]:
    """AUC, LogLoss, GAUC (and n) of ``model`` on ``split``."""
    if device is not None:
        model.to(device)
    s = dataset.split(split)
    # batches follow the model's device
    prob = predict_proba(model, dataset, s, batch_size=batch_size, precision=precision)
    return finite_or_none(classification_metrics(s.label.numpy(), prob, s.user_id.numpy()))


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
                    console=Console(stderr=True), transient=True)


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except Exception:
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _rng_state(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if device.type == "cuda":  # dropout on a GPU draws from the device's own generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# --------------------------------------------------------------------------- one epoch
def train_epoch(loss_fn: Callable, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                batches, global_sizes: list[int], *, world_size: int = 1, grad_clip: float | None = None,
                device: torch.device = torch.device("cpu"), on_step: Callable[[int, torch.Tensor], None] | None = None
                ) -> tuple[float, int]:
    """One pass over ``batches``; returns (sum of per-sample losses on this rank, rows seen).

    The hot loop: batches stay tensors, the loss is never synchronised to Python except when
    ``on_step`` asks for it (the progress bar reads it every few dozen steps).
    """
    total = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per step
    rows = 0
    for step, (batch, global_b) in enumerate(zip(batches, global_sizes, strict=False)):
        if device.type != "cpu":
            batch = batch.to(device)
        b = batch.size
        loss, plain = loss_fn(batch, b * world_size / global_b if world_size > 1 else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        total += plain.detach().double() * b
        rows += b
        if on_step is not None:
            on_step(step, plain)
    return float(total), rows


def has_unused_parameters(model: CTRModel, batch) -> bool:
    """Whether some parameter gets no gradient (DDP must then look for them every step).

    Probed once in eval mode, so that dropout consumes no random numbers."""
    was = model.training
    model.eval()
    try:
        loss, _ = objective(model, None, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return any(g is None for g in grads)
    finally:
        model.train(was)


def _global_batch_sizes(n: int, batch_size: int, world_size: int) -> list[int]:
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    if world_size > 1 and sizes and sizes[-1] < world_size:
        sizes.pop()  # a rank would get an empty batch: every rank drops that last short batch
    return sizes


# --------------------------------------------------------------------------- fit
def fit(model: CTRModel, dataset: PreparedDataset, cfg: TrainConfig, *, run_dir: str | Path | None = None,
        resume: bool = False, dist: DistInfo | None = None, device: torch.device | None = None,
        log: Logger | None = None) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` as ``cfg`` says; return the results (also in ``run_dir``)."""
    dist = dist or DistInfo()
    device = device or torch.device("cpu")
    run_dir = Path(run_dir or expand_path(cfg.out))
    log = log if log is not None else (lambda s: print(s, file=sys.stderr))
    main = dist.is_main
    ck_dir = run_dir / "checkpoints"
    data = cfg.data
    train_split = dataset.split(data.train_split)
    if len(train_split) == 0:
        raise DataError(f"split '{data.train_split}' is empty", path=dataset.root)
    valid_name = data.valid_split if data.valid_split in dataset.split_names else None
    if data.valid_split and valid_name is None:
        raise DataError(f"no validation split '{data.valid_split}' (available: {', '.join(dataset.split_names)}); "
                        "set data.valid_split: null to train without one", path=dataset.root)

    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    meta = ckpt.model_meta(model, dict(cfg.model.params),
                           {"use_ids": data.use_ids, "max_hist_len": model.spec.max_hist_len,
                            "prepared": str(dataset.root)})
    meta["precision"] = cfg.precision  # `metactr evaluate` predicts as training did unless told otherwise
    state: dict[str, Any] = {"epoch": 0, "best_auc": None, "best_epoch": None, "bad_epochs": 0,
                             "stopped_early": False, "history": []}

    if resume:
        last = ckpt.latest_checkpoint(ck_dir)
        if last is None:
            raise DataError("nothing to resume: no checkpoint in this run directory", path=ck_dir)
        saved, rng = ckpt.restore_training(last, model, optimizer, scheduler)
        state = saved["trainer"]
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["data"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if main:
            log(f"resuming from {last.name} (epoch {state['epoch']} done)")
    elif main and ck_dir.exists() and any(ck_dir.glob("epoch_*.json")):
        raise ConfigError("run directory already has checkpoints: pass --resume or choose another 'out'",
                          path=run_dir, field="out")

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        # metrics.jsonl mirrors the history of the checkpoint we continue from (drops lines of a crashed epoch)
        write_text_atomic(run_dir / "metrics.jsonl", "".join(_jsonl(r) for r in state["history"]))
    barrier(dist)

    loss_module = LossModule(model, cfg.precision)
    step_fn: nn.Module = loss_module
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        probe = dataset.batch(train_split, torch.arange(min(2, len(train_split)))).to(device)
        step_fn = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=has_unused_parameters(model, probe))
    sizes = _global_batch_sizes(len(train_split), cfg.batch_size, dist.world_size)
    tb = _tensorboard(run_dir, cfg.tensorboard and main)
    show_bar = cfg.progress and main and sys.stderr.isatty() and not os.environ.get("CI")
    patience = cfg.early_stopping.patience if valid_name else None

    try:
        while state["epoch"] < cfg.epochs and not state["stopped_early"]:
            epoch = state["epoch"] + 1
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            batches = dataset.iter_batches(train_split, cfg.batch_size, shuffle=True, generator=gen,
                                           rank=dist.rank, world_size=dist.world_size)
            bar = _progress(show_bar)
            on_step = None
            if bar is not None:
                bar.start()
                task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(sizes), loss="–")

                def on_step(step: int, loss: torch.Tensor, bar=bar, task=task) -> None:
                    bar.update(task, advance=1, **({"loss": f"{float(loss):.4f}"} if step % 25 == 0 else {}))
            try:
                loss_sum, rows = train_epoch(step_fn, optimizer, params, batches, sizes,
                                             world_size=dist.world_size, grad_clip=cfg.grad_clip,
                                             device=device, on_step=on_step)
            finally:
                if bar is not None:
                    bar.stop()
            if dist.enabled:
                import torch.distributed as tdist

                agg = torch.tensor([loss_sum, rows], dtype=torch.float64, device=device)
                tdist.all_reduce(agg)
                loss_sum, rows = float(agg[0]), int(agg[1])
            train_time = time.perf_counter() - t0
            scheduler.step()

            record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(rows, 1),
                                      "train_samples_per_s": rows / train_time, "train_time_s": train_time}
            valid_auc = float("nan")
            if valid_name and main:
                vm = evaluate(model, dataset, valid_name, batch_size=cfg.eval_batch_size, device=device,
                              precision=cfg.precision)
                record.update({f"valid_{k}": v for k, v in vm.items() if k != "n"})
                valid_auc = float("nan") if vm["auc"] is None else vm["auc"]
            valid_auc = broadcast_float(valid_auc, dist, device)

            improved = not math.isnan(valid_auc) and (
                state["best_auc"] is None or valid_auc > state["best_auc"] + cfg.early_stopping.min_delta)
            if improved or not valid_name:
                state.update(best_auc=None if math.isnan(valid_auc) else valid_auc, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            if patience is not None and state["bad_epochs"] >= patience:
                state["stopped_early"] = True
            state["epoch"] = epoch
            state["history"].append(finite_or_none(record))

            if main:
                stem = ck_dir / f"epoch_{epoch:03d}"
                ckpt.save_checkpoint(stem, model, meta, optimizer=optimizer, scheduler=scheduler,
                                     rng=_rng_state(gen, device), trainer=state)
                if state["best_epoch"] == epoch:
                    ckpt.save_checkpoint(run_dir / "best", model, {**meta, "epoch": epoch})
                append_jsonl(run_dir / "metrics.jsonl", finite_or_none(record))
                if tb is not None:
                    for k, v in record.items():
                        if k != "epoch" and isinstance(v, float):
                            tb.add_scalar(k, v, epoch)
                log(_epoch_line(record, state))
            barrier(dist)
    finally:
        if tb is not None:
            tb.close()

    results: dict[str, Any] = {}
    if main:
        results = _finish(model, dataset, cfg, run_dir, state, valid_name, device)
    barrier(dist)
    return results


def _jsonl(record: dict) -> str:
    import json

    return json.dumps(finite_or_none(record)) + "\n"


def finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, recursively: JSON has no NaN (an AUC is undefined on a one-class split)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _epoch_line(r: dict[str, Any], state: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"loss {r['train_loss']:.4f}", f"{r['train_samples_per_s']:,.0f} samples/s"]
    if "valid_auc" in r:
        parts += [f"valid AUC {fmt(r['valid_auc'])}", f"LogLoss {fmt(r['valid_logloss'])}"]
    if state["stopped_early"]:
        parts.append(f"early stop (best epoch {state['best_epoch']})")
    return " | ".join(parts)


def _finish(model: CTRModel, dataset: PreparedDataset, cfg: TrainConfig, run_dir: Path,
            state: dict[str, Any], valid_name: str | None, device: torch.device) -> dict[str, Any]:
    """Reload the best weights, evaluate valid/test, write results.json and results.md."""
    best = run_dir / "best"
    if best.with_suffix(".json").is_file():
        tensors = ckpt._read_tensors(best.with_suffix(".safetensors"))
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
def run_training(cfg: TrainConfig, *, resume: bool = False, log: Logger | None = None) -> dict[str, Any]:
    """Everything ``metactr train`` does: device, threads, process group, data, model, fit."""
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
        return fit(model, dataset, cfg, run_dir=run_dir, resume=resume, dist=dist, device=device, log=log)
    finally:
        shutdown(dist)
