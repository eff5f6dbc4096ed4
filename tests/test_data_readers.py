"""Readers on tiny files built here, their error paths, and the real sample files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from metactr.data.readers import read_dataset, reader_names
from metactr.errors import ConfigError, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def ml1m(tmp: Path, ratings: str | None = None) -> Path:
    d = tmp / "ml-1m"
    write(d / "ratings.dat", ratings or "1::10::5::100\n1::20::3::90\n2::10::4::50\n")
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    write(d / "movies.dat", "10::Amélie (2001)::Comedy|Romance\n20::Heat (1995)::Action|Crime|Thriller\n",
          encoding="latin-1")
    return d


def test_reader_registry_lists_every_dataset():
    assert set(reader_names()) >= {"ml-1m", "ml-100k", "book-crossing", "avazu", "amazon", "custom", "synthetic"}


def test_ml1m_reader(tmp_path):
    raw = read_dataset("ml-1m", ml1m(tmp_path))
    assert raw.interactions.columns == ["row", "user", "item", "rating", "timestamp"]
    assert raw.interactions["user"].to_list() == [1, 1, 2]
    items = raw.items.sort("item")
    assert items["year"].to_list() == ["2001", "1995"]
    assert items["genres"].to_list() == [["Comedy", "Romance"], ["Action", "Crime", "Thriller"]]
    assert raw.users.columns == ["user", "gender", "age", "occupation", "zip"]


@pytest.mark.parametrize("ratings,line,needle", [
    ("1::10::5::100\n1::20::3\n", 2, "expected 4 fields"),
    ("1::10::5::100\n1,20,3,90\n", 2, "wrong separator"),
    ("1::10::5::100\n1::x::3::90\n", 2, "cannot parse 'x'"),
])
def test_ml1m_malformed_lines_name_file_and_line(tmp_path, ratings, line, needle):
    d = ml1m(tmp_path, ratings)
    with pytest.raises(DataError) as e:
        read_dataset("ml-1m", d)
    assert e.value.line == line and needle in str(e.value) and "ratings.dat" in str(e.value)


def test_ml1m_missing_file_and_bad_encoding(tmp_path):
    d = ml1m(tmp_path)
    (d / "users.dat").unlink()
    with pytest.raises(DataError, match="users.dat"):
        read_dataset("ml-1m", d)
    d = ml1m(tmp_path / "b")
    with pytest.raises(DataError) as e:  # latin-1 title read as UTF-8
        read_dataset("ml-1m", d, encoding="utf-8")
    assert e.value.line == 1 and "movies.dat" in str(e.value)


def test_unknown_reader_option_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match="reader.bogus"):
        read_dataset("ml-1m", ml1m(tmp_path), bogus=1)
    with pytest.raises(ConfigError, match="unknown dataset"):
        read_dataset("nope", tmp_path)


def test_ml100k_reader(tmp_path):
    d = tmp_path / "ml-100k"
    write(d / "u.data", "1\t10\t5\t100\n2\t10\t2\t50\n")
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"
    write(d / "u.item", "10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
          "11|unknown||||" + "|".join(["1"] + ["0"] * 18) + "\n", encoding="latin-1")
    raw = read_dataset("ml-100k", d)
    items = raw.items.sort("item")
    assert items["genres"].to_list() == [["Action", "Comedy"], ["unknown"]]
    assert items["year"].to_list() == ["1995", None]
    assert raw.interactions["rating"].to_list() == [5.0, 2.0]


def test_book_crossing_reader(tmp_path):
    d = tmp_path / "bx"
    write(d / "BX-Book-Ratings.csv", '"User-ID";"ISBN";"Book-Rating"\n"1";"034545104X";"0"\n'
          '"1";"0155061224";"5"\n"2";"0446520802";"8"\n', encoding="latin-1")
    write(d / "BX-Users.csv", '"User-ID";"Location";"Age"\n"1";"nyc, new york, usa";NULL\n'
          '"2";"stockton, california, usa";"18"\n', encoding="latin-1")
    write(d / "BX-Books.csv", '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"S";"M";"L"\n'
          '"034545104X";"Flesh Tones";"M. J. Rose";"2002";"Ballantine";"s";"m";"l"\n'
          '"0155061224";"Bad line";"X";"2000"\n', encoding="latin-1")
    raw = read_dataset("book-crossing", d)
    assert raw.interactions["rating"].to_list() == [5.0, 8.0]  # implicit 0 dropped by default
    assert not raw.has_time and raw.interactions["timestamp"].to_list() == [1, 2]  # file order
    assert raw.notes == ["BX-Books.csv: skipped 1 malformed lines"]
    assert raw.users.sort("user")["age_decade"].to_list() == [None, 10]
    neg = read_dataset("book-crossing", d, implicit="negative")
    assert neg.interactions["rating"].to_list() == [0.0, 5.0, 8.0]
    pos = read_dataset("book-crossing", d, implicit="positive")
    assert pos.interactions["rating"].to_list() == [10.0, 5.0, 8.0]
    with pytest.raises(DataError) as e:
        read_dataset("book-crossing", d, bad_lines="error")
    assert e.value.line == 3 and "BX-Books.csv" in str(e.value)
    with pytest.raises(ConfigError):
        read_dataset("book-crossing", d, implicit="maybe")


AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n")


def avazu_row(click, hour, device_id, ip, model, c14):
    return f"1,{click},{hour},1005,0,s,sd,sc,a,ad,ac,{device_id},{ip},{model},1,2,{c14},320,50,1722,0,35,-1,79\n"


def test_avazu_reader_user_rule(tmp_path):
    p = write(tmp_path / "av" / "train.csv", AVAZU_HEADER + avazu_row(0, 14102100, "a99f214a", "ip1", "m1", 15706)
              + avazu_row(1, 14102101, "dev9", "ip2", "m2", 15704) + avazu_row(0, 14102101, "a99f214a", "ip1", "m1", 1))
    raw = read_dataset("avazu", p.parent)
    inter = raw.interactions
    assert inter["user"].to_list() == ["ip1|m1", "dev9", "ip1|m1"]
    assert inter["item"].to_list() == [15706, 15704, 1]  # canonical ids: all integers -> Int64
    assert inter["label"].to_list() == [0, 1, 0]
    assert inter["timestamp"][1] - inter["timestamp"][0] == 3600  # 2014-10-21 00:00 -> 01:00 UTC
    assert inter["timestamp"][0] == 1413849600
    bad = write(tmp_path / "av2" / "train.csv", AVAZU_HEADER + avazu_row(0, "1410210x", "d", "i", "m", 1))
    with pytest.raises(DataError) as e:
        read_dataset("avazu", bad.parent)
    assert e.value.line == 2 and e.value.field == "hour"
    semi = write(tmp_path / "av3" / "train.csv", AVAZU_HEADER.replace(",", ";"))
    with pytest.raises(DataError, match="separator"):
        read_dataset("avazu", semi.parent)


def test_avazu_sample(real_data):
    raw = read_dataset("avazu", real_data("avazu-sample"))
    assert raw.interactions.height == 9999
    assert raw.interactions["label"].is_in([0, 1]).all()
    assert raw.interactions["timestamp"].n_unique() == 1  # all rows are from the first hour


def test_amazon_reader_with_metadata(tmp_path):
    d = tmp_path / "amz"
    write(d / "ratings_Electronics.csv", "A1,B01,5.0,1400000000\nA2,B01,3.0,1400000100\nA1,B02,4.0,1300000000\n")
    write(d / "meta_Electronics.json", json.dumps({"asin": "B01", "category": ["Electronics", "Audio"]}) + "\n"
          + json.dumps({"asin": "B02", "categories": [["Electronics", "Cables"]]}) + "\n")
    raw = read_dataset("amazon", d)
    assert raw.interactions["rating"].to_list() == [5.0, 3.0, 4.0]
    assert sorted(raw.items["category"].to_list()[1]) == ["Cables", "Electronics"]
    write(d / "meta_Electronics.json", "{'asin': 'B01'}\n")  # python-literal line: not JSON
    with pytest.raises(DataError) as e:
        read_dataset("amazon", d)
    assert e.value.line == 1
    write(d / "ratings_Electronics.csv", "A1,B01,5.0,1400000000\nA2,B01,five,1400000100\n")
    (d / "meta_Electronics.json").unlink()
    with pytest.raises(DataError) as e:
        read_dataset("amazon", d)
    assert e.value.line == 2 and e.value.field == "rating"


def custom_schema(tmp: Path, **over) -> Path:
    import yaml

    src = Path(__file__).resolve().parents[1] / "configs" / "data" / "custom_example.yaml"
    schema = yaml.safe_load(src.read_text())
    # the log's own columns only (side tables: tests/test_data_movielens_csv.py)
    schema.update({"user_table": None, "item_table": None, "item_features": ["category", "tags"],
                   "multi_valued": ["tags"]}, **over)
    p = tmp / "schema.yaml"
    p.write_text(yaml.safe_dump(schema))
    return p


def test_custom_reader_example_schema(tmp_path):
    write(tmp_path / "clicks.csv", "uid,sku,ts,clicked,age_band,category,tags\n"
          "u1,s1,10,1,20s,shoes,red|sale\nu1,s2,20,0,20s,bags,\nu2,s1,15,1,30s,shoes,red|sale\n")
    raw = read_dataset("custom", tmp_path, schema=str(custom_schema(tmp_path)))
    assert raw.interactions["label"].to_list() == [1, 0, 1]
    items = raw.items.sort("item")
    assert items["tags"].to_list() == [["red", "sale"], []]
    assert raw.users.sort("user")["age_band"].to_list() == ["20s", "30s"]


@pytest.mark.parametrize("csv,field,line", [
    ("uid,sku,ts,clicked,age_band,category,tags\nu1,s1,10,2,a,b,c\n", "clicked", 2),
    ("uid,sku,ts,clicked,age_band,category,tags\nu1,s1,ten,1,a,b,c\n", "ts", 2),
    ("uid,sku,ts,age_band,category,tags\nu1,s1,10,a,b,c\n", "clicked", None),
])
def test_custom_reader_errors(tmp_path, csv, field, line):
    write(tmp_path / "clicks.csv", csv)
    with pytest.raises(DataError) as e:
        read_dataset("custom", tmp_path, schema=str(custom_schema(tmp_path)))
    assert e.value.field == field and e.value.line == line


def test_custom_schema_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        read_dataset("custom", tmp_path, schema=str(custom_schema(tmp_path, colour="red")))
    with pytest.raises(ConfigError, match="exactly one"):
        read_dataset("custom", tmp_path, schema=str(custom_schema(
            tmp_path, columns={"user": "uid", "item": "sku", "label": "c", "rating": "r"})))


def test_custom_reader_parquet_with_rating_and_time_format(tmp_path):
    pl.DataFrame({"u": ["a", "a"], "i": [1, 2], "when": ["2020-01-01 10:00:00", "2020-01-02 10:00:00"],
                  "stars": [5, 2]}).write_parquet(tmp_path / "log.parquet")
    p = custom_schema(tmp_path, file="log.parquet", format="parquet", time_format="%Y-%m-%d %H:%M:%S",
                      columns={"user": "u", "item": "i", "time": "when", "rating": "stars"},
                      user_features=[], item_features=[], multi_valued=[])
    raw = read_dataset("custom", tmp_path, schema=str(p))
    assert raw.interactions["timestamp"].to_list() == [1577872800, 1577959200]
    assert raw.interactions["rating"].to_list() == [5.0, 2.0]


def test_real_movielens_readers(real_data):
    raw = read_dataset("ml-100k", real_data("ml-100k"))
    assert raw.interactions.height == 100_000 and raw.users.height == 943 and raw.items.height == 1682
    assert raw.bad_rows["skipped"] == 0  # every real rating passes the value checks
    assert read_dataset("movielens", real_data("ml-100k")).interactions.equals(raw.interactions)  # detected
    raw = read_dataset("ml-1m", real_data("ml-1m-partial"))
    assert raw.interactions.height == 487_650 and raw.users.height == 6040 and raw.items.height == 3883
    assert raw.interactions["user"].max() == 2999
