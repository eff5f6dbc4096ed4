"""prepare(): cache, atomic output, errors; full pipeline on the real data checked against an
independent pandas recount; the loader reads every layout we write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch

from metactr.data.pipeline import PrepareConfig, prepare
from metactr.data.prepared import PreparedDataset
from metactr.data.synth import generate
from metactr.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "log.parquet", n_users=300, n_items=400, n_rows=30_000,
                    seed=1)


def test_prepare_caches_and_force_rebuilds(tmp_path, synth_log):
    out = tmp_path / "prep"
    prepare("synthetic", synth_log, out)
    m1 = (out / "meta.json").stat().st_mtime_ns
    prepare("synthetic", synth_log, out)
    assert (out / "meta.json").stat().st_mtime_ns == m1  # same config + same input: reused
    prepare("synthetic", synth_log, out, PrepareConfig(seed=5))
    m2 = (out / "meta.json").stat().st_mtime_ns
    assert m2 != m1 and json.loads((out / "meta.json").read_text())["config"]["seed"] == 5
    prepare("synthetic", synth_log, out, PrepareConfig(seed=5), force=True)
    assert (out / "meta.json").stat().st_mtime_ns != m2
    meta = json.loads((out / "meta.json").read_text())
    for key in ("format_version", "dataset", "protocol", "config", "config_hash", "input_fingerprint",
                "vocab_sizes", "max_hist_len", "context_fields", "splits", "label_rule"):
        assert key in meta
    assert meta["splits"]["wc_train"]["rows"] > 0


def test_prepare_failure_leaves_no_output_and_keeps_old(tmp_path, synth_log):
    out = tmp_path / "prep"
    with pytest.raises(DataError):
        prepare("synthetic", synth_log, out, PrepareConfig(filter={"min_user_interactions": 10**6}))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    prepare("synthetic", synth_log, out)
    before = (out / "meta.json").read_text()
    with pytest.raises(DataError):
        prepare("synthetic", synth_log, out, PrepareConfig(filter={"min_user_interactions": 10**6}))
    assert (out / "meta.json").read_text() == before


def test_config_errors():
    from metactr.config import load_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_config(PrepareConfig, None, ["rml.colour=red"])
    with pytest.raises(ConfigError, match="rml.cold_user_fraction"):
        load_config(PrepareConfig, None, ["rml.cold_user_fraction=1.5"])
    with pytest.raises(ConfigError, match="session.max_len"):
        load_config(PrepareConfig, None, ["session.max_len=0"])
    with pytest.raises(ConfigError, match="dataset"):
        prepare("netflix", ".", "/tmp/never")
    with pytest.raises(ConfigError, match="custom_schema"):
        prepare("custom", ".", "/tmp/never")


@pytest.mark.parametrize("protocol", ["rml", "random", "metaselector"])
def test_loader_reads_every_protocol(tmp_path, synth_log, protocol):
    cfg = PrepareConfig(protocol=protocol, metaselector={"newuser_fraction": 0.2})
    out = prepare("synthetic", synth_log, tmp_path / protocol, cfg)
    ds = PreparedDataset(out)
    meta = json.loads((out / "meta.json").read_text())
    assert set(ds.split_names) == set(meta["splits"])
    assert [f.name for f in ds.spec.item] == ["item_id", "topic", "popularity"]
    assert ds.spec.max_hist_len == 10
    assert len(ds.spec.context) == (2 if protocol == "metaselector" else 0)
    for name in ds.split_names:
        sp = ds.split(name)
        assert len(sp) == meta["splits"][name]["rows"]
        if len(sp):
            b = ds.batch(sp, torch.arange(min(4, len(sp))))
            assert b.hist_mask[:, 0].all()  # never an empty session
            assert (b.hist[..., 0][b.hist_mask] >= 2).all()


def test_synthetic_generator_is_seeded_and_streams(tmp_path):
    a = generate(tmp_path / "a.parquet", n_users=50, n_items=30, n_rows=2500, seed=3, chunk_rows=1000)
    b = generate(tmp_path / "b.parquet", n_users=50, n_items=30, n_rows=2500, seed=3, chunk_rows=1000)
    da, db = pl.read_parquet(a), pl.read_parquet(b)
    assert da.equals(db) and da.height == 2500
    assert da["timestamp"].is_sorted()  # written in time order across chunks
    assert pl.read_parquet_metadata(a) is not None
    # clicks follow p_click: mean click rate within 3 standard errors of mean p
    p = da["p_click"].to_numpy()
    assert abs(da["click"].mean() - p.mean()) < 3 * np.sqrt((p * (1 - p)).sum()) / len(p)
    assert (tmp_path / "a.users.parquet").is_file() and (tmp_path / "a.items.parquet").is_file()
    with pytest.raises(ConfigError, match="n_rows"):
        generate(tmp_path / "c.parquet", n_users=5, n_items=10, n_rows=0, seed=1)


def test_synthetic_propensity_moves_a_user_within_a_period_and_changes_nothing_else(tmp_path):
    """``propensity_sigma`` adds c_u(period) to every logit of user u in that period, drawn from its
    own stream: users, items, times and (without it) the probabilities are the same draws."""
    kw = dict(n_users=40, n_items=30, n_rows=20_000, seed=5, chunk_rows=7000, propensity_periods=10)
    base = pl.read_parquet(generate(tmp_path / "a.parquet", **kw))
    prop = pl.read_parquet(generate(tmp_path / "b.parquet", **kw, propensity_sigma=0.8, propensity_rho=0.5))
    assert base.select("user_id", "item_id", "timestamp").equals(prop.select("user_id", "item_id", "timestamp"))
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    d = logit(prop["p_click"].to_numpy().astype(np.float64)) - logit(base["p_click"].to_numpy().astype(np.float64))
    t = base["timestamp"].to_numpy()
    from metactr.data.synth import START

    period = np.minimum((t - START) * 10 // (180 * 86_400), 9)  # the generator's periods (days=180)
    frame = pl.DataFrame({"u": base["user_id"], "q": period, "d": d})
    g = frame.group_by("u", "q").agg(pl.col("d").std().alias("sd"), pl.col("d").mean().alias("m"), pl.len())
    assert g.filter(pl.col("len") > 1)["sd"].max() < 1e-3  # one shift per user and period
    assert 0.6 < g["m"].std() < 1.0  # across users and periods: about propensity_sigma
    again = pl.read_parquet(generate(tmp_path / "c.parquet", **kw, propensity_sigma=0.8, propensity_rho=0.5))
    assert again.equals(prop)
    with pytest.raises(ConfigError, match="propensity_rho"):
        generate(tmp_path / "d.parquet", **kw, propensity_sigma=0.5, propensity_rho=1.5)


# ------------------------------------------------------------------------------- real data
def pandas_rml_recount(ratings: pd.DataFrame, prep: Path, *, threshold: float, min_user: int = 20,
                       subset_min: int = 20) -> dict:
    """Counts per split by a straightforward pandas recount (uses only the seeded user draw)."""
    df = ratings.reset_index(drop=True)
    df["order"] = np.arange(len(df))
    df = df.sort_values(["user", "timestamp", "order"])
    n_per_user = df.groupby("user")["item"].transform("size")
    df = df[n_per_user >= min_user]
    item_counts = df.groupby("item").size()
    warm_items = set(item_counts[item_counts > item_counts.quantile(0.5)].index)
    uv = pd.read_parquet(prep / "vocab" / "user_id.parquet")
    groups = pd.read_parquet(prep / "protocol" / "user_groups.parquet").merge(uv, left_on="user_id", right_on="code")
    cold = set(groups.loc[groups["cold"], "raw"])
    assert len(cold) == round(0.2 * df["user"].nunique())
    out = {}
    for subset in ("wc", "cw"):
        in_sub = df["user"].isin(cold) == (subset == "cw")
        in_sub &= df["item"].isin(warm_items) == (subset == "cw")
        sub = df[in_sub]
        n = sub.groupby("user").size()
        sub = sub[sub["user"].isin(n[n >= subset_min].index)]
        n = n[n >= subset_min]
        pos_in_user = sub.groupby("user").cumcount()
        is_target = pos_in_user >= 1
        is_last = pos_in_user == sub.groupby("user")["item"].transform("size") - 1
        lab = sub["rating"] >= threshold
        out[f"{subset}_train"] = {"rows": int((n - 2).sum()), "users": int(len(n)),
                                  "positives": int((lab & is_target & ~is_last).sum())}
        out[f"{subset}_holdout"] = {"rows": int(len(n)), "positives": int((lab & is_last).sum())}
    return out


def check_against_recount(prep: Path, ratings: pd.DataFrame, threshold: float):
    meta = json.loads((prep / "meta.json").read_text())
    rc = pandas_rml_recount(ratings, prep, threshold=threshold)
    for subset in ("wc", "cw"):
        tr = meta["splits"][f"{subset}_train"]
        assert tr["rows"] == rc[f"{subset}_train"]["rows"]
        assert tr["users"] == rc[f"{subset}_train"]["users"]
        assert round(tr["pos_rate"] * tr["rows"]) == rc[f"{subset}_train"]["positives"]
        hold = [meta["splits"][f"{subset}_{p}"] for p in ("finetune_a", "finetune_b", "finetune_c", "test")]
        assert sum(h["rows"] for h in hold) == rc[f"{subset}_holdout"]["rows"]
        assert sum(h["users"] for h in hold) == rc[f"{subset}_holdout"]["rows"]  # one session per user
        assert sum(round((h["pos_rate"] or 0) * h["rows"]) for h in hold) == rc[f"{subset}_holdout"]["positives"]
    ds = PreparedDataset(prep)
    assert len(ds.split("wc_train")) == meta["splits"]["wc_train"]["rows"]


def test_ml100k_full_pipeline_matches_pandas_recount(real_data, tmp_path):
    src = real_data("ml-100k")
    prep = prepare("ml-100k", src, tmp_path / "p")
    ratings = pd.read_csv(src / "u.data", sep="\t", names=["user", "item", "rating", "timestamp"])
    check_against_recount(prep, ratings, 4)


def test_ml1m_partial_full_pipeline_matches_pandas_recount(real_data, tmp_path):
    src = real_data("ml-1m-partial")
    prep = prepare("ml-1m", src, tmp_path / "p", PrepareConfig(label={"threshold": 3}))
    ratings = pd.read_csv(src / "ratings.dat", sep="::", engine="python",
                          names=["user", "item", "rating", "timestamp"])
    check_against_recount(prep, ratings, 3)
    items = pl.read_parquet(prep / "items.parquet")
    assert items.height == 3883 and items["genres"].dtype == pl.List(pl.Int32)


def test_avazu_sample_pipeline(real_data, tmp_path):
    cfg = PrepareConfig(protocol="random", filter={"min_user_interactions": 2, "dedupe": "none"})
    prep = prepare("avazu", real_data("avazu-sample"), tmp_path / "p", cfg)
    meta = json.loads((prep / "meta.json").read_text())
    assert meta["label_rule"].startswith("label column")
    users = pd.read_csv(real_data("avazu-sample") / "train_head9999.csv", usecols=["device_id", "device_ip",
                                                                                   "device_model"], dtype=str)
    key = np.where(users["device_id"] == "a99f214a", users["device_ip"] + "|" + users["device_model"],
                   users["device_id"])
    n = pd.Series(key).value_counts()
    assert sum(s["rows"] for s in meta["splits"].values()) == int((n[n >= 2] - 1).sum())
    assert meta["interactions"]["users"] == int((n >= 2).sum())
    ds = PreparedDataset(prep)
    assert len(ds.split("train")) == meta["splits"]["train"]["rows"]


def test_published_ml1m_rml_loads_with_readme_counts(real_data):
    ds = PreparedDataset(real_data("ml-1m-rml"))
    want = {"wc_train": 34_263, "wc_finetune_a": 128, "wc_finetune_b": 128, "wc_finetune_c": 128, "wc_test": 320,
            "cw_train": 88_994, "cw_finetune_a": 128, "cw_finetune_b": 128, "cw_finetune_c": 128, "cw_test": 248}
    assert {n: len(ds.split(n)) for n in want} == want
    from metactr.data.stats import split_stats

    rows = {r["split"]: r for r in split_stats(real_data("ml-1m-rml"))}
    assert rows["wc_train"]["users"] == 704 and rows["cw_train"]["users"] == 632
    assert abs(rows["cw_test"]["pos_rate"] - 0.794) < 1e-3


def test_synthetic_folder_and_custom_dataset_prepare(tmp_path, synth_log):
    folder_out = prepare("synthetic", synth_log.parent, tmp_path / "from_folder", PrepareConfig(protocol="random"))
    assert json.loads((folder_out / "meta.json").read_text())["interactions"]["rows"] > 0
    # the same log as a bring-your-own CSV described by a schema
    log = pl.read_parquet(synth_log).join(pl.read_parquet(synth_log.with_name("log.items.parquet")), on="item_id")
    log.select("user_id", "item_id", "timestamp", "click", "topic").write_csv(tmp_path / "clicks.csv")
    schema = tmp_path / "schema.yaml"
    schema.write_text("file: clicks.csv\ncolumns: {user: user_id, item: item_id, time: timestamp, label: click}\n"
                      "item_features: [topic]\n")
    out = prepare("custom", tmp_path, tmp_path / "custom", PrepareConfig(custom_schema=str(schema)))
    ds = PreparedDataset(out)
    assert [f.name for f in ds.spec.item] == ["item_id", "topic"]
    ref = json.loads((prepare("synthetic", synth_log, tmp_path / "ref") / "meta.json").read_text())
    got = json.loads((out / "meta.json").read_text())
    # same log, same config: the same split sizes whatever the source format
    assert {k: v["rows"] for k, v in got["splits"].items()} == {k: v["rows"] for k, v in ref["splits"].items()}


def test_label_not_binary_and_missing_timestamp_name_the_line(tmp_path):
    log = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 3], "timestamp": [1, 2, 3],
                  "click": [0, 2, 1]}).write_parquet(log)
    with pytest.raises(DataError) as e:
        prepare("synthetic", log, tmp_path / "o")
    assert e.value.line == 2 and e.value.field == "label" and "log.parquet" in str(e.value)
    pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, None],
                  "click": [0, 1]}).write_parquet(log)
    with pytest.raises(DataError) as e:
        prepare("synthetic", log, tmp_path / "o")
    assert e.value.field == "timestamp" and e.value.line == 2
    pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [1]}).write_parquet(log)
    with pytest.raises(DataError, match="label column"):
        prepare("synthetic", log, tmp_path / "o")
    assert not (tmp_path / "o").exists()
