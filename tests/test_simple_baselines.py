"""The simple baselines ``popularity`` and ``rates_lr`` (models/rates.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch.func import functional_call, vmap

from metactr.cli import main
from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError, DataError
from metactr.eval.metrics import auc
from metactr.models.base import build_model, objective, registry
from test_trainer import make_prepared

SPEC = FeatureSpec(user=(Field("user_id", 50), Field("gender", 3)),
                   item=(Field("item_id", 40), Field("genres", 6, 2)), max_hist_len=6)


def _rows(rng, n, quality, n_users=50):
    u = rng.integers(1, n_users, n)
    i = rng.integers(1, len(quality), n)
    y = (rng.random(n) < quality[i]).astype(np.float32)
    return u, i, y


def _batch(u, i, y, L=6, hist_lab=None, lens=None) -> Batch:
    B = len(u)
    lens = torch.zeros(B, dtype=torch.long) if lens is None else torch.as_tensor(lens)
    mask = torch.arange(L) < lens[:, None]
    hl = torch.zeros(B, L) if hist_lab is None else torch.as_tensor(hist_lab, dtype=torch.float32)
    item = torch.stack([torch.as_tensor(i), torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)], -1)
    return Batch(user=torch.stack([torch.as_tensor(u), torch.ones(B, dtype=torch.long)], -1), item=item,
                 context=torch.zeros(B, 0, dtype=torch.long), hist=item[:, None, :].expand(B, L, 3) * mask[..., None],
                 hist_mask=mask, hist_label=hl * mask, label=torch.as_tensor(y, dtype=torch.float32),
                 user_id=torch.as_tensor(u))


def test_registered():
    assert {"popularity", "rates_lr"} <= set(registry())


def test_popularity_beats_a_constant_when_clicks_follow_the_item():
    rng = np.random.default_rng(0)
    quality = rng.uniform(0.05, 0.95, 40)
    model = build_model("popularity", SPEC)
    model.set_counts(*_rows(rng, 4000, quality))
    model.eval()
    u, i, y = _rows(rng, 1000, quality)
    p = torch.sigmoid(model(_batch(u, i, y)).logit).detach().numpy()
    assert auc(y, p) > 0.5 + 0.2  # a constant scores 0.5
    untrained = build_model("popularity", SPEC).eval()  # no counts: every item has the prior
    assert torch.sigmoid(untrained(_batch(u, i, y)).logit).unique().numel() == 1


def test_leave_one_out_in_training_and_smoothing():
    model = build_model("popularity", SPEC, prior_strength=4.0)
    # item 3: one click in one view; item 5: 0 clicks in 3 views; global rate 1/4
    model.set_counts([1, 2, 2, 2], [3, 5, 5, 5], [1, 0, 0, 0])
    b = _batch([1, 2], [3, 5], [1, 0])
    model.eval()
    r = model.item_rate(b)
    assert torch.allclose(r, torch.tensor([(1 + 4 * 0.25) / (1 + 4), (0 + 4 * 0.25) / (3 + 4)]))
    model.train()  # the row is one of the counted ones: its own label is taken out
    assert torch.allclose(model.item_rate(b), torch.tensor([0.25, (0 + 1.0) / (2 + 4)]))
    assert torch.allclose(model.user_rate(b), torch.tensor([0.25, 1.0 / (2 + 4)]))


def test_session_and_recent_label_means():
    model = build_model("rates_lr", SPEC, recent=2, session_prior=1.0)
    model.set_counts([1, 2], [3, 4], [1, 0])  # global rate 0.5
    hl = [[1, 1, 0, 0, 9, 9], [1, 0, 1, 1, 1, 1], [0] * 6]  # padded positions hold garbage (masked)
    b = _batch([1, 2, 3], [3, 4, 5], [1, 0, 1], hist_lab=hl, lens=[4, 6, 0])
    whole, recent = model.session_rates(b)
    assert torch.allclose(whole, torch.tensor([(2 + 0.5) / 5, (5 + 0.5) / 7, 0.5]))
    assert torch.allclose(recent, torch.tensor([(0 + 0.5) / 3, (2 + 0.5) / 3, 0.5]))


@pytest.mark.parametrize("name", ["popularity", "rates_lr"])
def test_pure_function_of_parameters_and_batch(name):
    rng = np.random.default_rng(1)
    quality = rng.uniform(0.05, 0.95, 40)
    model = build_model(name, SPEC)
    model.set_counts(*_rows(rng, 500, quality))
    u, i, y = _rows(rng, 12, quality)
    b = _batch(u, i, y, hist_lab=(rng.random((12, 6)) < 0.5), lens=rng.integers(0, 7, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.detach() * 1.5 for k, v in model.named_parameters()}
    out = functional_call(model, params, (b,))
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.mul_(1.5)
    assert torch.allclose(out.logit, model(b).logit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k not in params)
    # vmap over 3 tasks of 4 rows equals a loop
    tasks = Batch(*(t.reshape(3, 4, *t.shape[1:]) for t in b))
    got = vmap(lambda t: model(t).logit)(tasks)
    want = torch.stack([model(Batch(*(x[k] for x in tasks))).logit for k in range(3)])
    assert torch.allclose(got, want)
    loss, _ = objective(model, None, b)
    loss.backward()
    assert set(n for n, p in model.named_parameters() if p.grad is not None) == {"weight", "bias"}
    assert set(model.param_groups()) == {"mlp"}


def test_refit_counts_with_finetune_rows(tmp_path):
    data = make_prepared(tmp_path / "d", rows={"train": 300, "finetune_a": 80, "test": 60})
    ds = PreparedDataset(data)
    model = build_model("rates_lr", ds.spec).use_stats(ds, ["train"])
    views = model.item_views.sum().item()
    model.use_stats(ds, ["train", "finetune_a"])
    assert model.item_views.sum().item() == views + 80
    assert model.user_views.sum().item() == views + 80
    with pytest.raises(DataError, match="nope"):
        model.use_stats(ds, ["nope"])


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match="features"):
        build_model("rates_lr", SPEC, features=["item", "colour"])
    with pytest.raises(ConfigError, match="prior_strength"):
        build_model("popularity", SPEC, prior_strength=0)
    with pytest.raises(DataError, match="vocabulary"):
        build_model("popularity", SPEC).set_counts([1], [99], [1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("rates") / "tiny", rows={"train": 800, "valid": 200, "test": 200})


def _cfg(path, data_dir, out, name="rates_lr", **params):
    cfg = {"data": {"prepared": str(data_dir)},
           "model": {"name": name, "params": {"stats_from": str(data_dir), "stats_splits": ["train"], **params}},
           "optim": {"name": "adam", "lr": 0.05}, "epochs": 3, "batch_size": 128, "progress": False,
           "tensorboard": False, "out": str(out)}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rates_lr_trains_with_metactr_train_and_evaluates_from_its_checkpoint(data_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    assert main(["train", str(cfg)]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["metrics"]["test"]["auc"] > 0.75  # clicks follow item quality: the item rate sees it
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "best.safetensors"), "--data", str(data_dir),
                 "--split", "test"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["auc"] == pytest.approx(res["metrics"]["test"]["auc"], abs=1e-9)  # the counts travel with it
    # untrained popularity with the same counts is already far above a constant
    pop = build_model("popularity", PreparedDataset(data_dir).spec, stats_from=str(data_dir)).eval()
    ds = PreparedDataset(data_dir)
    p = torch.sigmoid(pop(ds.batch(ds.split("test"))).logit).detach().numpy()
    assert auc(ds.split("test").label.numpy(), p) > 0.7


def test_bad_stats_source_exits_2_in_one_line(data_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run", stats_splits=["no_such_split"])
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_split" in err and "\n" not in err
    cfg = _cfg(tmp_path / "c.yaml", data_dir, tmp_path / "run2", stats_from=str(tmp_path / "absent"))
    assert main(["train", str(cfg)]) == 2
    assert "absent" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["rates_lr", "popularity", "din"])
def test_bench_configs_parse_and_build(name, data_dir):
    from pathlib import Path

    from metactr.train.config import load_train_config

    path = Path(__file__).resolve().parent.parent / "configs" / "bench" / f"{name}_ml1m_future.yaml"
    over = [f"model.params.stats_from={data_dir}", "model.params.stats_splits=[train]"] if name != "din" else []
    cfg = load_train_config(path, over)
    assert cfg.data.protocol == "rml" and cfg.data.prepare["rml"]["holdout"] == "future"
    assert cfg.data.valid_split.endswith("finetune_a") and cfg.data.test_split.endswith("test")
    ds = PreparedDataset(data_dir)
    model = build_model(cfg.model.name, ds.spec, **cfg.model.params)
    loss, _ = objective(model, None, ds.batch(ds.split("train"), torch.arange(8)))
    assert torch.isfinite(loss)
