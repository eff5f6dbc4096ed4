"""``metactr models / train / evaluate`` through the real CLI entry point."""

from __future__ import annotations

import json
import math

from pathlib import Path

import pytest
import torch
import yaml

from metactr.cli import main
from metactr.data.prepared import PreparedDataset
from metactr.models.base import build_model, objective
from metactr.train.config import load_train_config
from test_trainer import make_prepared


MODEL_NAMES = ("lr", "fm", "ffm", "deepfm", "wide_deep", "basic", "din", "dien", "gru4rec", "lstm4rec", "mimn")


def _strict_json(text: str):
    def no_nan(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=no_nan)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("cli") / "tiny")


def _write_cfg(path, data_dir, out, **extra):
    cfg = {"data": {"prepared": str(data_dir)}, "model": {"name": "basic", "params": {"hidden": [8]}},
           "epochs": 2, "batch_size": 64, "progress": False, "tensorboard": False, "out": str(out), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("basic", "lr", "deepfm", "din"):
        assert name in out


def test_train_resume_and_evaluate(data_dir, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    assert main(["train", str(cfg), "--set", "epochs=1"]) == 0
    assert main(["train", str(cfg), "--resume"]) == 0  # continues to epochs=2
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    assert results["epochs_run"] == 2
    capsys.readouterr()
    out_file = tmp_path / "eval" / "test.json"
    rc = main(["evaluate", str(tmp_path / "run" / "best.safetensors"), "--data", str(data_dir),
               "--split", "test", "--out", str(out_file)])
    assert rc == 0
    printed = _strict_json(capsys.readouterr().out)
    written = _strict_json(out_file.read_text())
    assert printed == written
    assert written["split"] == "test" and written["n"] == 120 and 0.5 < written["auc"] <= 1.0
    assert written["auc"] == pytest.approx(results["metrics"]["test"]["auc"])
    assert not math.isnan(written["logloss"])


@pytest.mark.parametrize("override,needle", [("optim.lr=-1", "optim.lr"), ("nope=1", "nope"),
                                             ("model.name=no_such_model", "no_such_model"),
                                             ("epochs=0", "epochs")])
def test_config_errors_exit_2_with_one_line(data_dir, tmp_path, capsys, override, needle):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    assert main(["train", str(cfg), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_config_and_bad_data_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg = _write_cfg(tmp_path / "c.yaml", tmp_path / "no_data", tmp_path / "run")
    assert main(["train", str(cfg)]) == 2
    assert "no_data" in capsys.readouterr().err


def test_evaluate_errors(data_dir, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1)
    assert main(["train", str(cfg)]) == 0
    best = str(tmp_path / "run" / "best.safetensors")
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data_dir), "--split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    other = make_prepared(tmp_path / "bigger", n_items=80)  # ids beyond the model's vocabulary
    assert main(["evaluate", best, "--data", str(other), "--split", "test"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing.safetensors"), "--data", str(data_dir), "--split", "test"]) == 2
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data_dir), "--split", "test", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--precision" in err and "fp16" in err and "\n" not in err
    assert not list((tmp_path).glob("*.tmp"))


def test_bf16_run_evaluates_in_bf16_unless_told_otherwise(data_dir, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1)
    assert main(["train", str(cfg), "--set", "precision=bf16"]) == 0
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    best = str(tmp_path / "run" / "best.safetensors")
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data_dir), "--split", "test"]) == 0
    as_trained = _strict_json(capsys.readouterr().out)
    assert as_trained["precision"] == "bf16"
    assert as_trained["auc"] == pytest.approx(results["metrics"]["test"]["auc"], abs=1e-12)
    assert main(["evaluate", best, "--data", str(data_dir), "--split", "test", "--precision", "fp32"]) == 0
    full = _strict_json(capsys.readouterr().out)
    assert full["precision"] == "fp32" and full["logloss"] != as_trained["logloss"]


def test_undefined_metrics_are_null_not_nan(tmp_path, capsys):
    data = make_prepared(tmp_path / "one", rows={"train": 200, "valid": 60, "test": 1})
    cfg = _write_cfg(tmp_path / "c.yaml", data, tmp_path / "run", epochs=1)
    assert main(["train", str(cfg)]) == 0
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["test"]["auc"] is None and results["metrics"]["test"]["n"] == 1
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "best.json"), "--data", str(data), "--split", "test"]) == 0
    assert _strict_json(capsys.readouterr().out)["auc"] is None


CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*_ml*.yaml")
                 if p.stem.split("_ml")[0] in MODEL_NAMES)


def test_every_model_has_shipped_configs():
    names = {p.stem.rsplit("_", 1)[0] for p in CONFIGS}
    assert names == set(MODEL_NAMES)
    assert {p.stem.rsplit("_", 1)[1] for p in CONFIGS} == {"ml1m", "ml100k"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_builds_its_model(path, data_dir):
    cfg = load_train_config(path)
    assert cfg.data.protocol == "random" and cfg.data.prepare["label"]["threshold"] == 4
    ds = PreparedDataset(data_dir)
    model = build_model(cfg.model.name, ds.spec, **cfg.model.params)
    loss, _ = objective(model, None, ds.batch(ds.split("train"), torch.arange(8)))
    assert torch.isfinite(loss)


def test_train_from_raw_files(real_data, tmp_path, capsys):
    raw = real_data("ml-100k")
    cfg = Path(__file__).resolve().parent.parent / "configs" / "lr_ml100k.yaml"
    rc = main(["train", str(cfg), "--set", f"data.raw_dir={raw}", "--set", f"data.out={tmp_path / 'prep'}",
               "--set", f"out={tmp_path / 'run'}", "--set", "epochs=1", "--set", "progress=false",
               "--set", "batch_size=4096", "--set", "threads=1"])
    assert rc == 0, capsys.readouterr().err
    results = _strict_json((tmp_path / "run" / "results.json").read_text())
    assert set(results["metrics"]) == {"valid", "test"} and results["metrics"]["test"]["auc"] > 0.65
    assert (tmp_path / "prep" / "train.parquet").is_file()


def test_models_says_which_models_read_the_session(capsys):
    from metactr.models.base import registry

    assert main(["models"]) == 0
    models = registry()
    assert models["din"].session_use() == "always" and models["popularity"].session_use() == "no"
    assert models["lr"].session_use() == "optional (use_history, default on)"
    assert models["meta_embedding"].session_use().startswith("as its base (default basic: optional")
    assert {m.session_use() for m in models.values()} >= {"always", "no", "optional (use_history, default on)"}


def test_train_resume_override_from_the_command_line(data_dir, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run", epochs=1)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "--set", "epochs=2", "--set", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "optim.lr (0.001 -> 0.1)" in err
    assert main(["train", str(cfg), "--resume-override", "--set", "epochs=2", "--set", "optim.lr=0.1"]) == 0
    assert load_train_config(tmp_path / "run" / "config.yaml").optim.lr == 0.1
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == 0.1 and last["resumed_with_changes"]["optim.lr"] == {"from": 0.001, "to": 0.1}


def test_quiet_prints_no_epoch_lines_but_records_every_epoch(data_dir, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    assert main(["train", str(cfg), "--set", "epochs=2", "--quiet"]) == 0
    assert "epoch 1" not in capsys.readouterr().err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", str(cfg), "--set", "epochs=2", "--set", f"out={tmp_path / 'loud'}"]) == 0
    assert "epoch 1" in capsys.readouterr().err
