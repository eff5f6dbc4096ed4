"""Session-level fast adaptation: session tasks, the ``session_maml`` strategy, test-time adaptation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.prepared import PreparedDataset, Split
from metactr.data.tasks import session_tasks
from metactr.data.toy import write_toy_rml_dataset
from metactr.errors import ConfigError
from metactr.eval.adapted import session_adapted_proba
from metactr.eval.predict import predict_proba
from metactr.models.base import build_model
from metactr.papers.rml.protocol import ProtocolConfig, run_protocol
from metactr.strategies import strategy_config
from metactr.train.trainer import train

SMALL_RML = {"embed_dim": 4, "att_hidden": [8], "lstm_hidden": 4, "mlp_hidden": [8], "aux_hidden": [4], "dropout": 0.0}


@pytest.fixture(scope="module")
def toy():
    import tempfile

    return PreparedDataset(write_toy_rml_dataset(tempfile.mkdtemp(), n_users=160, rows_per_user=8))


def test_session_tasks_predict_each_history_item_from_the_items_before_it(toy):
    b = toy.batch(toy.split("wc_train"), torch.arange(12))
    support, sw, query, qw = session_tasks(b, 3)
    n = b.hist_mask.sum(1)
    for r in range(12):
        k = int(n[r])
        for s in range(3):
            j = k - 3 + s  # the last three history positions
            if j < 0:
                assert sw[r, s] == 0
                continue
            assert sw[r, s] == 1
            assert torch.equal(support.item[r, s], b.hist[r, j]) and support.label[r, s] == b.hist_label[r, j]
            assert int(support.hist_mask[r, s].sum()) == j  # exactly the items before it, never later
            assert torch.equal(support.hist[r, s, :j], b.hist[r, :j])
    assert torch.equal(query.label[:, 0], b.label) and qw.shape == (12, 1)
    empty = b._replace(hist_mask=torch.zeros_like(b.hist_mask))
    assert session_tasks(empty, 3)[1].sum() == 0  # an empty session adapts on nothing
    with pytest.raises(ValueError):
        session_tasks(b, 0)


def test_zero_adaptation_steps_give_the_plain_prediction_and_steps_change_it(toy):
    torch.manual_seed(0)
    model = build_model("rml", toy.spec, **SMALL_RML)
    train(model, toy, "wc_train", strategy_config("plain", {"lr": 0.02}), epochs=1, batch_size=32)
    plain = predict_proba(model, toy, "wc_test")
    kw = {"names": model.params_in("meta"), "lr": 0.5, "history_size": 4}
    np.testing.assert_allclose(session_adapted_proba(model, toy, "wc_test", steps=0, **kw), plain, atol=1e-6)
    adapted = session_adapted_proba(model, toy, "wc_test", steps=2, **kw)
    assert np.abs(adapted - plain).max() > 1e-4


def test_session_maml_learns_the_toy_signal_through_the_protocol(toy):
    """Trained and scored with per-session adaptation, it ranks the toy's noiseless held-out rows
    far above a constant (seed 0: 0.93-0.97 across the stages)."""
    strat = strategy_config("session_maml", {"lr": 0.02, "inner_lr": 0.1, "history_size": 4})
    rows = run_protocol(toy, "wc", "rml", SMALL_RML, strat, ProtocolConfig(mode="full", bootstrap=0), seed=0,
                        epochs=4, batch_size=32)
    assert rows[0]["n_test"] == 40 and rows[0]["auc"] > 0.85, rows[0]


def test_session_maml_config_checks():
    with pytest.raises(ConfigError):
        strategy_config("session_maml", {"history_size": 0})
    with pytest.raises(ConfigError):
        strategy_config("session_maml", {"inner_steps": 0})
    cfg = strategy_config("session_maml", {"metasgd": True, "test_steps": 3})
    assert cfg.metasgd and cfg.test_steps == 3


def test_bench_scores_a_session_strategy_after_adapting_each_session(toy):
    """``metactr bench`` adapts every test session on its history before scoring it, as the protocol
    does: the same training with more test-time steps gives other predictions (before the fix of
    stop 14 the bench scored session strategies unadapted, so both runs were identical)."""
    from metactr.papers.bench.config import BenchConfig
    from metactr.papers.bench.jobs import Job, adapts_at_test, job_key, run_rml_job

    def cfg(test_steps: int) -> BenchConfig:
        return BenchConfig.model_validate({
            "protocol": "rml", "datasets": [{"name": "toy", "prepared": str(toy.root)}], "methods": ["smaml"],
            "seeds": 1, "rml": {"subsets": ["wc"], "strategy": {"epochs": 1, "batch_size": 32},
                                "protocol": {"mode": "full", "bootstrap": 0},
                                "method": {"smaml": {"model": "rml", "strategy": "session_maml", "model_kw": SMALL_RML,
                                                     "strategy_kw": {"inner_lr": 0.1, "history_size": 4,
                                                                     "test_steps": test_steps, "test_lr": 1.0}}}}})

    job = Job("toy", None, str(toy.root), "smaml", "wc", 0)
    plain, _ = run_rml_job(cfg(0), job)
    adapted, _ = run_rml_job(cfg(3), job)
    for stage in ("before", "finetune_c"):
        assert np.abs(adapted[f"p__smaml__{stage}"] - plain[f"p__smaml__{stage}"]).max() > 1e-4
    assert adapts_at_test(strategy_config("session_maml", {})) and not adapts_at_test(strategy_config("plain", {}))
    assert job_key(cfg(0), job) != job_key(cfg(3), job)


def test_ft_selection_uses_training_rows_only_and_picks_a_candidate(toy, monkeypatch):
    """``ft_select`` cuts its validation rows from the training split by time and never reads FT
    or test rows; the choice is one of its candidates, each of which was scored."""
    from metactr.papers.rml.ft_select import candidates, select_finetuning, validation_cut

    train_split = toy.split("wc_train")
    fit, ft, test = validation_cut(train_split, 0.25)
    assert len(fit) + len(ft) + len(test) == len(train_split) and len(test) >= len(ft) > 0
    # the toy's splits carry no timestamps (file order); with shuffled ones the cut follows time
    t = train_split
    timed = Split.packed(t.name, t.user_id, t.hist_ids, t.hist_len, t.hist_labels, t.target, t.label, t.context,
                         torch.randperm(len(t), generator=torch.Generator().manual_seed(0)))
    fit_t, ft_t, test_t = validation_cut(timed, 0.25)
    assert fit_t.timestamp.max() < ft_t.timestamp.min() and ft_t.timestamp.max() < test_t.timestamp.min()
    assert len(fit_t) == len(fit) and len(test_t) == len(test)
    with pytest.raises(ValueError):
        validation_cut(train_split.subset(torch.arange(3)), 0.2)

    read = []
    real = toy.split
    monkeypatch.setattr(toy, "split", lambda name: (read.append(name), real(name))[1])
    cfg = ProtocolConfig(mode="full", bootstrap=0, ft_select=True, ft_lr_grid=[1e-3, 1e-2], ft_epochs_grid=[1])
    strat = strategy_config("plain", {"lr": 0.02})
    chosen, record = select_finetuning(toy, "wc", "rml", SMALL_RML, strat, cfg, 0, epochs=1, batch_size=32)
    assert set(read) == {"wc_train"}, read  # no FT set, no test set
    assert [(c["ft_lr"], c["ft_epochs"]) for c in record["candidates"]] == candidates(cfg)
    assert all(c["valid_auc"] is not None for c in record["candidates"])
    best = max(record["candidates"], key=lambda c: c["valid_auc"])
    assert (chosen.ft_lr, chosen.ft_epochs) == (best["ft_lr"], best["ft_epochs"]) == tuple(record["chosen"].values())


def test_ft_selection_config_checks_and_keeps_old_job_keys():
    with pytest.raises(ValueError):
        ProtocolConfig(mode="faithful", ft_select=True)
    with pytest.raises(ValueError):
        ProtocolConfig(mode="full", ft_select=True, ft_lr_grid=[0.0])
    with pytest.raises(ValueError):
        ProtocolConfig(mode="faithful", ft_epochs=0)
    assert set(ProtocolConfig().key_dump()) == {"mode", "ft_batch_size", "ft_epochs", "ft_lr", "bootstrap"}
    assert "ft_lr_grid" in ProtocolConfig(mode="full", ft_select=True).key_dump()


def test_no_finetuning_takes_no_step(toy):
    from metactr.papers.rml.protocol import finetune

    model = build_model("rml", toy.spec, **SMALL_RML)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    assert finetune(model, toy, "wc_finetune_a", opt, ProtocolConfig(mode="full", ft_epochs=0),
                    torch.Generator().manual_seed(0)) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bench_method_protocol_overrides(toy, tmp_path, capsys):
    """A method's own ``protocol`` settings reach its jobs (and their keys); a bad one is a one-line
    error before any work."""
    import yaml

    from metactr import cli
    from metactr.papers.bench.config import BenchConfig, rml_protocol
    from metactr.papers.bench.jobs import Job, job_key

    base = {"protocol": "rml", "datasets": [{"name": "toy", "prepared": str(toy.root)}], "methods": ["a", "b"],
            "seeds": 1, "rml": {"subsets": ["wc"], "strategy": {"epochs": 1, "batch_size": 32},
                                "protocol": {"mode": "full", "bootstrap": 0},
                                "method": {"a": {"model": "rml", "model_kw": SMALL_RML},
                                           "b": {"model": "rml", "model_kw": SMALL_RML,
                                                 "protocol": {"ft_select": True, "ft_lr_grid": [1e-3]}}}}}
    cfg = BenchConfig.model_validate(base)
    assert not rml_protocol(cfg, "a").ft_select and rml_protocol(cfg, "b").ft_select
    assert rml_protocol(cfg, "b").ft_lr_grid == [1e-3] and rml_protocol(cfg, "b").mode == "full"
    ka = job_key(cfg, Job("toy", None, str(toy.root), "a", "wc", 0))
    assert ka != job_key(cfg, Job("toy", None, str(toy.root), "b", "wc", 0))
    base["rml"]["method"]["b"]["protocol"] = {"ft_select": True, "mode": "faithful"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    assert cli.main(["bench", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method.b.protocol" in err[0] and "ft_select" in err[0], err
    assert not (tmp_path / "out").exists()
