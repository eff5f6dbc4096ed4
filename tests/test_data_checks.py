"""Values checked at the reader boundary (on_bad_rows error|skip), canonical ids (the same
interactions give the same split whatever the reader), corrupt and missing files named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from metactr.data.pipeline import PrepareConfig, prepare
from metactr.data.prepared import PreparedDataset
from metactr.data.readers import read_dataset
from metactr.errors import ConfigError, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def ml100k(tmp: Path, extra: str = "") -> Path:
    d = tmp / "ml-100k"
    rows = "".join(f"{u}\t{10 + i}\t{1 + (u + i) % 5}\t{1000 + 10 * i}\n" for u in (1, 2, 3) for i in range(6))
    write(d / "u.data", rows + extra)
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|30|M|writer|1\n")
    flags = "|".join(["0"] * 18 + ["1"])
    write(d / "u.item", "".join(f"{10 + i}|Film {i} (1995)|01-Jan-1995||u|{flags}\n" for i in range(6)))
    return d


@pytest.mark.parametrize("extra,field,needle", [
    ("1\t16\t7.5\t2000\n", "rating", "rating 7.5 outside 1-5 (ML-100K's documented range)"),
    ("1\t16\t-3\t2000\n", "rating", "outside 1-5"),
    ("1\t16\tnan\t2000\n", "rating", "not a finite number"),
    ("1\t16\t3.5\t2000\n", "rating", "not a multiple of 1"),
    ("\t16\t3\t2000\n", "user", "empty user"),
    ("1\t16\t3\t1400000000000\n", "timestamp", "milliseconds or microseconds?"),
    ("1\t16\t3\t-5\n", "timestamp", "between 1970 and 2100"),
])
def test_impossible_values_name_file_line_field(tmp_path, extra, field, needle):
    d = ml100k(tmp_path, extra)
    with pytest.raises(DataError) as e:
        read_dataset("ml-100k", d)
    assert e.value.line == 19 and e.value.field == field and needle in str(e.value) and "u.data" in str(e.value)


def test_skip_drops_counts_and_records_in_meta(tmp_path):
    d = ml100k(tmp_path, "1\t16\t7.5\t2000\n2\t16\tnan\t2000\n\t16\t3\t2000\n3\t16\t3\t99999999999\n")
    raw = read_dataset("ml-100k", d, on_bad_rows="skip")
    assert raw.interactions.height == 18
    assert raw.bad_rows == {"policy": "skip", "skipped": 4, "by_field": {"user": 1, "rating": 2, "timestamp": 1},
                            "first_lines": [19, 20, 21, 22]}
    out = prepare("ml-100k", d, tmp_path / "out", PrepareConfig(protocol="random", on_bad_rows="skip",
                                                                filter={"min_user_interactions": 2}))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["bad_rows"]["skipped"] == 4 and meta["interactions"]["rows"] == 18
    assert any("skipped 4 bad rows" in n for n in meta["notes"])
    clean = prepare("ml-100k", ml100k(tmp_path / "c"), tmp_path / "out2",
                    PrepareConfig(protocol="random", filter={"min_user_interactions": 2}))
    assert json.loads((clean / "meta.json").read_text())["bad_rows"] == {"policy": "error", "skipped": 0,
                                                                         "by_field": {}}
    with pytest.raises(ConfigError, match="on_bad_rows"):
        read_dataset("ml-100k", d, on_bad_rows="ignore")


def test_skip_also_drops_unparseable_values_and_all_bad_is_an_error(tmp_path):
    d = ml100k(tmp_path, "1\t16\tfive\t2000\n")
    with pytest.raises(DataError, match="cannot parse 'five'"):
        read_dataset("ml-100k", d)
    assert read_dataset("ml-100k", d, on_bad_rows="skip").bad_rows["by_field"] == {"rating": 1}
    bad = tmp_path / "bad"
    write(bad / "u.data", "1\t16\tnan\t2000\n")
    for f in ("u.user", "u.item"):
        write(bad / f, (d / f).read_text())
    with pytest.raises(DataError, match="no valid interactions"):
        read_dataset("ml-100k", bad, on_bad_rows="skip")


def test_other_readers_check_values(tmp_path):
    amz = write(tmp_path / "amz" / "r.csv", "A1,B1,5.0,1400000000\nA2,B1,6.0,1400000100\n")
    with pytest.raises(DataError) as e:
        read_dataset("amazon", amz.parent)
    assert e.value.line == 2 and e.value.field == "rating" and "outside 1-5" in str(e.value)
    write(amz, "A1,,5.0,1400000000\n")
    with pytest.raises(DataError, match="empty item"):
        read_dataset("amazon", amz.parent)
    pl.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1_600_000_000, 5_000_000_000],
                  "click": [0, 1]}).write_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError) as e:
        read_dataset("synthetic", tmp_path / "log.parquet")
    assert e.value.line == 2 and e.value.field == "timestamp"
    raw = read_dataset("synthetic", tmp_path / "log.parquet", on_bad_rows="skip")
    assert raw.interactions.height == 1 and raw.bad_rows["by_field"] == {"timestamp": 1}


def test_error_messages_name_the_real_separator_and_hint_a_header(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::10::5::100\n1::20::3\n")
    write(d / "users.dat", "1::F::1::10::48067\n")
    write(d / "movies.dat", "10::A (2001)::Comedy\n")
    with pytest.raises(DataError) as e:
        read_dataset("ml-1m", d)
    assert "separated by '::'" in str(e.value) and "\\x1f" not in str(e.value) and "'1::20::3'" in str(e.value)
    amz = write(tmp_path / "amz" / "r.csv", "user,item,rating,timestamp\nA1,B1,5.0,1400000000\n")
    with pytest.raises(DataError) as e:
        read_dataset("amazon", amz.parent)
    assert "has_header: true" in str(e.value) and e.value.line == 1
    assert read_dataset("amazon", amz.parent, has_header=True).interactions.height == 1


def test_canonical_ids():
    from metactr.data.readers.checks import canonical_id_columns

    a, b = canonical_id_columns([pl.Series([" 10", "2", "-1"]), pl.Series([2, 10])])
    assert a.dtype == pl.Int64 and a.to_list() == [10, 2, -1] and b.to_list() == [2, 10]
    a, = canonical_id_columns([pl.Series(["007", "7"])])  # '007' and '7' are different ids: stay text
    assert a.to_list() == ["007", "7"]
    a, = canonical_id_columns([pl.Series(["B01", "10"])])
    assert a.dtype == pl.String


def _same_log(tmp: Path) -> Path:
    rng = np.random.default_rng(3)
    n = 4000
    users = rng.integers(1, 120, n)
    items = rng.integers(1, 300, n)
    ts = 1_000_000 + rng.integers(0, 500, n)  # many ties: file order breaks them
    ratings = rng.integers(1, 6, n)
    lines = "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in zip(users, items, ratings, ts, strict=True))
    return write(tmp / "log" / "ratings.csv", lines)


@pytest.mark.parametrize("protocol", ["rml", "random", "metaselector"])
def test_same_file_through_two_readers_gives_the_same_split(tmp_path, protocol):
    """The amazon reader reads ids as text, the custom schema as it finds them: before the
    canonical ids the two gave different seeded draws (issue 18)."""
    log = _same_log(tmp_path)
    schema = write(tmp_path / "schema.yaml", "file: log/ratings.csv\nhas_header: false\n"
                   "columns: {user: column_1, item: column_2, rating: column_3, time: column_4}\n")
    cfg = dict(protocol=protocol, filter={"min_user_interactions": 10},
               rml={"subset_min_interactions": 5, "finetune_users": 2})
    # the same rows as typed Parquet (integer ids, as a database export would give them)
    pl.read_csv(log, has_header=False, new_columns=["u", "i", "r", "t"]).write_parquet(tmp_path / "log.parquet")
    pq_schema = write(tmp_path / "pq.yaml", "file: log.parquet\nformat: parquet\n"
                      "columns: {user: u, item: i, rating: r, time: t}\n")
    a = prepare("amazon", log.parent, tmp_path / "a", PrepareConfig(**cfg))
    for other, sch in (("b", schema), ("c", pq_schema)):
        b = prepare("custom", log.parent, tmp_path / other, PrepareConfig(**cfg, custom_schema=str(sch)))
        splits = sorted(p.name for p in a.glob("*.parquet"))
        assert splits == sorted(p.name for p in b.glob("*.parquet")) and len(splits) >= 3
        for name in splits:
            assert pl.read_parquet(a / name).equals(pl.read_parquet(b / name)), (other, name)
        for v in ("user_id", "item_id"):
            assert pl.read_parquet(a / "vocab" / f"{v}.parquet").equals(pl.read_parquet(b / "vocab" / f"{v}.parquet"))


def test_corrupt_parquet_and_missing_prepared_files_are_named(tmp_path):
    log = tmp_path / "log.parquet"
    rng = np.random.default_rng(0)
    pl.DataFrame({"user_id": np.repeat(np.arange(10), 30), "item_id": rng.integers(0, 50, 300),
                  "timestamp": 1_600_000_000 + np.arange(300), "click": rng.integers(0, 2, 300)}).write_parquet(log)
    out = prepare("synthetic", log, tmp_path / "prep", PrepareConfig(protocol="random"))
    data = log.read_bytes()
    log.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError) as e:
        prepare("synthetic", log, tmp_path / "prep2", PrepareConfig(protocol="random"))
    assert "log.parquet" in str(e.value) and "cannot read Parquet" in str(e.value)
    items = (out / "items.parquet").read_bytes()
    (out / "items.parquet").unlink()
    with pytest.raises(DataError) as e:
        PreparedDataset(out)
    assert e.value.path.endswith("items.parquet") and "missing prepared file" in str(e.value)
    (out / "items.parquet").write_bytes(items)
    valid = (out / "valid.parquet").read_bytes()
    (out / "valid.parquet").unlink()
    with pytest.raises(DataError, match="valid.parquet"):
        PreparedDataset(out)
    (out / "valid.parquet").write_bytes(valid)
    assert len(PreparedDataset(out).split("valid")) > 0
    train = out / "train.parquet"
    train.write_bytes(train.read_bytes()[:40])  # truncated split
    with pytest.raises(DataError) as e:
        PreparedDataset(out)
    assert e.value.path.endswith("train.parquet") and "cannot read Parquet" in str(e.value)
