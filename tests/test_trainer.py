"""The trainer: run-dir layout, determinism, resume == uninterrupted, early stopping, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError, DataError
from metactr.eval.predict import predict_proba
from metactr.models.base import build_model
from metactr.train import checkpoint as ckpt
from metactr.train.config import TrainConfig, load_train_config
from metactr.utils import expand_path
from metactr.train.run import fit, run_training


def make_prepared(root: Path, *, n_users: int = 30, n_items: int = 40, rows: dict[str, int] | None = None,
                  seed: int = 0, flip: tuple[str, ...] = ()) -> Path:
    """A tiny prepared dataset in the ml-1m-rml layout with a learnable signal.

    Items have a hidden 'quality'; a user clicks when quality + user bias + noise > 0. Splits in
    ``flip`` get inverted labels (a validation set the model can only get worse on).
    """
    rows = rows or {"train": 400, "valid": 120, "test": 120}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    quality = rng.normal(size=n_items + 1) * 2
    bias = rng.normal(size=n_users + 1) * 0.5
    pl.DataFrame({"user_id": np.arange(1, n_users + 1, dtype=np.int64),
                  "gender": rng.integers(1, 3, n_users)}).write_parquet(root / "users.parquet")
    pl.DataFrame({"item_id": np.arange(1, n_items + 1, dtype=np.int64),
                  "genres": [list(rng.integers(1, 6, rng.integers(1, 3))) for _ in range(n_items)]}
                 ).write_parquet(root / "items.parquet")
    for name, n in rows.items():
        users = rng.integers(1, n_users + 1, n)
        target = rng.integers(1, n_items + 1, n)
        label = (quality[target] + bias[users] + rng.normal(size=n) * 0.5 > 0).astype(np.int64)
        if name in flip:
            label = 1 - label
        hist = [list(rng.integers(1, n_items + 1, rng.integers(0, 5))) for _ in range(n)]  # empty sessions too
        pl.DataFrame({"user_id": users, "hist_item_ids": hist,
                      "hist_labels": [[int(quality[i] > 0) for i in h] for h in hist],
                      "target_item_id": target, "label": label},
                     schema_overrides={"hist_item_ids": pl.List(pl.Int64), "hist_labels": pl.List(pl.Int64)}
                     ).write_parquet(root / f"{name}.parquet")
    return root


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = {"data": {"prepared": str(data_dir)}, "model": {"name": "basic", "params": {"hidden": [16]}},
            "optim": {"name": "adam", "lr": 0.01}, "epochs": 3, "batch_size": 64, "seed": 1,
            "out": str(out), "progress": False, "tensorboard": False,
            "early_stopping": {"patience": None}}
    for k, v in kw.items():
        node = base
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return TrainConfig.model_validate(base)


def _train(cfg: TrainConfig, resume: bool = False) -> tuple[dict, torch.nn.Module]:
    ds = PreparedDataset(cfg.data.prepared)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, ds.spec, **cfg.model.params)
    res = fit(model, ds, cfg, resume=resume, log=lambda s: None)
    return res, model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prep") / "tiny")


def test_fit_writes_the_run_directory(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", lr_decay=0.5)
    res, _ = _train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "best.safetensors", "best.json", "results.json", "results.md",
                 "checkpoints/epoch_001.safetensors", "checkpoints/epoch_003.json"):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert [r["lr"] for r in lines] == pytest.approx([0.01, 0.005, 0.0025])  # exponential decay per epoch
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["metrics"]["test"]["auc"] == pytest.approx(res["metrics"]["test"]["auc"])
    assert res["metrics"]["test"]["auc"] > 0.7  # the signal is learnable
    assert load_train_config(run / "config.yaml") == cfg  # the resolved config reloads as-is


def test_same_seed_same_weights_and_resume_equals_uninterrupted(data_dir, tmp_path):
    # dropout makes the torch RNG matter; shuffling uses the data generator: both must be restored
    kw = {"model__params": {"hidden": [16], "dropout": 0.3}}
    _, full = _train(config(data_dir, tmp_path / "full", epochs=3, **kw))
    _, again = _train(config(data_dir, tmp_path / "again", epochs=3, **kw))
    _train(config(data_dir, tmp_path / "cut", epochs=1, **kw))
    res, resumed = _train(config(data_dir, tmp_path / "cut", epochs=3, **kw), resume=True)
    for (name, a), b, c in zip(full.state_dict().items(), again.state_dict().values(),
                               resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: not deterministic"
        assert torch.equal(a, c), f"{name}: resumed run differs"
    hist = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in hist] == [1, 2, 3]
    assert res["epochs_run"] == 3


def test_save_load_gives_identical_predictions(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", epochs=1, model__name="basic")
    _, model = _train(cfg)
    ds = PreparedDataset(data_dir)
    loaded, meta = ckpt.load_model(tmp_path / "run" / "checkpoints" / "epoch_001.safetensors")
    assert meta["model"] == "basic" and meta["hparams"] == {"hidden": [16]}
    np.testing.assert_array_equal(predict_proba(model, ds, "test"), predict_proba(loaded, ds, "test"))


@pytest.mark.parametrize("model_name", ["basic", "deepfm"])
def test_bf16_precision_trains_in_fp32_state_and_evaluates_as_trained(data_dir, tmp_path, model_name):
    params = {"hidden": [16]}
    fp32, m32 = _train(config(data_dir, tmp_path / "fp32", epochs=2, model__name=model_name, model__params=params,
                              precision="fp32"))  # explicit: the default, auto, is bf16 on AVX512_BF16 hosts
    bf16, m16 = _train(config(data_dir, tmp_path / "bf16", epochs=2, model__name=model_name, model__params=params,
                              precision="bf16"))
    # the weights, their gradients' accumulation and the optimizer stay float32; only matmuls round
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(m32.parameters(), m16.parameters(), strict=True))
    assert bf16["metrics"]["test"]["auc"] == pytest.approx(fp32["metrics"]["test"]["auc"], abs=0.03)
    assert bf16["metrics"]["test"]["auc"] > 0.7
    ds = PreparedDataset(data_dir)
    p16 = predict_proba(m16, ds, "test", precision="bf16")
    assert p16.dtype == np.float32 and np.isfinite(p16).all()
    assert not np.array_equal(p16, predict_proba(m16, ds, "test"))  # bf16 inference really rounds
    meta = json.loads((tmp_path / "bf16" / "best.json").read_text())
    assert meta["precision"] == "bf16"  # `metactr evaluate` predicts as training did
    with pytest.raises(ValueError, match="precision"):
        predict_proba(m16, ds, "test", precision="int8")


def test_early_stopping_stops_on_a_worsening_validation_auc(tmp_path):
    data = make_prepared(tmp_path / "flip", flip=("valid",))
    cfg = config(data, tmp_path / "run", epochs=8, early_stopping={"patience": 1}, optim__lr=0.05)
    res, _ = _train(cfg)
    assert res["stopped_early"] and res["epochs_run"] < 8
    assert res["best_epoch"] == res["epochs_run"] - 1
    # results come from the best epoch's weights, not the last
    best = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[res["best_epoch"] - 1])
    assert res["metrics"]["valid"]["auc"] == pytest.approx(best["valid_auc"])


def test_gradient_clipping_bounds_each_step(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", epochs=1, optim={"name": "sgd", "lr": 1.0}, grad_clip=1e-6,
                 data__valid_split=None)
    ds = PreparedDataset(data_dir)
    torch.manual_seed(1)
    model = build_model("basic", ds.spec, hidden=[16])
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    fit(model, ds, cfg, log=lambda s: None)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    steps = -(-400 // 64)
    assert 0 < float((after - before).norm()) <= steps * 1e-6 * (1 + 1e-4)


@pytest.mark.parametrize("name", ["ftrl", "adagrad"])
def test_other_optimizers_train_and_resume(data_dir, tmp_path, name):
    kw = {"optim": {"name": name, "lr": 0.05}, "model__name": "lr", "model__params": {}}
    _, full = _train(config(data_dir, tmp_path / "full", epochs=2, **kw))
    _train(config(data_dir, tmp_path / "cut", epochs=1, **kw))
    res, resumed = _train(config(data_dir, tmp_path / "cut", epochs=2, **kw), resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert res["metrics"]["test"]["auc"] > 0.6


def test_resume_and_overwrite_guards(data_dir, tmp_path):
    with pytest.raises(DataError, match="nothing to resume"):
        _train(config(data_dir, tmp_path / "run", epochs=1), resume=True)
    _train(config(data_dir, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="--resume"):
        _train(config(data_dir, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "checkpoints" / "epoch_001.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        _train(config(data_dir, tmp_path / "run", epochs=2), resume=True)


def test_corrupt_weights_are_a_data_error(data_dir, tmp_path):
    _train(config(data_dir, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "best.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="safetensors"):
        ckpt.load_model(tmp_path / "run" / "best.safetensors")


def test_missing_validation_split_is_reported(data_dir, tmp_path):
    with pytest.raises(DataError, match="validation split 'dev'"):
        _train(config(data_dir, tmp_path / "run", data__valid_split="dev"))


def test_config_validation(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="exactly one"):
        TrainConfig.model_validate({"data": {}})
    p = tmp_path / "c.yaml"
    p.write_text("data: {prepared: x}\noptim: {name: rmsprop}\n")
    with pytest.raises(ConfigError, match="optim.name"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="lr_decay"):
        load_train_config(p, ["optim.name=adam", "lr_decay=1.5"])
    with pytest.raises(ConfigError, match="device"):
        load_train_config(p, ["optim.name=adam", "device=tpu"])
    with pytest.raises(ConfigError, match="precision"):
        load_train_config(p, ["optim.name=adam", "precision=fp16"])
    monkeypatch.setenv("METACTR_DATA", str(tmp_path / "d"))
    assert expand_path("${METACTR_DATA}/ml-100k") == tmp_path / "d" / "ml-100k"
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_VAR_X"):
        expand_path("$NO_SUCH_VAR_X/a")


def test_run_training_sets_up_everything(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", epochs=1, threads=1)
    res = run_training(cfg, log=lambda s: None)
    assert res["epochs_run"] == 1 and (tmp_path / "run" / "results.md").is_file()


# --------------------------------------------------------------------------- every strategy in the Trainer
SMALL_RML = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4]}
TASKS = {"tasks_per_batch": 8, "support_size": 4, "query_size": 3}
STRATEGIES = {  # name -> (model, params, strategy block)
    "two_phase": ("rml", SMALL_RML, {"name": "two_phase"}),
    "maml": ("rml", {**SMALL_RML, "dropout": 0.0}, {"name": "maml", "adapt_groups": ["meta"], **TASKS}),
    "metasgd": ("rml", {**SMALL_RML, "dropout": 0.0}, {"name": "metasgd", "adapt_groups": ["meta"], **TASKS}),
    "reptile": ("rml", {**SMALL_RML, "dropout": 0.0}, {"name": "reptile", "adapt_groups": ["meta"], **TASKS}),
    "melu": ("melu", {"embed_dim": 4, "hidden": [8]}, {"name": "melu", **TASKS}),
    "meta_embedding": ("meta_embedding", {"embed_dim": 4, "hidden": [8]}, {"name": "meta_embedding", **TASKS}),
    "session_maml": ("rml", {**SMALL_RML, "dropout": 0.0}, {"name": "session_maml", "metasgd": True,
                                                            "history_size": 3}),
}


def strategy_cfg(data_dir: Path, out: Path, name: str, **kw) -> TrainConfig:
    model, params, strat = STRATEGIES[name]
    return TrainConfig.model_validate({
        "data": {"prepared": str(data_dir)}, "model": {"name": model, "params": params}, "strategy": strat,
        "epochs": 2, "batch_size": 32, "seed": 1, "out": str(out), "progress": False, "tensorboard": False,
        "early_stopping": {"patience": None}, **kw})


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_trains_checkpoints_and_resumes_bit_identically(data_dir, tmp_path, name):
    """A crash after the first epoch (the later checkpoints lost), then --resume: the same weights
    as the uninterrupted run; the run directory is the same as for any model."""
    import shutil

    res, full = _train(strategy_cfg(data_dir, tmp_path / "full", name))
    run = tmp_path / "full"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    n_epochs = 4 if name == "meta_embedding" else 2  # pre-training, then the generator
    assert [r["epoch"] for r in lines] == list(range(1, n_epochs + 1))
    assert json.loads((run / "best.json").read_text())["strategy"] == name
    # the quality signal is learnt: two_phase, maml, metasgd, meta_embedding and session_maml reach
    # test AUC 0.91-0.94 here; two epochs of MeLU (0.60) and of Reptile's small outer steps (0.46) do not
    if name not in ("melu", "reptile"):
        assert res["metrics"]["test"]["auc"] > 0.85, res["metrics"]
    shutil.copytree(run, tmp_path / "cut")
    for f in (tmp_path / "cut" / "checkpoints").glob("epoch_*"):
        if int(f.stem.split("_")[1]) > 1:
            f.unlink()
    _, resumed = _train(strategy_cfg(data_dir, tmp_path / "cut", name), resume=True)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{n}: resumed run differs"
    assert [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == \
        [r["epoch"] for r in lines]


def test_a_strategy_config_rejects_the_plain_trainers_keys_and_bad_settings(data_dir, tmp_path):
    with pytest.raises(ValueError, match="optim"):
        strategy_cfg(data_dir, tmp_path, "maml", optim={"name": "sgd", "lr": 0.1})
    with pytest.raises(ValueError, match="precision"):
        strategy_cfg(data_dir, tmp_path, "maml", precision="bf16")
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"data": {"prepared": str(data_dir)}, "strategy": {"name": "mystery"}})
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"data": {"prepared": str(data_dir)},
                                    "strategy": {"name": "maml", "inner_steps": 0}})


# --------------------------------------------------------------------------- an honest resume
def test_resume_with_changed_settings_is_an_error_unless_overridden_then_applied_and_recorded(data_dir, tmp_path):
    run = tmp_path / "run"
    _train(config(data_dir, run, epochs=1, lr_decay=0.5))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"batch_size \(64 -> 32\), optim\.lr \(0\.01 -> 0\.1\)") as e:
        _train(config(data_dir, run, epochs=2, lr_decay=0.5, optim={"name": "adam", "lr": 0.1}, batch_size=32),
               resume=True)
    assert "--resume-override" in str(e.value) and str(run / "config.yaml") in str(e.value)
    assert (run / "config.yaml").read_text() == saved  # nothing written
    with pytest.raises(ConfigError, match="seed cannot change"):
        cfg = config(data_dir, run, epochs=2, lr_decay=0.5, seed=7)
        ds = PreparedDataset(data_dir)
        fit(build_model("basic", ds.spec, hidden=[16]), ds, cfg, resume=True, resume_override=True, log=lambda s: None)
    # epochs, progress, threads, device may change without --resume-override
    cfg = config(data_dir, run, epochs=2, lr_decay=0.5, optim={"name": "adam", "lr": 0.1}, threads=1)
    ds = PreparedDataset(data_dir)
    torch.manual_seed(cfg.seed)
    fit(build_model("basic", ds.spec, hidden=[16]), ds, cfg, resume=True, resume_override=True, log=lambda s: None)
    assert load_train_config(run / "config.yaml").optim.lr == 0.1  # recorded as trained
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["lr"] == 0.01 and "resumed_with_changes" not in lines[0]
    assert lines[1]["lr"] == pytest.approx(0.1 * 0.5)  # the new rate, at the schedule's position (epoch 1)
    assert lines[1]["resumed_with_changes"] == {"optim.lr": {"from": 0.01, "to": 0.1}}


def test_resume_removes_stale_temporaries_of_its_own_only(data_dir, tmp_path):
    run = tmp_path / "run"
    _train(config(data_dir, run, epochs=1))
    stale = [run / ".best.json.a1b2c3d4.tmp", run / "checkpoints" / ".epoch_002.safetensors.zz_90xyq.tmp"]
    for p in stale:
        p.write_text("half-written")
    (run / "checkpoints" / ".epoch_002.old").mkdir()
    keep = [run / "notes.tmp", run / ".hidden.tmp", run / "mine.json.a1b2c3d4.tmp"]
    for p in keep:
        p.write_text("the user's")
    _train(config(data_dir, run, epochs=2), resume=True)
    assert not any(p.exists() for p in stale) and not (run / "checkpoints" / ".epoch_002.old").exists()
    assert all(p.read_text() == "the user's" for p in keep)


def test_a_torn_best_pair_is_detected_and_repaired_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    _train(config(data_dir, run, epochs=2, data__valid_split=None))  # best = last epoch (2)
    # a kill between the two renames of best: epoch 2's weights renamed in, epoch 1's JSON still there
    good_json = (run / "best.json").read_text()
    (run / "checkpoints" / "epoch_001.safetensors").replace(run / "best.safetensors")
    with pytest.raises(DataError, match="SHA-256"):
        ckpt.load_model(run / "best.safetensors")
    (run / "checkpoints" / "epoch_001.json").unlink()  # (the copy came from here)
    _train(config(data_dir, run, epochs=3, data__valid_split=None), resume=True)
    model, meta = ckpt.load_model(run / "best.safetensors")  # verified again: rewritten at epoch 3
    assert meta["epoch"] == 3 and json.loads(good_json)["epoch"] == 2
    # and when the run is complete, resume only repairs: rewrites best from epoch 3's checkpoint
    (run / "best.safetensors").write_bytes((run / "checkpoints" / "epoch_002.safetensors").read_bytes())
    assert not ckpt.is_complete(run / "best")
    _train(config(data_dir, run, epochs=3, data__valid_split=None), resume=True)
    assert ckpt.is_complete(run / "best") and ckpt.read_meta(run / "best")["epoch"] == 3


class Killed(Exception):
    pass


def _kill_after(monkeypatch, phase_cls, n: int) -> None:
    """Make the ``n``-th training step of ``phase_cls`` raise, as a kill would stop the process."""
    real, calls = phase_cls.step, {"n": 0}

    def step(self, item):
        calls["n"] += 1
        if calls["n"] > n:
            raise Killed
        return real(self, item)

    monkeypatch.setattr(phase_cls, "step", step)


@pytest.mark.parametrize("name", ["plain", "two_phase"])
def test_mid_epoch_checkpoints_resume_bit_identically(data_dir, tmp_path, monkeypatch, name):
    from metactr.strategies.plain import _RowPhase
    from metactr.strategies.two_phase import _TwoPhaseStep

    if name == "plain":  # dropout: the torch RNG matters; 400 rows / 64 = 7 steps per epoch
        make = lambda out: config(data_dir, out, epochs=2, checkpoint_every_steps=3,  # noqa: E731
                                  model__params={"hidden": [16], "dropout": 0.3})
        phase_cls = _RowPhase
    else:  # 400 rows / 32 = 13 steps per epoch
        make = lambda out: strategy_cfg(data_dir, out, name, checkpoint_every_steps=5)  # noqa: E731
        phase_cls = _TwoPhaseStep
    _, full = _train(make(tmp_path / "full"))
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("*.json"))
    assert names == ["epoch_001.json", "epoch_002.json"]  # mid-epoch ones are dropped when the epoch ends
    per = 7 if name == "plain" else 13
    kill_at = per + (4 if name == "plain" else 11)  # into epoch 2, after its checkpoint at 3 (resp. 5, 10)
    with monkeypatch.context() as m:
        _kill_after(m, phase_cls, kill_at)
        with pytest.raises(Killed):
            _train(make(tmp_path / "cut"))
    left = ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert left.name == ("epoch_001_step_000003" if name == "plain" else "epoch_001_step_000010")
    assert len(list((tmp_path / "cut" / "checkpoints").glob("*_step_*.json"))) == 1  # the newest only
    _, resumed = _train(make(tmp_path / "cut"), resume=True)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{n}: resumed run differs"
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "full"), read(tmp_path / "cut")
    assert [(r["epoch"], r["lr"], r["train_loss"]) for r in a] == [(r["epoch"], r["lr"], r["train_loss"]) for r in b]
