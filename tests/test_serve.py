"""Serving: scoring by raw ids, unknown ids, per-user fast adaptation, bad requests."""

from __future__ import annotations

import pytest
import torch

from metactr.data.pipeline import PrepareConfig, prepare
from metactr.data.prepared import PreparedDataset
from metactr.data.synth import generate
from metactr.models import build_model
from metactr.train.checkpoint import model_meta, save_checkpoint

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from metactr.serve.app import create_app  # noqa: E402
from metactr.serve.service import CTRService, Interaction  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    raw = generate(root / "log.parquet", n_users=60, n_items=120, n_rows=4000, seed=3)
    prepared = prepare("synthetic", raw, root / "prep", PrepareConfig(protocol="rml", seed=3))
    ds = PreparedDataset(prepared)
    torch.manual_seed(0)
    hp = {"embed_dim": 8, "hidden": [16]}
    model = build_model("basic", ds.spec, **hp)
    stem = save_checkpoint(root / "ckpt", model, model_meta(model, hp, {"prepared": str(prepared)}))
    service = CTRService(stem, prepared, adapt_groups=["mlp"], adapt_lr=0.5, adapt_steps=3)
    from metactr.data.encode import load_vocabs

    vocab = load_vocabs(prepared)
    users = vocab["user_id"].raw.to_list()
    items = vocab["item_id"].raw.to_list()
    return service, users, items


def test_predict_matches_model_and_handles_unknown_ids(served):
    service, users, items = served
    hist = [Interaction(items[0], 1), Interaction(items[1], 0)]
    p = service.predict(users[0], items[:5], hist)
    assert len(p) == 5 and all(0.0 < x < 1.0 for x in p)
    assert (service._codes("item_id", items[:5]) >= 2).all()  # known raw ids keep their codes
    assert (service._codes("item_id", [str(items[0])]) >= 2).all()  # ids may arrive as strings
    assert service._codes("user_id", ["never-seen-user"]).tolist() == [1]
    q = service.predict("never-seen-user", ["never-seen-item", items[2]], [])
    assert len(q) == 2 and all(0.0 < x < 1.0 for x in q)
    assert service.predict(users[0], [], hist) == []


def test_adapt_changes_only_that_users_scores(served):
    service, users, items = served
    u, v = users[1], users[2]
    cands = items[3:8]
    before_u, before_v = service.predict(u, cands), service.predict(v, cands)
    info = service.adapt(u, [Interaction(i, 1) for i in items[3:8]])
    assert info["samples"] == 5
    after_u, after_v = service.predict(u, cands), service.predict(v, cands)
    assert sum(after_u) > sum(before_u)  # trained towards clicks on these items
    assert after_v == before_v
    assert service.forget(u) and service.predict(u, cands) == before_u


def test_http_api_and_bad_requests(served):
    service, users, items = served
    client = TestClient(create_app(service))
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/predict", json={"user": users[0], "items": items[:3],
                                      "history": [{"item": items[4], "label": 1}]})
    assert r.status_code == 200 and len(r.json()["scores"]) == 3
    r = client.post("/adapt", json={"user": users[0], "interactions": [{"item": items[0], "label": 1}]})
    assert r.status_code == 200 and r.json()["samples"] == 1
    assert client.post("/adapt", json={"user": 1, "interactions": [{"item": 1, "label": 2}]}).status_code == 422
    assert client.post("/adapt", json={"user": 1, "interactions": []}).status_code == 422
    assert client.post("/predict", json={"user": 1, "items": [1], "oops": 1}).status_code == 422
    assert client.get("/info").json()["cached_users"] >= 1
