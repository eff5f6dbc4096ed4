"""The ``rml.holdout: future`` protocol: a time cut, then consecutive FT-A/B/C/test windows."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metactr.config import validate
from metactr.data.pipeline import PrepareConfig, build_prepared
from metactr.data.readers import RawData
from metactr.data.split import RML_PARTS, future_bounds
from metactr.data.stats import split_stats, stats_warnings
from metactr.errors import ConfigError
from test_data_split import random_log

HELD = RML_PARTS[1:]


def _frames(prep: Path, subset: str) -> dict[str, pl.DataFrame]:
    return {p: pl.read_parquet(prep / f"{subset}_{p}.parquet") for p in RML_PARTS}


def _log(n_users: int = 60, seed: int = 0, distinct_times: bool = True) -> RawData:
    """Users whose activity spans overlapping periods of a common clock."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(25, 60))
        start = int(rng.integers(0, 5000))
        items = rng.choice(400, size=n, replace=False)
        times = start + np.sort(rng.choice(5000, size=n, replace=False))
        for i, t in zip(items, times, strict=True):
            rows.append((u, int(i), int(t) * 1000 + u if distinct_times else 0, float(rng.integers(1, 6))))
    df = pl.DataFrame(rows, schema=["user", "item", "timestamp", "rating"], orient="row")
    return RawData(interactions=df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_users=st.integers(4, 25), stride=st.integers(1, 3),
       start=st.sampled_from([0.3, 0.5, 0.7, 0.9]), ties=st.floats(0, 1),
       windows=st.sampled_from([(1, 1, 1, 3), (1, 1, 1, 1), (0, 0, 0, 1), (2, 0, 1, 1)]))
def test_future_split_properties(seed, n_users, stride, start, ties, windows):
    raw = random_log(seed, n_users, 40, 400, ties)
    base = {"seed": seed, "filter": {"min_user_interactions": 3}, "session": {"max_len": 4, "stride": stride}}
    cfg = PrepareConfig(**base, rml={"subset_min_interactions": 6, "holdout": "future", "future_start": start,
                                     "future_windows": windows})
    ref_cfg = PrepareConfig(**base, rml={"subset_min_interactions": 6, "holdout": "temporal"})
    with tempfile.TemporaryDirectory() as td:
        prep, ref = Path(td) / "f", Path(td) / "t"
        prep.mkdir(), ref.mkdir()
        try:
            meta = build_prepared(raw, prep, dataset="t", cfg=cfg)
        except Exception as e:  # only acceptable failure: nothing left after filtering
            assert "interactions" in str(e)
            return
        build_prepared(raw, ref, dataset="t", cfg=ref_cfg)
        for subset in ("wc", "cw"):
            got = _frames(prep, subset)
            want = pl.concat(list(_frames(ref, subset).values()))
            allf = pl.concat(list(got.values()))
            key = ["user_id", "target_item_id", "timestamp"]
            # the same sessions as the other holdouts (every user counts), each exactly once
            assert allf.sort(key).equals(want.sort(key))
            ts = want["timestamp"].to_numpy()
            if not len(ts):
                continue
            cut = np.sort(ts)[max(1, round(start * len(ts))) - 1]  # plain reference quantile
            assert meta["protocol_facts"][f"{subset}_future_cut"] == cut
            assert (got["train"]["timestamp"] <= cut).all()
            held = [got[p]["timestamp"].to_numpy() for p in HELD]
            assert all((h > cut).all() for h in held)
            # consecutive windows in time: nothing of a later window before anything of an earlier one
            nonempty = [h for h in held if len(h)]
            assert all(a.max() <= b.min() for a, b in zip(nonempty, nonempty[1:]))
            n_held = sum(len(h) for h in held)
            if windows == (0, 0, 0, 1):
                assert all(len(h) == 0 for h in held[:3])
            if len(np.unique(ts)) == len(ts):  # no ties: the window sizes are exact
                ends = np.rint(np.cumsum(windows) / sum(windows) * n_held).astype(int)
                assert np.cumsum([len(h) for h in held]).tolist() == ends.tolist()
            # the session of every held-out target reaches back only (its items are earlier rows)
            for p in HELD:
                assert (got[p]["hist_item_ids"].list.len() >= 1).all()


def test_future_defaults_send_half_of_the_held_out_sessions_to_test(tmp_path):
    raw = _log()
    meta = build_prepared(raw, tmp_path, dataset="t", cfg=PrepareConfig(rml={"holdout": "future"}))
    for subset in ("wc", "cw"):
        n = {p: meta["splits"][f"{subset}_{p}"]["rows"] for p in RML_PARTS}
        total, held = sum(n.values()), sum(n[p] for p in HELD)
        assert abs(held - round(0.3 * total)) <= 1
        assert abs(n["test"] - held / 2) <= 1
        assert abs(n["finetune_a"] - held / 6) <= 1 and abs(n["finetune_b"] - held / 6) <= 1
        # users overlap train and test (a user active on both sides of the cut is in both), and
        # the test set holds many sessions of the same users (unlike paper/temporal)
        fr = _frames(tmp_path, subset)
        assert set(fr["test"]["user_id"]) & set(fr["train"]["user_id"])
        assert fr["test"].height > fr["test"]["user_id"].n_unique()
        b = meta["protocol_facts"][f"{subset}_future_bounds"]
        assert b == sorted(b) and meta["protocol_facts"][f"{subset}_future_cut"] < b[0]
    assert meta["protocol_facts"]["future_order"] == "timestamp"
    assert not [w for w in stats_warnings(split_stats(tmp_path), meta) if w.startswith("note")]


def test_future_without_timestamps_cuts_by_file_order(tmp_path):
    raw = _log(distinct_times=False)  # timestamp = file order, as readers without time give
    raw.interactions = raw.interactions.with_columns(pl.col("row").alias("timestamp"))
    raw.has_time = False
    meta = build_prepared(raw, tmp_path, dataset="t", cfg=PrepareConfig(rml={"holdout": "future"}))
    assert meta["protocol_facts"]["future_order"] == "file order (no timestamps)"
    notes = [w for w in stats_warnings(split_stats(tmp_path), meta) if "file order" in w]
    assert len(notes) == 1 and "\n" not in notes[0]
    fr = _frames(tmp_path, "wc")
    assert fr["train"]["timestamp"].max() < fr["finetune_a"]["timestamp"].min()


def test_future_bounds_edge_cases():
    cut, b = future_bounds(np.arange(10), 0.7, (1, 1, 1, 3))
    # 3 held out, cumulative window ends rint([0.5, 1, 1.5]) = [0, 1, 2]: FT-A is empty (bound = cut)
    assert cut == 6 and b.tolist() == [6, 7, 8]
    assert np.searchsorted(b, [7, 8, 9]).tolist() == [1, 2, 3]
    cut, b = future_bounds(np.array([5, 5, 5, 5]), 0.5, (1, 1, 1, 3))
    assert cut == 5 and (b == 5).all()  # all tied: nothing is after the cut
    cut, b = future_bounds(np.array([], dtype=np.int64), 0.7, (1, 1, 1, 3))
    assert b.shape == (3,)


def test_small_test_sets_warn_in_one_line(tmp_path):
    rows = [{"split": "wc_train", "samples": 50}, {"split": "wc_test", "samples": 7},
            {"split": "cw_test", "samples": 1200}, {"split": "ms_test", "samples": 999}]
    w = stats_warnings(rows, {"protocol": "rml"})
    assert len(w) == 1 and "wc_test 7" in w[0] and "ms_test 999" in w[0] and "cw_test" not in w[0]
    assert "rml.holdout=future" in w[0]
    assert "future" not in stats_warnings(rows, {"protocol": "metaselector"})[0]
    assert stats_warnings([{"split": "test", "samples": 1000}]) == []


@pytest.mark.parametrize("override,fieldname", [
    ({"future_windows": [1, 1, 1, 0]}, "rml.future_windows.3"),
    ({"future_windows": [1, 1, 1]}, "rml.future_windows.3"),  # the missing fourth (test) window
    ({"future_windows": [-1, 1, 1, 3]}, "rml.future_windows.0"),
    ({"future_start": 1.0}, "rml.future_start"),
    ({"test_sessions": 0}, "rml.test_sessions"),
    ({"holdout": "later"}, "rml.holdout"),
])
def test_bad_holdout_config_names_the_key(override, fieldname):
    with pytest.raises(ConfigError) as e:
        validate(PrepareConfig, {"rml": override})
    assert e.value.field == fieldname
