"""Serving: scoring by raw ids, unknown ids, per-user fast adaptation, bad requests."""

from __future__ import annotations

import sys

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


# --------------------------------------------------------------------------- concurrency
def _race(service, users, items, *, threads: int = 4, requests: int = 50):
    """Adapt fresh users while other threads score never-adapted probe users and one user adapted
    beforehand; returns (answers per probe call, errors)."""
    import threading

    cands = items[:20]
    hist = [Interaction(items[30], 1), Interaction(items[31], 0)]
    probes = [users[10], users[11], users[12]]
    answers, errors, start = [], [], threading.Barrier(threads)

    def adapter(k: int) -> None:
        start.wait()
        for i in range(requests):
            try:
                service.adapt(f"race-{k}-{i}", [Interaction(items[(i + j) % 40], j % 2) for j in range(6)])
            except Exception as e:  # noqa: BLE001 - any failure counts
                errors.append(repr(e))

    def scorer(k: int) -> None:
        start.wait()
        for i in range(requests):
            u = probes[(i + k) % len(probes)]
            try:
                answers.append((u, service.predict(u, cands, hist)))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    pool = [threading.Thread(target=adapter if k % 2 == 0 else scorer, args=(k,)) for k in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: a shared module swapped mid-call would show
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    return answers, errors, cands, hist


def test_concurrent_adapt_never_changes_other_users_scores(served):
    service, users, items = served
    service.adapt(users[12], [Interaction(i, 1) for i in items[:8]])  # one probe is an adapted user
    answers, errors, cands, hist = _race(service, users, items)
    assert errors == []
    serial = {u: service.predict(u, cands, hist) for u in {u for u, _ in answers}}
    assert len(answers) == 100 and len(serial) == 3
    assert all(scores == serial[u] for u, scores in answers)  # bit-identical to a serial run
    service.forget(users[12])


def test_concurrent_http_requests_never_fail(served):
    import threading

    service, users, items = served
    client = TestClient(create_app(service), raise_server_exceptions=False)  # a 500 is a status here
    ref = client.post("/predict", json={"user": users[20], "items": items[:10]}).json()["scores"]
    statuses, same, start = [], [], threading.Barrier(4)

    def worker(k: int) -> None:
        start.wait()
        for i in range(25):
            if k % 2:
                r = client.post("/adapt", json={"user": f"h-{k}-{i}", "interactions": [
                    {"item": items[(i + j) % 30], "label": j % 2} for j in range(5)]})
            else:
                r = client.post("/predict", json={"user": users[20], "items": items[:10]})
                same.append(r.status_code == 200 and r.json()["scores"] == ref)
            statuses.append(r.status_code)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert len(statuses) == 100 and set(statuses) == {200}
    assert len(same) == 50 and all(same)


def test_model_replicas_share_the_trained_tensors(served):
    service = served[0]
    with service._pool.lease() as replica:
        shared = {n: p.data_ptr() for n, p in replica.named_parameters()}
    assert shared == {n: t.data_ptr() for n, t in service._params.items()}
    with pytest.raises(TypeError):
        service._params["x"] = torch.zeros(1)  # the mappings handed to scoring are read-only


# --------------------------------------------------------------------------- ids
def test_id_index_vectorized_lookup():
    import polars as pl

    from metactr.data.encode import Vocab
    from metactr.serve.service import IdIndex

    ints = IdIndex(Vocab.build("item_id", pl.Series([30, 10, 20])))
    assert ints.codes([10, "20", 30, 40, "x", "1e1"]).tolist() == [2, 3, 4, 1, 1, 1]
    assert ints.codes([]).tolist() == [] and ints.codes([1.5, True]).tolist() == [1, 1]
    # all-digit strings take NumPy's path, the others Polars': the same codes either way
    assert ints.codes(["10", "20", "30", "40"]).tolist() == [2, 3, 4, 1]
    assert ints.codes(["10", "-20", "30", "9" * 30]).tolist() == [2, 1, 4, 1]
    strs = IdIndex(Vocab.build("user_id", pl.Series(["b", "a", "7"])))
    assert strs.codes(["a", "b", 7, "7", "zz", 8]).tolist() == [3, 4, 2, 2, 1, 1]


# --------------------------------------------------------------------------- limits
def _client(service, **kw):
    from metactr.serve.app import Limits

    limits = {k: kw.pop(k) for k in list(kw) if k.startswith("max_")}
    return TestClient(create_app(service, limits=Limits(**limits), **kw))


def test_oversized_body_is_413_before_parsing(served):
    service, users, items = served
    client = _client(service, max_body_bytes=200)
    small = {"user": users[0], "items": items[:3]}
    assert client.post("/predict", json=small).status_code == 200
    junk = b"{" + b"x" * 300  # not even JSON: a 413 proves nothing was parsed
    r = client.post("/predict", content=junk, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "200 bytes" in r.json()["detail"]

    def chunks():  # streamed (chunked): no Content-Length to check up front
        for _ in range(10):
            yield b"x" * 50

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/adapt", content=junk).status_code == 413
    r = client.post("/predict", content=junk[:150], headers={"content-type": "application/json"})
    assert r.status_code == 422  # under the limit: parsed, and rejected as bad JSON


@pytest.mark.parametrize("body", [
    '{"user": 1, "items": [NaN]}',
    '{"user": NaN, "items": [1]}',
    '{"user": 1, "items": [Infinity, -Infinity]}',
    '{"user": 1, "items": [1.5]}',
    '{"user": true, "items": [1]}',
    '{"user": 1, "items": [null]}',
    '{"user": 1, "items": [{"id": "ECHO-ME"}]}',
    '{"user": 1, "items": "ECHO-ME"}',
    '{"user": 1, "items": [1], "history": [{"item": 1, "label": NaN}]}',
    '{"user": 1, "items": [1], "history": [{"item": 1, "label": 1.0}]}',
    '{"user": 1, "items": [1], "ECHO-ME": 1}',
    '{"user": "' + "ECHO-ME" * 50 + '", "items": [1]}',
    '{"user": 99999999999999999999999, "items": [1]}',
    '{"user": 1, "items": [1]',
])
def test_bad_values_are_422_without_echo(served, body):
    client = TestClient(create_app(served[0]))
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]  # valid JSON (no NaN), field paths and messages only
    assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail)
    assert "ECHO-ME" * 2 not in r.text and '"input"' not in r.text and "NaN" not in r.text


def test_adapt_bad_values_are_422(served):
    client = TestClient(create_app(served[0]))
    for inter in ([{"item": 1, "label": float("nan")}], [{"item": float("inf"), "label": 1}],
                  [{"item": 1, "label": True}], [{"item": [1], "label": 1}]):
        body = '{"user": 1, "interactions": %s}' % str(inter).replace("'", '"').replace("nan", "NaN") \
            .replace("inf", "Infinity").replace("True", "true")
        r = client.post("/adapt", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and '"input"' not in r.text, (body, r.text)


def test_list_length_limits(served):
    service, users, items = served
    client = _client(service, max_items=5, max_interactions=3, max_history=2)
    inter = [{"item": i, "label": 1} for i in items[:4]]
    assert client.post("/predict", json={"user": 1, "items": items[:5]}).status_code == 200
    r = client.post("/predict", json={"user": 1, "items": items[:6]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]
    assert client.post("/predict", json={"user": 1, "items": [1], "history": inter[:3]}).status_code == 422
    assert client.post("/adapt", json={"user": 1, "interactions": inter[:3]}).status_code == 200
    assert client.post("/adapt", json={"user": 1, "interactions": inter}).status_code == 422
    many = TestClient(create_app(service))  # defaults: 10,000 candidates
    r = many.post("/predict", json={"user": 1, "items": [1] * 10_001})
    assert r.status_code == 422 and r.json()["errors"] == 1 and len(r.content) < 1000
    from metactr.errors import ConfigError
    from metactr.serve.app import Limits

    with pytest.raises(ConfigError, match="max_items"):
        Limits(max_items=0)


# --------------------------------------------------------------------------- token
TOKEN = "s3cret-token-0123456789"


def test_token_required_everywhere_but_health(served):
    service, users, items = served
    client = _client(service, token=TOKEN)
    ok = {"authorization": f"Bearer {TOKEN}"}
    calls = [("get", "/info", None), ("post", "/predict", {"user": 1, "items": items[:2]}),
             ("post", "/adapt", {"user": "tok", "interactions": [{"item": items[0], "label": 1}]}),
             ("delete", "/users/tok", None), ("get", "/docs", None), ("get", "/openapi.json", None),
             ("get", "/no-such-route", None)]
    for method, path, body in calls:
        kw = {} if body is None else {"json": body}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                        {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}):
            r = client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in r.text
        r = client.request(method, path, headers=ok, **kw)
        assert r.status_code == (404 if path == "/no-such-route" else 200), (path, r.text)
    assert client.get("/health").status_code == 200
    assert client.get("/health", headers={"authorization": "Bearer wrong"}).status_code == 200
    assert client.post("/predict", json={"user": 1, "items": [1]},
                       headers={"authorization": f"bearer {TOKEN}"}).status_code == 200


def test_token_sources(tmp_path, monkeypatch):
    from metactr.errors import ConfigError
    from metactr.serve.commands import TOKEN_ENV, read_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert read_token(f) == TOKEN
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert read_token(None) == "from-the-environment" and read_token(f) == TOKEN
    for bad in ("", "\n\n", "two words", "caf\u00e9"):
        f.write_text(bad, encoding="utf-8")
        with pytest.raises(ConfigError, match="token"):
            read_token(f)
    with pytest.raises(ConfigError, match="missing"):
        read_token(tmp_path / "missing")
    monkeypatch.setenv(TOKEN_ENV, " ")
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        read_token(None)


def test_serve_cli_bad_token_file_is_one_line_exit_2(tmp_path, capsys):
    from metactr.cli import main

    code = main(["serve", str(tmp_path / "ckpt"), "--data", str(tmp_path), "--token-file", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nope" in err
