"""Session-level fast adaptation: session tasks, the ``session_maml`` strategy, test-time adaptation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.prepared import PreparedDataset
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
