"""Splitter properties (Hypothesis) checked against a plain-Python reference on small random logs."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metactr.data.pipeline import PrepareConfig, build_prepared
from metactr.data.readers import RawData
from metactr.data.sessions import build_samples, positions
from metactr.data.split import RML_PARTS

FT_TEST = RML_PARTS[1:]


def random_log(seed: int, n_users: int, n_items: int, max_rows: int, tie_prob: float) -> RawData:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(n_users * 3, max_rows))
    ts = rng.integers(0, 50 if tie_prob > 0.5 else 10_000, size=n)
    inter = pl.DataFrame({"user": rng.integers(100, 100 + n_users, size=n), "item": rng.integers(0, n_items, size=n),
                          "timestamp": ts, "rating": rng.integers(1, 6, size=n).astype(np.float32)})
    return RawData(interactions=inter.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)))


def reference_sequences(raw: RawData, cfg: PrepareConfig) -> dict[int, list[tuple[int, int, int]]]:
    """Per raw user: [(raw item, time, label)] in time order, deduped (keep last), filtered."""
    rows = raw.interactions.sort(["timestamp", "row"]).iter_rows(named=True)
    seq: dict[int, list] = defaultdict(list)
    for r in rows:
        seq[r["user"]].append((r["item"], r["timestamp"], int(r["rating"] >= cfg.label.threshold)))
    out = {}
    for u, s in seq.items():
        last = {}
        for k, (i, _, _) in enumerate(s):
            last[i] = k
        s = [x for k, x in enumerate(s) if last[x[0]] == k]
        if len(s) >= cfg.filter.min_user_interactions:
            out[u] = s
    return out


def decode(prep: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(prep / f"{name}.parquet")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_users=st.integers(4, 25), n_items=st.integers(4, 40),
       max_len=st.integers(1, 6), stride=st.integers(1, 3), holdout=st.sampled_from(["paper", "temporal"]),
       ties=st.floats(0, 1), test_sessions=st.sampled_from([1, 1, 2, 3]))
def test_rml_split_properties(seed, n_users, n_items, max_len, stride, holdout, ties, test_sessions):
    raw = random_log(seed, n_users, n_items, 400, ties)
    kt = test_sessions
    cfg = PrepareConfig(seed=seed, filter={"min_user_interactions": 3}, session={"max_len": max_len, "stride": stride},
                        rml={"subset_min_interactions": 6, "holdout": holdout, "test_sessions": kt})
    ref = reference_sequences(raw, cfg)
    with tempfile.TemporaryDirectory() as td:
        prep = Path(td)
        try:
            meta = build_prepared(raw, prep, dataset="t", cfg=cfg)
        except Exception as e:  # only acceptable failure: nothing left after filtering
            assert "interactions" in str(e)
            assert not ref
            return
        uv = pl.read_parquet(prep / "vocab" / "user_id.parquet")
        iv = pl.read_parquet(prep / "vocab" / "item_id.parquet")
        u_raw = dict(zip(uv["code"].to_list(), uv["raw"].to_list()))
        i_raw = dict(zip(iv["code"].to_list(), iv["raw"].to_list()))
        groups = pl.read_parquet(prep / "protocol" / "user_groups.parquet")
        cold = {u_raw[c] for c in groups.filter(pl.col("cold"))["user_id"].to_list()}
        warm_items = {i_raw[c] for c in pl.read_parquet(prep / "protocol" / "item_groups.parquet")
                      .filter(pl.col("warm"))["item_id"].to_list()}
        # warm:cold users ~4:1 (seeded)
        assert len(cold) == round(len(ref) * 0.2)
        users_of, items_of = {}, {}
        for subset, user_cold, item_warm in (("wc", False, True), ("cw", True, False)):
            # expected per-user subset sequences
            exp = {}
            for u, s in ref.items():
                if (u in cold) != user_cold:
                    continue
                s2 = [x for x in s if (x[0] in warm_items) == (subset == "cw")]
                if len(s2) >= 6:
                    exp[u] = s2
            frames = {p: decode(prep, f"{subset}_{p}") for p in RML_PARTS}
            seen_users, seen_items = set(), set()
            holdout_of = defaultdict(list)
            got_samples = []
            for p, df in frames.items():
                for r in df.iter_rows(named=True):
                    u = u_raw[r["user_id"]]
                    hist = [i_raw[c] for c in r["hist_item_ids"]]
                    tgt = i_raw[r["target_item_id"]]
                    seen_users.add(u)
                    seen_items.update(hist + [tgt])
                    assert tgt not in hist  # a target never appears in its own session
                    got_samples.append((p, u, tuple(hist), tgt, r["label"], tuple(r["hist_labels"]), r["timestamp"]))
                    if p != "train":
                        holdout_of[u].append((p, r["timestamp"]))
            assert seen_users == set(exp)
            # reference samples: sliding windows aligned at each user's last interaction
            want = []
            for u, s in exp.items():
                n = len(s)
                targets = [t for t in range(1, n) if (n - 1 - t) % stride == 0]
                for t in targets:
                    k = (n - 1 - t) // stride
                    win = s[max(0, t - max_len):t]
                    want.append((k, u, tuple(x[0] for x in win), s[t][0], s[t][2], tuple(x[2] for x in win), s[t][1]))
            got_key = sorted(g[1:] for g in got_samples)
            want_key = sorted(w[1:] for w in want)
            assert got_key == want_key  # same sessions, in time order, same labels
            by_k = {(w[1], w[3]): w[0] for w in want}
            for p, u, hist, tgt, *_ in got_samples:
                k = by_k[(u, tgt)]
                if holdout == "paper":
                    assert (p != "train") == (k == 0)
                else:  # the last kt sessions to test, the three before them to FT-C, FT-B, FT-A
                    assert p == ("test" if k < kt else RML_PARTS[3 - (k - kt)] if k < kt + 3 else "train")
            for u in exp:
                parts = [p for p, _ in holdout_of[u]]
                if holdout == "paper":
                    assert len(parts) == 1  # exactly one FT/test session per user
                else:
                    # the last (up to) kt + 3 sessions: FT-A, FT-B, FT-C, kt x test (a user with
                    # fewer sessions fills them from the end)
                    full = list(FT_TEST[:3]) + ["test"] * kt
                    assert sorted(parts) == sorted(full[len(full) - len(parts):])
                    rank = {p: i for i, p in enumerate(FT_TEST)}
                    by_time = [p for _, p in sorted((t, rank[p]) for p, t in holdout_of[u])]
                    assert by_time == sorted(by_time)  # FT-A, FT-B, FT-C, test in time order
            users_of[subset], items_of[subset] = seen_users, seen_items
            assert all((u in cold) == user_cold for u in seen_users)
            assert all((i in warm_items) == (subset == "cw") for i in seen_items)
        assert not (users_of["wc"] & users_of["cw"])  # WC and CW share no user
        assert not (items_of["wc"] & items_of["cw"])  # ... and no item
        for subset in ("wc", "cw"):
            for p in RML_PARTS:
                assert meta["splits"][f"{subset}_{p}"]["rows"] == decode(prep, f"{subset}_{p}").height


def test_build_samples_windows_and_stride():
    user = np.array([5, 5, 5, 5, 5, 7, 7, 7], dtype=np.int32)
    item = np.arange(10, 18, dtype=np.int32)
    lab = np.array([1, 0, 1, 0, 1, 0, 0, 1], dtype=np.int8)
    s = build_samples(user, item, lab, max_len=2, stride=1)
    assert s.target_idx.tolist() == [1, 2, 3, 4, 6, 7]
    assert s.hist_items.to_pylist() == [[10], [10, 11], [11, 12], [12, 13], [15], [15, 16]]
    assert s.hist_labels.to_pylist() == [[1], [1, 0], [0, 1], [1, 0], [0], [0, 0]]
    assert s.rev_pos.tolist() == [3, 2, 1, 0, 1, 0]
    s2 = build_samples(user, item, lab, max_len=3, stride=2)
    assert s2.target_idx.tolist() == [2, 4, 7]  # aligned at each user's last interaction
    pos, cnt = positions(user)
    assert pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and cnt.tolist() == [5] * 5 + [3] * 3


def _ml_like(tmp: Path, seed: int = 0) -> RawData:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        items = rng.choice(300, size=int(rng.integers(22, 60)), replace=False)
        for k, i in enumerate(items):
            rows.append((u, int(i), 1000 * u + k, float(rng.integers(1, 6))))
    df = pl.DataFrame(rows, schema=["user", "item", "timestamp", "rating"], orient="row")
    return RawData(interactions=df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)))


def test_random_protocol_fractions_and_history(tmp_path):
    raw = _ml_like(tmp_path)
    cfg = PrepareConfig(protocol="random", seed=3)
    meta = build_prepared(raw, tmp_path, dataset="t", cfg=cfg)
    counts = {k: v["rows"] for k, v in meta["splits"].items()}
    total = sum(counts.values())
    assert total == raw.interactions.height - 40  # every interaction but each user's first
    assert 0.75 < counts["train"] / total < 0.85
    df = pl.concat([pl.read_parquet(tmp_path / f"{s}.parquet") for s in ("train", "valid", "test")])
    assert df["hist_item_ids"].list.len().min() >= 1
    assert df["hist_item_ids"].list.len().max() == 10
    # seeded: same seed, same split
    other = tmp_path / "again"
    other.mkdir()
    build_prepared(raw, other, dataset="t", cfg=cfg)
    assert pl.read_parquet(other / "test.parquet").equals(pl.read_parquet(tmp_path / "test.parquet"))


def test_metaselector_protocol_chronological(tmp_path):
    raw = _ml_like(tmp_path)
    cfg = PrepareConfig(protocol="metaselector", metaselector={"newuser_fraction": 0.25})
    meta = build_prepared(raw, tmp_path, dataset="t", cfg=cfg)
    assert [c["name"] for c in meta["context_fields"]] == ["weekday", "season"]
    sp = {n: pl.read_parquet(tmp_path / f"{n}.parquet") for n in meta["splits"]}
    new_users = set(sp["ms_newuser_train"]["user_id"]) | set(sp["ms_newuser_test"]["user_id"])
    meta_users = set(sp["ms_support"]["user_id"]) | set(sp["ms_test"]["user_id"])
    assert len(new_users) == 10 and not (new_users & meta_users)
    for u in list(meta_users)[:10]:
        t_sup = sp["ms_support"].filter(pl.col("user_id") == u)["timestamp"]
        t_q = sp["ms_query"].filter(pl.col("user_id") == u)["timestamp"]
        t_te = sp["ms_test"].filter(pl.col("user_id") == u)["timestamp"]
        assert t_sup.max() < t_q.min() and t_q.max() < t_te.min()
        n = len(t_sup) + len(t_q) + len(t_te) + 1  # + the first interaction (no history)
        assert len(t_te) == n - round(0.8 * n)
    for c in ("ctx_weekday", "ctx_season"):
        v = sp["ms_test"][c]
        assert v.min() >= 2 and v.max() < meta["context_fields"][0 if c == "ctx_weekday" else 1]["vocab_size"]


def test_rml_finetune_users_fixed_sizes(tmp_path):
    raw = _ml_like(tmp_path, seed=1)
    cfg = PrepareConfig(rml={"subset_min_interactions": 3, "finetune_users": 2, "item_warm_quantile": 0.5})
    meta = build_prepared(raw, tmp_path, dataset="t", cfg=cfg)
    for sub in ("wc", "cw"):
        for p in ("finetune_a", "finetune_b", "finetune_c"):
            assert meta["splits"][f"{sub}_{p}"]["rows"] == 2
        assert meta["splits"][f"{sub}_test"]["rows"] == meta["protocol_facts"][f"{sub}_users"] - 6


def test_rml_too_few_users_for_finetune_size(tmp_path):
    from metactr.errors import DataError

    raw = _ml_like(tmp_path)
    with pytest.raises(DataError, match="finetune_users"):
        build_prepared(raw, tmp_path, dataset="t", cfg=PrepareConfig(rml={"finetune_users": 500,
                                                                            "subset_min_interactions": 3}))
