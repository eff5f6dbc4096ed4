"""`metactr tune`: equal budgets, validation-only scoring, resumable seeded studies, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_trainer import make_prepared

from metactr.cli import main
from metactr.data.prepared import PreparedDataset
from metactr.train.config import load_train_config

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("tune") / "tiny")


def _train_yaml(path: Path, data_dir: Path, model: str, **data_kw) -> Path:
    cfg = {"data": {"prepared": str(data_dir), **data_kw}, "model": {"name": model, "params": {}},
           "optim": {"name": "adam", "lr": 0.01}, "epochs": 1, "batch_size": 128, "seed": 0,
           "out": str(path.parent / "unused"), "progress": False, "tensorboard": False,
           "early_stopping": {"patience": None}}
    if model == "basic":
        cfg["model"]["params"] = {"hidden": [8]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tune_yaml(tmp: Path, data_dir: Path, trials: int = 2, **over) -> Path:
    cfg = {"trials": trials, "seed": 3, "set": ["epochs=1"], "progress": False, "out": str(tmp / "out"),
           "methods": {
               "basic": {"config": str(_train_yaml(tmp / "basic.yaml", data_dir, "basic")),
                         "space": {"optim.lr": {"log_uniform": [1e-3, 1e-1]},
                                   "model.params.embed_dim": {"choice": [4, 8]},
                                   "model.params.hidden": {"choice": [[8], [16, 8]]}}},
               "lr": {"config": str(_train_yaml(tmp / "lr.yaml", data_dir, "lr")),
                      "space": {"optim.lr": {"uniform": [0.005, 0.05]}, "batch_size": {"int": [64, 256]}}}}}
    for k, v in over.items():
        cfg[k] = v
    p = tmp / "tune.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _results(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "results.json").read_text())


def test_equal_budgets_validation_only(tmp_path, data_dir, monkeypatch, capsys):
    loaded: list[str] = []
    orig = PreparedDataset._load_split
    monkeypatch.setattr(PreparedDataset, "_load_split", lambda self, name: loaded.append(name) or orig(self, name))
    assert main(["tune", str(_tune_yaml(tmp_path, data_dir))]) == 0
    assert "test" not in loaded and "valid" in loaded  # test rows are never read
    res = _results(tmp_path)
    assert res["trials_per_method"] == 2
    for name, r in res["methods"].items():
        assert r["n_trials"] == 2 and len(r["trials"]) == 2
        values = [t["value"] for t in r["trials"]]
        assert r["best_value"] == max(values)
        trial_res = json.loads((Path(r["best_run_dir"]) / "results.json").read_text())
        assert set(trial_res["metrics"]) == {"valid"}  # scored on validation only
        assert trial_res["metrics"]["valid"]["auc"] == pytest.approx(r["best_value"])
        best = load_train_config(tmp_path / "out" / name / "best.yaml")  # ready for `metactr train`
        assert best.data.test_split == "test" and best.data.valid_split == "valid"
        assert best.optim.lr == pytest.approx(r["best_params"]["optim.lr"])
    b = res["methods"]["basic"]["best_params"]
    assert 1e-3 <= b["optim.lr"] <= 1e-1 and b["model.params.embed_dim"] in (4, 8)
    assert b["model.params.hidden"] in ([8], [16, 8])  # non-scalar choices come back decoded
    assert 64 <= res["methods"]["lr"]["best_params"]["batch_size"] <= 256
    best = load_train_config(tmp_path / "out" / "basic" / "best.yaml")
    assert best.model.params["hidden"] == b["model.params.hidden"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| basic | 2 |" in md and "| lr | 2 |" in md
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"]["n_trials"] == 2


def test_seeded_and_resumable(tmp_path, data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert main(["tune", str(_tune_yaml(a, data_dir, trials=2))]) == 0
    assert main(["tune", str(_tune_yaml(b, data_dir, trials=1))]) == 0  # interrupted after one trial ...
    first = _results(b)["methods"]["lr"]["trials"][0]
    assert main(["tune", str(_tune_yaml(b, data_dir, trials=2))]) == 0  # ... and continued to the budget
    ra, rb = _results(a)["methods"]["lr"], _results(b)["methods"]["lr"]
    assert ra["trials"][0]["params"] == first["params"] and ra["trials"][0]["value"] == first["value"]  # seeded
    assert rb["n_trials"] == 2 and rb["trials"][0] == first
    assert rb["trials"][1]["params"] != first["params"]  # the resumed sampler does not replay its draws
    assert main(["tune", str(_tune_yaml(b, data_dir, trials=2))]) == 0  # budget reached: nothing to do
    assert _results(b)["methods"]["lr"]["n_trials"] == 2
    # another metric on the same study is refused
    assert main(["tune", str(_tune_yaml(b, data_dir, trials=3)), "--set", "metric=valid_logloss"]) == 2


def _bad(tmp: Path, data_dir: Path, case: str) -> Path:
    p = _tune_yaml(tmp, data_dir)
    cfg = yaml.safe_load(p.read_text())
    m = cfg["methods"]["lr"]
    if case == "missing_config":
        m["config"] = str(tmp / "nope.yaml")
    elif case == "unknown_key":
        m["space"] = {"optim.nonesuch": {"uniform": [0, 1]}}
    elif case == "unknown_model_param":
        m["space"] = {"model.params.nonesuch": {"choice": [1, 2]}}
    elif case == "empty_space":
        m["space"] = {}
    elif case == "zero_trials":
        cfg["trials"] = 0
    elif case == "two_kinds":
        m["space"] = {"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}}
    elif case == "low_above_high":
        m["space"] = {"optim.lr": {"log_uniform": [0.1, 0.01]}}
    elif case == "no_valid_split":
        m["config"] = str(_train_yaml(tmp / "nv.yaml", data_dir, "lr", valid_split=None))
    elif case == "valid_is_test":
        m["config"] = str(_train_yaml(tmp / "vt.yaml", data_dir, "lr", valid_split="test"))
    elif case == "valid_split_absent":
        m["config"] = str(_train_yaml(tmp / "va.yaml", data_dir, "lr", valid_split="wc_finetune_a"))
    elif case == "unknown_tune_key":
        cfg["budget"] = 3
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("case", ["missing_config", "unknown_key", "unknown_model_param", "empty_space",
                                  "zero_trials", "two_kinds", "low_above_high", "no_valid_split", "valid_is_test",
                                  "valid_split_absent", "unknown_tune_key"])
def test_bad_input_one_line_exit_2(tmp_path, data_dir, capsys, case):
    p = _bad(tmp_path, data_dir, case)
    capsys.readouterr()
    assert main(["tune", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from metactr.train.tune_commands import _bar

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert _bar(True) is not None and _bar(False) is None
    monkeypatch.setenv("CI", "true")
    assert _bar(True) is None
