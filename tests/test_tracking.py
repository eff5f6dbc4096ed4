"""Tracking: metrics.jsonl always; TensorBoard / MLflow when installed; a broken backend never stops a run."""

from __future__ import annotations

import json
import logging
import sys
import types
from collections import namedtuple

import numpy as np
import pydantic
import pytest
import torch

from metactr.errors import ConfigError
from metactr.train.tracking import (JsonlTracker, MLflowTracker, MultiTracker, NullTracker, Tracker,
                                    TrackingConfig, build_tracker, flatten_params)


def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_lines_step_first_non_finite_null(tmp_path):
    t = JsonlTracker(tmp_path, step_key="epoch")
    record = {"lr": 0.01, "train_loss": 0.5, "valid_auc": float("nan"), "valid_logloss": float("inf")}
    t.log_metrics(record, step=1)
    t.log_metrics({"train_loss": np.float32("nan"), "n": np.int64(7), "t": torch.tensor(0.25), "epoch": 99}, 2)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    # the line is the trainer's record exactly as trainer.py writes it today (epoch first, NaN -> null)
    assert text.splitlines()[0] == json.dumps({"epoch": 1, "lr": 0.01, "train_loss": 0.5,
                                                "valid_auc": None, "valid_logloss": None})
    assert _lines(tmp_path)[1] == {"epoch": 2, "train_loss": None, "n": 7, "t": 0.25}  # the step argument wins


def test_jsonl_history_rewrites_and_drops_crashed_epoch(tmp_path):
    first = JsonlTracker(tmp_path)
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step)
    history = _lines(tmp_path)[:2]  # the checkpoint we resume from saw epochs 1-2; epoch 3 crashed
    history[1]["auc"] = float("nan")
    resumed = JsonlTracker(tmp_path, history=history)
    resumed.log_metrics({"loss": 0.3}, 3)
    assert _lines(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "auc": None},
                                {"step": 3, "loss": 0.3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind
    JsonlTracker(tmp_path, history=[])
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_flatten_params_nested_dict_and_pydantic():
    assert flatten_params({"model": {"name": "din", "mlp": {"dims": [8, 4]}}, "seed": 1}) == {
        "model.name": "din", "model.mlp.dims": [8, 4], "seed": 1}
    assert flatten_params({"tracking": TrackingConfig(backends=["mlflow"])}) == {
        "tracking.backends": ["mlflow"], "tracking.mlflow_experiment": "metactr", "tracking.mlflow_tracking_uri": None}


class _Broken(Tracker):
    name = "broken"

    def __init__(self):
        self.calls = 0

    def log_metrics(self, metrics, step):
        self.calls += 1
        raise OSError("disk\nfull")


def test_multi_tracker_disables_a_failing_optional_backend_once(tmp_path, caplog):
    broken = _Broken()
    with caplog.at_level(logging.WARNING, logger="metactr.train.tracking"):
        with MultiTracker([JsonlTracker(tmp_path), broken]) as t:
            for step in (1, 2, 3):
                t.log_metrics({"loss": 0.1}, step)
    assert broken.calls == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["tracking: broken failed (OSError: disk full); disabled for the rest of this run"]
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3]


def test_multi_tracker_does_not_swallow_jsonl_errors(tmp_path):
    required = _Broken()
    required.optional = False
    with pytest.raises(OSError, match="disk"):
        MultiTracker([required]).log_metrics({"loss": 1.0}, 1)


def test_context_manager_reports_failure_to_close():
    seen = []

    class Spy(Tracker):
        def close(self, *, failed=False):
            seen.append(failed)

    with Spy():
        pass
    with pytest.raises(KeyError), Spy():
        raise KeyError("x")
    assert seen == [False, True]


def test_build_tracker_rejects_unknown_backend_even_when_disabled(tmp_path):
    for enabled in (True, False):
        with pytest.raises(ConfigError, match="wandb") as e:
            build_tracker(tmp_path, ["tensorboard", "wandb"], enabled=enabled)
        assert e.value.field == "tracking.backends" and "tensorboard, mlflow" in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_build_tracker_disabled_is_a_no_op(tmp_path):
    t = build_tracker(tmp_path / "run", ["jsonl"], enabled=False, history=[{"step": 1}])
    assert isinstance(t, NullTracker)
    with t:
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, 1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend,modules", [("mlflow", ["mlflow"]),
                                             ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])])
def test_missing_package_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, caplog, backend, modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ModuleNotFoundError
    with caplog.at_level(logging.WARNING, logger="metactr.train.tracking"):
        t = build_tracker(tmp_path, [backend, "jsonl", backend])
    assert [r.getMessage() for r in caplog.records] == [
        f"tracking: {backend} is not installed (pip install {backend}); skipping"]
    assert [type(x) for x in t.trackers] == [JsonlTracker]
    t.log_metrics({"loss": 0.5}, 1)
    t.close()
    assert _lines(tmp_path) == [{"step": 1, "loss": 0.5}]


def test_mlflow_local_store_needs_sqlalchemy(tmp_path, monkeypatch, caplog):
    _fake_mlflow(monkeypatch)
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: None if n == "sqlalchemy" else real_find_spec(n, *a))
    with caplog.at_level(logging.WARNING, logger="metactr.train.tracking"):
        t = build_tracker(tmp_path, ["mlflow"])
    assert [r.getMessage() for r in caplog.records] == [
        "tracking: mlflow needs the module sqlalchemy (pip install mlflow); skipping"]
    assert len(t.trackers) == 1


def _fake_mlflow(monkeypatch):
    """A stand-in for the mlflow package that records what the tracker sends (mlflow may be absent)."""
    calls = []

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location=None):
            calls.append(("experiment", name, artifact_location))
            return "1"

        def create_run(self, exp_id, run_name=None):
            calls.append(("run", exp_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics=(), params=()):
            calls.append(("batch", list(metrics), list(params)))

        def set_terminated(self, run_id, status):
            calls.append(("end", status))

    pkg = types.ModuleType("mlflow")
    pkg.MlflowClient = Client
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = namedtuple("Metric", "key value timestamp step")
    entities.Param = namedtuple("Param", "key value")
    validation = types.ModuleType("mlflow.utils.validation")
    validation.MAX_ENTITY_KEY_LENGTH, validation.MAX_PARAM_VAL_LENGTH = 250, 6000
    for name, mod in {"mlflow": pkg, "mlflow.entities": entities, "mlflow.utils": types.ModuleType("mlflow.utils"),
                      "mlflow.utils.validation": validation}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_mlflow_tracker_sends_flat_truncated_params_and_finite_metrics(tmp_path, monkeypatch):
    calls = _fake_mlflow(monkeypatch)
    params = {"model": {"name": "din", "note": "x" * 7000}, "p": {f"k{i}": i for i in range(150)}, "bad:key!": 1}
    with MLflowTracker(tmp_path / "run", experiment="exp", tracking_uri="file:///elsewhere") as t:
        t.log_params(params)
        t.log_metrics({"loss": 0.5, "auc": float("nan"), "ok": True, "name": "x", "n": 3}, step=2)
    assert calls[0] == ("client", "file:///elsewhere")
    assert calls[1] == ("experiment", "exp", None) and calls[2] == ("run", "1", "run")
    batches = [c for c in calls if c[0] == "batch"]
    sent = [p for b in batches for p in b[2]]
    assert [len(b[2]) for b in batches[:2]] == [100, 53]  # mlflow's 100-params-per-call limit
    assert dict(sent)["model.note"] == "x" * 6000 and dict(sent)["bad_key_"] == "1" and dict(sent)["p.k9"] == "9"
    assert [(m.key, m.value, m.step) for m in batches[2][1]] == [("loss", 0.5, 2), ("n", 3.0, 2)]
    assert calls[-1] == ("end", "FINISHED")


def test_mlflow_default_store_is_inside_the_run_dir(tmp_path, monkeypatch):
    calls = _fake_mlflow(monkeypatch)
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda n, *a: object() if n in ("sqlalchemy", "alembic") else real_find_spec(n, *a))
    with pytest.raises(ValueError), MLflowTracker(tmp_path / "r"):
        raise ValueError
    run = (tmp_path / "r").resolve()
    assert calls[0] == ("client", f"sqlite:///{run}/mlflow.db")
    assert calls[1] == ("experiment", "metactr", (run / "mlartifacts").as_uri())
    assert calls[-1] == ("end", "FAILED")


def test_tracking_config():
    assert TrackingConfig().backends == [] and TrackingConfig().mlflow_experiment == "metactr"
    for bad in ({"backends": ["wandb"]}, {"backend": ["mlflow"]}, {"mlflow_experiment": ""}):
        with pytest.raises(pydantic.ValidationError):
            TrackingConfig(**bad)


def test_tensorboard_writes_finite_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="optional package tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with build_tracker(tmp_path, ["tensorboard"]) as t:
        assert [x.name for x in t.trackers] == ["jsonl", "tensorboard"]
        t.log_params({"model": {"name": "din"}})
        t.log_metrics({"loss": 0.5, "auc": float("nan")}, 1)
        t.log_metrics({"loss": 0.25, "auc": 0.75}, 2)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("auc")] == [(2, 0.75)]


@pytest.mark.slow  # mlflow creates its sqlite schema (alembic migrations): seconds
def test_mlflow_real_local_store(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="optional package mlflow is not installed")
    pytest.importorskip("sqlalchemy", reason="mlflow's local sqlite store needs sqlalchemy")
    with build_tracker(tmp_path / "run", ["mlflow"], mlflow_experiment="unit") as t:
        assert [x.name for x in t.trackers] == ["jsonl", "mlflow"]
        t.log_params({"model": {"name": "din"}, "lr": 0.01})
        t.log_metrics({"loss": 0.5, "auc": float("nan")}, 1)
        t.log_metrics({"loss": 0.25}, 2)
        ml = t.trackers[1]
    client = mlflow.MlflowClient(ml.tracking_uri)
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.name": "din", "lr": "0.01"}
    assert [(m.step, m.value) for m in client.get_metric_history(ml.run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert client.get_metric_history(ml.run_id, "auc") == []
    assert ml.tracking_uri.startswith("sqlite:///") and (tmp_path / "run" / "mlflow.db").is_file()
