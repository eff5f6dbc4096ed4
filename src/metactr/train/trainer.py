"""The one Trainer: every strategy, every feature.

A strategy (``metactr.strategies``) says how a batch (or a meta-batch of tasks) becomes a loss and
an update. The Trainer owns the rest, once: the loop over phases and epochs (fractions allowed),
the device, precision, the shuffling generator, checkpoints and ``--resume`` (bit-identical to an
uninterrupted run on CPU: weights, every optimizer and scheduler, torch's RNG, the shuffling
generator and the strategy's own state are restored), early stopping on a validation split, DDP
under torchrun (``engine.distributed``), a Rich progress bar within each epoch (steps, samples/s,
ETA; off when stderr is not a TTY, ``$CI`` is set or ``progress=False``), and tracking
(``metrics.jsonl`` always, TensorBoard / MLflow on request: ``train.tracking``).

Without a run directory (the paper protocols' jobs) nothing is written: the same loop, no files.

Run directory (rank 0 writes it):

    .metactr               marker: metactr wrote this directory (``utils.claim_out_dir``)
    config.yaml            resolved config (on a resume: the settings it continued with)
    metrics.jsonl          one line per epoch (train loss, valid AUC/LogLoss/GAUC, lr, time)
    checkpoints/epoch_XXX.safetensors + .json
    checkpoints/epoch_XXX_step_YYYYYY.*   with ``checkpoint_every_steps``: YYYYYY steps into epoch XXX+1
                                          (the latest only; dropped when the epoch ends)
    best.safetensors + best.json   weights of the best validation epoch (last when no valid split)

A directory holding anything metactr did not write is refused (exit 2); ``force`` replaces metactr's
own. ``resume``: settings as in the run's config.yaml except ``resume_free_keys`` (else an error
listing them) unless ``resume_override`` (then applied, and noted in the next epoch record); stale
temporaries of atomic writes are removed. A mid-epoch checkpoint keeps the shuffling generator and
a strategy's task sampler as they were at the epoch's start: the resumed run redraws the epoch's
order and skips the steps done, so it ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from metactr.config import dump_config
from metactr.data.prepared import PreparedDataset, Split
from metactr.engine.distributed import DistInfo, barrier, broadcast_float
from metactr.engine.host import retain_freed_memory
from metactr.engine.steps import n_steps
from metactr.errors import ConfigError, DataError
from metactr.models.base import CTRModel
from metactr.strategies.base import Context, Phase, Strategy
from metactr.train import checkpoint as ckpt
from metactr.train.config import check_resume_config, describe_changes
from metactr.train.loop import _bar, _epoch_line, _rng_state, evaluate, run_epoch  # noqa: F401 (API)
from metactr.train.tracking import TrackingConfig, build_tracker, finite_or_none
from metactr.utils import (
    check_out_dir,
    claim_out_dir,
    owns_dir,
    remove_stale_temps,
    write_marker,
    write_text_atomic,
)

Logger = Callable[[str], None]


@dataclass
class FitResult:
    strategy: Strategy
    state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # what the strategy's ``finish`` returned

    @property
    def history(self) -> list[dict]:
        return self.state["history"]

    @property
    def train_time_s(self) -> float:
        return sum(r["train_time_s"] for r in self.history)


class Trainer:
    def __init__(self, *, device: torch.device | None = None, precision: str = "fp32", dist: DistInfo | None = None,
                 run_dir: str | Path | None = None, config: BaseModel | None = None, progress: bool = False,
                 log: Logger | None = None, tracking: TrackingConfig | None = None, tensorboard: bool = False,
                 valid_split: str | None = None, patience: int | None = None, min_delta: float = 0.0,
                 eval_batch_size: int = 8192, checkpoint_meta: dict[str, Any] | None = None,
                 checkpoint_every_steps: int | None = None, force: bool = False, resume_override: bool = False,
                 resume_free_keys: tuple[str, ...] = ()) -> None:
        self.device, self.every, self.force = device or torch.device("cpu"), checkpoint_every_steps, force
        self.resume_override, self.resume_free_keys = resume_override, tuple(resume_free_keys)
        self._note: dict[str, Any] | None = None  # changed settings, for the first record after a resume
        self.precision, self.dist = precision, dist or DistInfo()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config, self.progress, self.log = config, progress, log
        self.tracking, self.tensorboard = tracking or TrackingConfig(), tensorboard
        self.valid_split, self.patience, self.min_delta = valid_split, patience, min_delta
        self.eval_batch_size, self.meta = eval_batch_size, checkpoint_meta

    # ------------------------------------------------------------------ helpers
    def _say(self, msg: str) -> None:
        if self.log is not None and self.dist.is_main:
            self.log(msg)

    def _backends(self) -> list[str]:
        backends = list(self.tracking.backends)
        if self.tensorboard and "tensorboard" not in backends:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is not None:  # on by default where installed
                backends.append("tensorboard")
        return backends

    def _save(self, stem: Path, model: CTRModel, strategy: Strategy, gen: torch.Generator, state: dict, *,
              data_rng: torch.Tensor | None = None, extra_state: dict | None = None) -> None:
        ckpt.save_checkpoint(stem, model, self.meta or {}, optimizers=strategy.optimizers(),
                             schedulers=strategy.schedulers(), rng=_rng_state(gen, self.device, data_rng),
                             trainer=state, extra_tensors=strategy.extra_tensors(),
                             extra_state=strategy.extra_state() if extra_state is None else extra_state)

    def _claim(self, resume: bool) -> None:
        """The run directory must be metactr's (or absent/empty); on resume, drop stale temporaries."""
        run_dir = self.run_dir
        if not resume:
            claim_out_dir(run_dir, force=self.force, what="run")
            return
        if not owns_dir(run_dir) and not (run_dir / "checkpoints").is_dir():
            check_out_dir(run_dir, what="run")  # a file or a foreign directory: the one-line error
        for p in remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints"):
            self._say(f"removed {p.name} (left by an interrupted save)")

    def _check_config(self) -> dict[str, Any]:
        saved = self.run_dir / "config.yaml" if self.run_dir is not None else None
        if self.config is None or saved is None or not saved.is_file():
            return {}
        changes = check_resume_config(saved, self.config, self.resume_free_keys, self.resume_override)
        if changes:
            self._say("resuming with changed settings (--resume-override): " + describe_changes(changes))
        return changes

    def _restore(self, model: CTRModel, strategy: Strategy, phases: list[Phase], gen: torch.Generator) -> dict:
        ck_dir = self.run_dir / "checkpoints"
        last = ckpt.latest_checkpoint(ck_dir)
        if last is None:
            raise DataError("nothing to resume: no checkpoint in this run directory", path=ck_dir)
        meta = ckpt.read_meta(last)
        state = meta["trainer"]
        tensors = ckpt.read_tensors(last, meta)
        ckpt.load_state(model, tensors, last.with_suffix(".safetensors"))  # weights first: a phase's
        for phase in phases[:state["phase"] + 1]:                           # start may read them
            phase.start()
        fresh = ckpt.hyperparameters(strategy.optimizers(), strategy.schedulers()) if self._note else None
        _, rest = ckpt.restore_training(last, model, strategy.optimizers(), strategy.schedulers())
        if fresh is not None:  # --resume-override: the new settings, at the restored position
            ckpt.reapply_hyperparameters(strategy.optimizers(), strategy.schedulers(), fresh)
        strategy.load_extra({k[len("strategy."):]: v for k, v in rest.items() if k.startswith("strategy.")},
                            meta.get("strategy_state", {}))
        torch.set_rng_state(rest["rng.torch"])
        gen.set_state(rest["rng.data"])
        if self.device.type == "cuda" and "rng.cuda" in rest:
            torch.cuda.set_rng_state(rest["rng.cuda"], self.device)
        where = f"epoch {state['epoch']} done" + (f", {state['in_epoch']['step']} steps into the next"
                                                  if state.get("in_epoch") else "")
        self._say(f"resuming from {last.name} ({where})")
        if self.dist.is_main and state.get("best_epoch") is not None:  # a kill while saving best tore it?
            src = ckpt.repair_best(self.run_dir / "best", ck_dir, state["best_epoch"], self.meta or {})
            if src is not None:
                self._say(f"rewrote best.safetensors/.json from {src.name} (an interrupted save had torn them)")
        return state

    # ------------------------------------------------------------------ fit
    def fit(self, model: CTRModel, dataset: PreparedDataset, split: str | Split, strategy: Strategy, *,
            epochs: float, batch_size: int, generator: torch.Generator, resume: bool = False,
            drop_last: bool = False) -> FitResult:
        """Train ``model`` on ``split`` with ``strategy`` for ``epochs`` (fractions allowed)."""
        main, run_dir = self.dist.is_main, self.run_dir
        train_split = dataset.split(split) if isinstance(split, str) else split
        if len(train_split) == 0:
            raise DataError(f"split '{train_split.name}' is empty", path=dataset.root)
        model.to(self.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # engine.host: freed blocks reused, not page-faulted in again every step
        ctx = Context(model, dataset, train_split, generator, epochs, batch_size, self.device, self.dist,
                      self.precision, drop_last)
        phases = strategy.setup(ctx)
        state: dict[str, Any] = {"epoch": 0, "phase": 0, "phase_epoch": 0, "best_auc": None, "best_epoch": None,
                                 "bad_epochs": 0, "stopped_early": False, "history": []}
        started = 0  # phases already started (a resumed run re-starts them before restoring)
        if resume and run_dir is None:
            raise ConfigError("--resume needs a run directory", field="out")
        if main and run_dir is not None:
            self._claim(resume)
        if resume:
            self._note = self._check_config() or None
            state = self._restore(model, strategy, phases, generator)
            started = state["phase"] + 1
        elif main and run_dir is not None and ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise ConfigError("run directory already has checkpoints: pass --resume, --force (replaces this run) "
                              "or choose another 'out'", path=run_dir, field="out")
        files = main and run_dir is not None
        if files:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not owns_dir(run_dir):  # a run made before markers existed, resumed
                write_marker(run_dir, what="run")
            if self.config is not None:
                write_text_atomic(run_dir / "config.yaml", dump_config(self.config))
        # metrics.jsonl mirrors the history of the checkpoint we continue from (drops lines of a crashed epoch)
        tracker = build_tracker(run_dir or ".", self._backends(), enabled=files, step_key="epoch",
                                history=state["history"], mlflow_experiment=self.tracking.mlflow_experiment,
                                mlflow_tracking_uri=self.tracking.mlflow_tracking_uri)
        barrier(self.dist)
        failed = True
        try:
            if self.config is not None and not resume:
                tracker.log_params(self.config.model_dump())
            for pi in range(state["phase"], len(phases)):
                self._run_phase(pi, phases, started, model, dataset, strategy, generator, state, tracker, epochs)
                if state["stopped_early"]:
                    break
            failed = False
        finally:
            tracker.close(failed=failed)
        return FitResult(strategy, state, strategy.finish())

    def _run_phase(self, pi: int, phases: list[Phase], started: int, model: CTRModel, dataset: PreparedDataset,
                   strategy: Strategy, gen: torch.Generator, state: dict, tracker, epochs: float) -> None:
        phase, last_phase = phases[pi], pi == len(phases) - 1
        if pi >= started:
            phase.start()
        per = phase.steps_per_epoch()
        total = n_steps(epochs, per)
        n_epochs = -(-total // max(per, 1))
        valid = self.valid_split if last_phase else None
        show = self.progress and self.dist.is_main and sys.stderr.isatty() and not os.environ.get("CI")
        while state["phase_epoch"] < n_epochs and not state["stopped_early"]:
            epoch, pe = state["epoch"] + 1, state["phase_epoch"] + 1
            limit = min(per, total - (pe - 1) * per)
            model.train(phase.train_mode)
            part = state.pop("in_epoch", None) or {}  # resumed from a mid-epoch checkpoint
            lr = part.get("lr", phase.lr())
            t0 = time.perf_counter() - part.get("time_s", 0.0)
            save = None
            if self.every and self.run_dir is not None:
                save = self._mid_epoch_saver(phase, model, strategy, gen, state, lr, t0)
            loss_sum, rows = self._epoch(phase, limit, show, f"{phase.name if len(phases) > 1 else 'epoch'} "
                                                             f"{pe}/{n_epochs}", t0, part, save)
            if self.dist.enabled and phase.sharded_rows:
                import torch.distributed as tdist

                agg = torch.tensor([loss_sum, rows], dtype=torch.float64, device=self.device)
                tdist.all_reduce(agg)
                loss_sum, rows = float(agg[0]), int(agg[1])
            train_time = time.perf_counter() - t0
            phase.epoch_end()
            record: dict[str, Any] = {"epoch": epoch}
            if len(phases) > 1:
                record["phase"] = phase.name
            if self._note:  # --resume-override: from this epoch on, the run used these settings
                record["resumed_with_changes"], self._note = self._note, None
            record.update({"lr": lr, "train_loss": loss_sum / max(rows, 1), "train_samples_per_s": rows / train_time,
                           "train_time_s": train_time})
            valid_auc = float("nan")
            if valid and self.dist.is_main:
                vm = evaluate(model, dataset, valid, batch_size=self.eval_batch_size, device=self.device,
                              precision=self.precision)
                record.update({f"valid_{k}": v for k, v in vm.items() if k != "n"})
                valid_auc = float("nan") if vm["auc"] is None else vm["auc"]
            valid_auc = broadcast_float(valid_auc, self.dist, self.device)
            if last_phase:
                improved = not math.isnan(valid_auc) and (
                    state["best_auc"] is None or valid_auc > state["best_auc"] + self.min_delta)
                if improved or not valid:
                    state.update(best_auc=None if math.isnan(valid_auc) else valid_auc, best_epoch=epoch,
                                 bad_epochs=0)
                else:
                    state["bad_epochs"] += 1
                if valid and self.patience is not None and state["bad_epochs"] >= self.patience:
                    state["stopped_early"] = True
            state.update(epoch=epoch, phase=pi, phase_epoch=pe)
            state["history"].append(finite_or_none(record))
            if self.dist.is_main and self.run_dir is not None:
                ck_dir = self.run_dir / "checkpoints"
                self._save(ck_dir / ckpt.checkpoint_name(epoch), model, strategy, gen, state)
                ckpt.prune_step_checkpoints(ck_dir, (epoch, 0))  # this epoch's mid-epoch ones are superseded
                if state["best_epoch"] == epoch:
                    ckpt.save_checkpoint(self.run_dir / "best", model, {**(self.meta or {}), "epoch": epoch})
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            self._say(_epoch_line(record, state))
            barrier(self.dist)
        if state["phase_epoch"] >= n_epochs and pi < len(phases) - 1:
            state.update(phase=pi + 1, phase_epoch=0)

    def _mid_epoch_saver(self, phase: Phase, model: CTRModel, strategy: Strategy, gen: torch.Generator,
                         state: dict, lr: float | None, t0: float) -> Callable[[int, torch.Tensor, int], None]:
        """The ``save`` of ``run_epoch``: a checkpoint ``k`` steps into this epoch, with the shuffling
        generator and the strategy's JSON state (its task sampler) as they are now, at the epoch's start."""
        data_rng, extra0 = gen.get_state(), strategy.extra_state()
        ck_dir = self.run_dir / "checkpoints"

        def save(k: int, total: torch.Tensor, rows: int) -> None:
            loss_sum, n = total.clone(), rows
            if self.dist.enabled and phase.sharded_rows:  # every rank reaches step k: sum the shares
                agg = torch.tensor([float(loss_sum), n], dtype=torch.float64, device=self.device)
                torch.distributed.all_reduce(agg)
                loss_sum, n = agg[0], int(agg[1])
            if not self.dist.is_main:
                return
            part = {"step": k, "loss_sum": float(loss_sum), "rows": n, "lr": lr, "time_s": time.perf_counter() - t0}
            stem = ck_dir / ckpt.checkpoint_name(state["epoch"], k)
            self._save(stem, model, strategy, gen, {**state, "in_epoch": part}, data_rng=data_rng, extra_state=extra0)
            ckpt.prune_step_checkpoints(ck_dir, (state["epoch"], k))  # keep the newest mid-epoch one only

        return save

    def _epoch(self, phase: Phase, limit: int, show: bool, title: str, t0: float, part: dict | None = None,
               save: Callable | None = None) -> tuple[float, int]:
        part = part or {}
        bar = _bar(show)
        on_step = None
        if bar is not None:
            bar.start()
            task = bar.add_task(title, total=limit, loss="–", speed="–", completed=part.get("step", 0))

            def on_step(k: int, loss: torch.Tensor, rows: int) -> None:
                fields = {}
                if k % 25 == 0:
                    fields = {"loss": f"{float(loss):.4f}", "speed": f"{rows / (time.perf_counter() - t0):,.0f}"}
                bar.update(task, advance=1, **fields)
        elif phase.log_every and self.log is not None:
            losses: list[float] = []

            def on_step(k: int, loss: torch.Tensor, rows: int) -> None:
                losses.append(float(loss))
                if (k + 1) % phase.log_every == 0:
                    self._say(f"  {phase.name} step {k + 1}/{limit}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
        try:
            # under DDP the saved sums are every rank's: rank 0 continues them, the others start at 0
            own = self.dist.is_main or not phase.sharded_rows
            return run_epoch(phase, limit, self.device, on_step, start=part.get("step", 0),
                             total0=part.get("loss_sum", 0.0) if own else 0.0, rows0=part.get("rows", 0) if own else 0,
                             every=self.every, save=save)
        finally:
            if bar is not None:
                bar.stop()


def train(model: CTRModel, dataset: PreparedDataset, split: str | Split, strategy: Any, *, epochs: float = 1.0,
          batch_size: int = 128, seed: int = 0, trainer: Trainer | None = None) -> FitResult:
    """Fit ``model`` on ``split`` with a strategy (a config from ``metactr.strategies.config``, or a
    ``Strategy``), shuffling with a generator seeded by ``seed``; no files unless ``trainer`` says."""
    from metactr.strategies import build_strategy

    strat = strategy if isinstance(strategy, Strategy) else build_strategy(strategy)
    return (trainer or Trainer()).fit(model, dataset, split, strat, epochs=epochs, batch_size=batch_size,
                                      generator=torch.Generator().manual_seed(seed))
