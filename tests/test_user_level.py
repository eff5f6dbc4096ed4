"""The user-level variant (issue 15): time-ordered user tasks, per-user adaptation at FT/test on the
splits seen so far, through the protocol and the bench."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.prepared import PreparedDataset, Split
from metactr.data.tasks import UserTaskSampler
from metactr.data.toy import write_toy_rml_dataset
from metactr.eval.adapted import protocol_proba, user_adapted_proba
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


@pytest.fixture(scope="module")
def trained(toy):
    torch.manual_seed(0)
    model = build_model("rml", toy.spec, **SMALL_RML)
    train(model, toy, "wc_train", strategy_config("plain", {"lr": 0.02}), epochs=1, batch_size=32)
    return model


def test_time_ordered_tasks_put_the_latest_past_before_the_next_rows(toy):
    split = toy.split("wc_train")
    ts = split.timestamp if split.timestamp is not None else torch.arange(len(split))
    sampler = UserTaskSampler(toy, "wc_train", tasks_per_batch=16, support_size=3, query_size=2, order="time")
    for tb in sampler.iterate(np.random.default_rng(0)):
        s_t, q_t = tb.support.item[..., 0], tb.query.item[..., 0]
        assert s_t.shape[1] == 3 and q_t.shape[1] == 2
        for t in range(len(tb.users)):
            u = int(tb.users[t])
            rows = torch.nonzero(split.user_id == u).squeeze(1)
            rows = rows[torch.sort(ts[rows], stable=True).indices]  # the user's rows in time order
            n_s, n_q = int(tb.support_weight[t].sum()), int(tb.query_weight[t].sum())
            n_q_all = max(1, min(round(len(rows) * 0.5), len(rows) - 1))
            expect_s = rows[:len(rows) - n_q_all][-3:]
            expect_q = rows[len(rows) - n_q_all:][:2]
            assert n_s == len(expect_s) and n_q == len(expect_q)
            assert torch.equal(s_t[t, :n_s], split.target[expect_s])
            assert torch.equal(q_t[t, :n_q], split.target[expect_q])
    with pytest.raises(ValueError):
        UserTaskSampler(toy, "wc_train", order="sorted")


def test_user_adaptation_zero_steps_is_plain_and_test_labels_never_leak(toy, trained):
    names = trained.params_in("meta")
    plain = predict_proba(trained, toy, "wc_test")
    seen = ["wc_train", "wc_finetune_a"]
    kw = {"names": names, "lr": 0.5, "support_size": 5, "tasks_per_batch": 7, "query_size": 2}
    np.testing.assert_allclose(user_adapted_proba(trained, toy, "wc_test", seen, steps=0, **kw), plain, atol=1e-6)
    adapted = user_adapted_proba(trained, toy, "wc_test", seen, steps=2, **kw)
    assert adapted.shape == plain.shape and np.abs(adapted - plain).max() > 1e-4
    test = toy.split("wc_test")
    flipped = Split.packed(test.name, test.user_id, test.hist_ids, test.hist_len, test.hist_labels, test.target,
                           1.0 - test.label, test.context, test.timestamp)
    np.testing.assert_allclose(user_adapted_proba(trained, toy, flipped, seen, steps=2, **kw), adapted, atol=1e-6)
    # a user with nothing seen gets the plain prediction; chunking does not change any score
    empty = toy.split("wc_train").subset(torch.zeros(0, dtype=torch.long))
    np.testing.assert_allclose(user_adapted_proba(trained, toy, "wc_test", [empty], steps=2, **kw), plain, atol=1e-6)
    big = user_adapted_proba(trained, toy, "wc_test", seen, steps=2, **{**kw, "tasks_per_batch": 64, "query_size": 64})
    np.testing.assert_allclose(big, adapted, atol=1e-5)


def test_user_level_maml_through_the_protocol(toy):
    strat = strategy_config("maml", {"lr": 0.02, "inner_lr": 0.1, "adapt_groups": ["meta"], "support_size": 4,
                                     "query_size": 2, "tasks_per_batch": 16, "task_order": "time",
                                     "test_adapt": True})
    rows = run_protocol(toy, "wc", "rml", SMALL_RML, strat, ProtocolConfig(mode="full", bootstrap=0), seed=0,
                        epochs=2, batch_size=32)
    assert [r["stage"] for r in rows] == ["before", "finetune_a", "finetune_b", "finetune_c"]
    assert all(r["n_test"] == 40 and 0.0 <= r["auc"] <= 1.0 for r in rows)


def test_protocol_proba_is_plain_without_test_adaptation(toy, trained):
    class Plain:
        pass

    class Off:
        def test_user_adaptation(self):
            return None

    plain = predict_proba(trained, toy, "wc_test")
    for s in (Plain(), Off()):
        np.testing.assert_array_equal(protocol_proba(trained, toy, "wc_test", s, ["wc_train"]), plain)
