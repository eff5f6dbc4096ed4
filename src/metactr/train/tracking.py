"""Experiment tracking behind one small interface: ``metrics.jsonl`` always, TensorBoard and MLflow on request.

A ``Tracker`` takes the run's parameters once (``log_params``), one dict of metrics per step
(``log_metrics``) and is closed at the end (or used as a context manager). The optional backends
import their package lazily, so metactr never needs them installed. An optional backend that
cannot start or fails later is reported once (logging, one line) and dropped: tracking never stops
a training run. ``metrics.jsonl`` is the run's record of results, so its errors are not swallowed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from metactr.config import StrictModel
from metactr.errors import ConfigError
from metactr.eval.report import append_jsonl
from metactr.utils import write_text_atomic

log = logging.getLogger(__name__)
OPTIONAL_BACKENDS = ("tensorboard", "mlflow")


class TrackingConfig(StrictModel):
    """The ``tracking`` section: extra backends beside metrics.jsonl (which is always written)."""

    backends: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    mlflow_experiment: str = Field("metactr", min_length=1)
    # None: a local store inside the run directory (RUN/mlflow.db), no server needed
    mlflow_tracking_uri: str | None = None


def finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN: an AUC is undefined on a one-class split).
    NumPy and 0-d torch scalars become Python numbers first."""
    if not isinstance(obj, (int, float, str)) and getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def flatten_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 8}}`` -> ``{"model.dim": 8}``; a pydantic model is dumped first."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if hasattr(v, "model_dump") or isinstance(v, Mapping):
            flat.update(flatten_params(v, key + "."))
        else:
            flat[key] = v
    return flat


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (no bools, strings, None, NaN): what a plot can show."""
    return {k: float(v) for k, v in finite_or_none(dict(metrics)).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """The interface: a backend overrides what it records; every method here is a no-op."""

    name = "null"
    optional = True  # an optional backend's failure is a warning, never an error

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def close(self, *, failed: bool = False) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class NullTracker(Tracker):
    """Logs nothing: what every DDP rank but 0 gets, and what ``enabled=False`` gives."""


class JsonlTracker(Tracker):
    """``run_dir/metrics.jsonl``: one whole line per ``log_metrics`` call, ``{step_key: step, **metrics}``.

    ``history`` (e.g. the records of the checkpoint a run resumes from) atomically replaces the file
    first, which drops the lines of a crashed epoch. ``log_params`` writes nothing: the run's
    config.yaml already holds the parameters.
    """

    name = "jsonl"
    optional = False

    def __init__(self, run_dir: str | Path, *, step_key: str = "step", history: Iterable[Mapping] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        if history is not None:
            self.rewrite(history)

    def rewrite(self, history: Iterable[Mapping]) -> None:
        write_text_atomic(self.path, "".join(json.dumps(finite_or_none(dict(r)), default=float) + "\n"
                                             for r in history))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {self.step_key: int(step), **{k: v for k, v in metrics.items() if k != self.step_key}}
        append_jsonl(self.path, finite_or_none(record))  # one write in append mode: never half a line


class TensorBoardTracker(Tracker):
    """Scalars (finite numbers only) under ``run_dir/tb``; the parameters as one text table."""

    name = "tensorboard"

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self._writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in flatten_params(params).items())
        self._writer.add_text("params", "| param | value |\n|---|---|\n" + rows, 0)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for k, v in _scalars(metrics).items():
            self._writer.add_scalar(k, v, int(step))

    def close(self, *, failed: bool = False) -> None:
        self._writer.close()


class MLflowTracker(Tracker):
    """One MLflow run. The default store is local (``sqlite:///RUN/mlflow.db``, no server; MLflow 3 keeps
    its file store in maintenance mode and refuses it by default). Uses a client, not mlflow's global
    active run, so several trackers (or a user's own MLflow run) do not interfere."""

    name = "mlflow"

    def __init__(self, run_dir: str | Path, *, experiment: str = "metactr", tracking_uri: str | None = None):
        import mlflow  # the optional mlflow(-skinny) package; a sqlite store also needs sqlalchemy + alembic
        from mlflow.entities import Metric, Param

        try:
            from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
        except ImportError:  # pragma: no cover - older layouts; mlflow's documented limits
            MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH = 250, 500
        self._Metric, self._Param = Metric, Param
        self._key_len, self._val_len = MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        if tracking_uri is None:  # mlflow-skinny lacks them; mlflow brings both
            for module in ("sqlalchemy", "alembic"):
                if importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"mlflow's local sqlite store needs {module}", name=module)
        self.tracking_uri = tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').as_posix()}"
        self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        exp = self._client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # artifacts of the per-run store stay in the run directory, not in the working directory
            where = None if tracking_uri else (run_dir / "mlartifacts").as_uri()
            exp_id = self._client.create_experiment(experiment, artifact_location=where)
        self.run_id = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id

    def _key(self, k: str) -> str:  # mlflow accepts letters, digits, _ - . / and space
        return re.sub(r"[^\w\-./ ]", "_", str(k))[: self._key_len]

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [self._Param(self._key(k), str(v)[: self._val_len]) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), 100):  # mlflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        items = [self._Metric(self._key(k), v, now, int(step)) for k, v in _scalars(metrics).items()]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def close(self, *, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class MultiTracker(Tracker):
    """Fans every call out; an optional backend that raises is reported once and dropped."""

    name = "multi"
    optional = False

    def __init__(self, trackers: Iterable[Tracker]):
        self.trackers = list(trackers)

    def _each(self, method: str, *args, **kwargs) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args, **kwargs)
            except Exception as e:
                if not t.optional:
                    raise
                self.trackers.remove(t)
                log.warning("tracking: %s failed (%s: %s); disabled for the rest of this run",
                            t.name, type(e).__name__, " ".join(str(e).split())[:200])

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def close(self, *, failed: bool = False) -> None:
        self._each("close", failed=failed)


def build_tracker(run_dir: str | Path, backends: Iterable[str] = (), *, enabled: bool = True,
                  step_key: str = "step", history: Iterable[Mapping] | None = None,
                  mlflow_experiment: str = "metactr", mlflow_tracking_uri: str | None = None) -> Tracker:
    """metrics.jsonl plus the requested backends (names checked even when ``enabled`` is False, so
    every rank of a DDP run fails alike); ``enabled=False`` (rank != 0) gives a ``NullTracker``."""
    names = list(dict.fromkeys(backends))
    for n in names:
        if n != "jsonl" and n not in OPTIONAL_BACKENDS:
            raise ConfigError(f"unknown tracking backend {n!r}; choose from {', '.join(OPTIONAL_BACKENDS)}",
                              field="tracking.backends")
    if not enabled:
        return NullTracker()
    trackers: list[Tracker] = [JsonlTracker(run_dir, step_key=step_key, history=history)]
    for n in names:
        if n == "jsonl":
            continue
        try:
            if n == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir))
            else:
                trackers.append(MLflowTracker(run_dir, experiment=mlflow_experiment, tracking_uri=mlflow_tracking_uri))
        except ImportError as e:
            if e.name and e.name.split(".")[0] not in (n, "torch"):  # the backend is there, a dependency is not
                log.warning("tracking: %s needs the module %s (pip install %s); skipping", n, e.name, n)
            else:
                log.warning("tracking: %s is not installed (pip install %s); skipping", n, n)
        except Exception as e:
            log.warning("tracking: %s could not start (%s: %s); skipping", n, type(e).__name__,
                        " ".join(str(e).split())[:200])
    return MultiTracker(trackers)
