"""The MovieLens CSV reader (ml-latest-small layout, files written here), `movielens` detection,
side tables joined by the custom schema, and the README's commands without METACTR_DATA."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml

from metactr.data.encode import load_vocabs
from metactr.data.pipeline import PrepareConfig, prepare
from metactr.data.readers import read_dataset
from metactr.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
MOVIES = ('movieId,title,genres\n'
          '1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n'
          '2,"American President, The (1995)",Comedy|Drama|Romance\n'
          '3,"Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1964)",Comedy|War\n'
          '4,"Twelve Monkeys (a.k.a. 12 Monkeys) (1995) ",Mystery|Sci-Fi|Thriller\n'
          '5,"Film with ""quotes"", and commas (2001)",(no genres listed)\n')
TAGS = ("userId,movieId,tag,timestamp\n1,1,pixar,1\n2,1,Pixar,2\n2,1,fun,3\n1,2,politics,4\n")


def ml_latest_small(tmp: Path, ratings: str | None = None) -> Path:
    d = tmp / "ml-latest-small"
    d.mkdir(parents=True)
    if ratings is None:
        rows = ["userId,movieId,rating,timestamp"]
        for u in range(1, 7):
            for i in range(1, 6):
                rows.append(f"{u},{i},{0.5 * ((u * i) % 10 + 1):.1f},{964982700 + 100 * u + i}")
        ratings = "\n".join(rows) + "\n"
    (d / "ratings.csv").write_text(ratings)
    (d / "movies.csv").write_text(MOVIES)
    (d / "tags.csv").write_text(TAGS)
    (d / "links.csv").write_text("movieId,imdbId,tmdbId\n1,0114709,862\n")
    return d


def test_movielens_csv_reader_quotes_genres_tags(tmp_path):
    d = ml_latest_small(tmp_path)
    raw = read_dataset("movielens-csv", d)
    assert raw.interactions.height == 30 and raw.users is None
    assert raw.interactions["rating"].min() >= 0.5
    items = raw.items.sort("item")
    assert items["genres"].to_list()[1] == ["Comedy", "Drama", "Romance"]
    assert items["genres"].to_list()[4] == []  # (no genres listed)
    assert items["year"].to_list() == ["1995", "1995", "1964", "1995", "2001"]
    assert items["tags"].to_list()[0] == ["pixar", "fun"]  # lower-cased, most applied first
    assert items["tags"].to_list()[2] == []
    no_tags = read_dataset("movielens-csv", d, tags=False)
    assert "tags" not in no_tags.items.columns


def test_movielens_detects_the_release_from_its_files(tmp_path):
    d = ml_latest_small(tmp_path)
    assert read_dataset("movielens", d).items.columns == ["item", "year", "genres", "tags"]
    dat = tmp_path / "ml-1m"
    dat.mkdir()
    (dat / "ratings.dat").write_text("1::10::5::978300760\n")
    (dat / "users.dat").write_text("1::F::1::10::48067\n")
    (dat / "movies.dat").write_text("10::Heat (1995)::Action\n")
    assert read_dataset("movielens", dat).rating_step == 1.0  # the ML-1M reader: whole stars
    with pytest.raises(DataError, match="no MovieLens files"):
        read_dataset("movielens", tmp_path)


@pytest.mark.parametrize("ratings,line,field,needle", [
    ("userId,movieId,rating,timestamp\n1,1,5.5,964982703\n", 2, "rating", "outside 0.5-5"),
    ("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.3,964982703\n", 3, "rating", "multiple of 0.5"),
    ("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,x,3.0,964982703\n", 3, "movieId", "cannot parse 'x'"),
    ("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n,2,3.0,964982703\n", 3, "userId", "empty user"),
    ("userId,movieId,rating,timestamp\n1,1,NaN,964982703\n", 2, "rating", "finite"),
    ("user,movie,rating,timestamp\n1,1,4.0,964982703\n", 1, "userId", "header must name"),
])
def test_movielens_csv_bad_input_names_file_line_field(tmp_path, ratings, line, field, needle):
    d = ml_latest_small(tmp_path, ratings)
    with pytest.raises(DataError) as e:
        read_dataset("movielens-csv", d)
    assert e.value.line == line and e.value.field == field and needle in str(e.value)
    assert "ratings.csv" in str(e.value)


def test_prepare_movielens_csv_has_genres_in_the_item_table(tmp_path):
    d = ml_latest_small(tmp_path)
    cfg = yaml.safe_load((ROOT / "configs/data/movielens_csv.yaml").read_text())
    cfg["filter"]["min_user_interactions"] = 3
    out = prepare("movielens", d, tmp_path / "out", PrepareConfig(**cfg))
    items = pl.read_parquet(out / "items.parquet")
    assert {"genres", "year", "tags"} <= set(items.columns)
    vocab = load_vocabs(out)
    toy = int(vocab["item_id"].lookup([1])[0])
    codes = items.filter(pl.col("item_id") == toy)["genres"].to_list()[0]
    assert sorted(vocab["genres"].decode(codes)) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]


def side_tables(tmp: Path) -> Path:
    d = tmp / "shop"
    d.mkdir()
    (d / "clicks.csv").write_text("uid,sku,ts,clicked,age_band,category\n"
                                  "u1,s1,10,1,20s,shoes\nu1,s2,20,0,20s,bags\nu2,s1,15,1,30s,shoes\n"
                                  "u2,s3,25,0,30s,hats\n")
    (d / "users.csv").write_text('uid,country,interests\nu1,fr,"music| sport"\nu2,de,\nu9,it,chess\n')
    (d / "items.csv").write_text("sku,brand,tags\ns1,acme,red|sale\ns2,(none),(none)\ns2,dup,dup\n")
    return d


def test_custom_schema_joins_user_and_item_tables(tmp_path):
    d = side_tables(tmp_path)
    schema = ROOT / "configs/data/custom_example.yaml"
    raw = read_dataset("custom", d, schema=str(schema))
    users = raw.users.sort("user")
    assert users.columns == ["user", "age_band", "country", "interests"]
    assert users["interests"].to_list() == [["music", "sport"], [], ["chess"]]  # u9: in the table only
    assert users["age_band"].to_list() == ["20s", "30s", None]
    items = raw.items.sort("item")
    assert items["brand"].to_list() == ["acme", None, None]  # '(none)' means no value; s3 not in the table
    assert items["tags"].to_list() == [["red", "sale"], [], None]
    assert items["category"].to_list() == ["shoes", "bags", "hats"]
    out = prepare("custom", d, tmp_path / "out", PrepareConfig(protocol="random", custom_schema=str(schema),
                                                              filter={"min_user_interactions": 2}))
    prepared = pl.read_parquet(out / "users.parquet")
    assert {"country", "interests", "age_band"} <= set(prepared.columns)
    v = load_vocabs(out)
    u1 = int(v["user_id"].lookup(["u1"])[0])
    codes = prepared.filter(pl.col("user_id") == u1)["interests"].to_list()[0]
    assert v["interests"].decode(codes) == ["music", "sport"]


def test_custom_side_table_errors(tmp_path):
    from metactr.errors import ConfigError

    d = side_tables(tmp_path)
    schema = yaml.safe_load((ROOT / "configs/data/custom_example.yaml").read_text())
    p = tmp_path / "s.yaml"
    schema["item_table"]["features"] = ["brand", "colour"]
    schema["item_table"]["multi_valued"] = []
    p.write_text(yaml.safe_dump(schema))
    with pytest.raises(DataError) as e:
        read_dataset("custom", d, schema=str(p))
    assert e.value.field == "colour" and "items.csv" in str(e.value)
    schema["item_table"]["features"] = ["category"]
    p.write_text(yaml.safe_dump(schema))
    with pytest.raises(ConfigError, match="both a item feature"):
        read_dataset("custom", d, schema=str(p))
    schema["item_table"] = {"file": "nope.csv", "key": "sku", "features": ["brand"]}
    p.write_text(yaml.safe_dump(schema))
    with pytest.raises(DataError, match="nope.csv"):
        read_dataset("custom", d, schema=str(p))
    (d / "items.csv").write_text("sku,brand,tags\ns1,acme,x\n,b,y\n")
    schema["item_table"] = {"file": "items.csv", "key": "sku", "features": ["brand"]}
    p.write_text(yaml.safe_dump(schema))
    with pytest.raises(DataError) as e:
        read_dataset("custom", d, schema=str(p))
    assert e.value.line == 3 and e.value.field == "sku"


def test_readme_commands_work_without_metactr_data():
    """Issue 16: `$METACTR_DATA/...` expanded to `/ml-1m-partial` when the variable was unset."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    words = [w for b in blocks for w in b.split() if "METACTR_DATA" in w]
    assert words, "the README's commands name no dataset path"
    env = {k: v for k, v in os.environ.items() if k != "METACTR_DATA"}
    for w in words:
        assert "${METACTR_DATA:-../shared/datasets}" in w, w  # never a bare $METACTR_DATA
        unset = subprocess.run(["bash", "-c", f"printf %s {w}"], env=env, capture_output=True, text=True).stdout
        assert unset.startswith("../shared/datasets/"), unset
        given = subprocess.run(["bash", "-c", f"printf %s {w}"], env={**env, "METACTR_DATA": "/data"},
                               capture_output=True, text=True).stdout
        assert given.startswith("/data/"), given
        if (ROOT / "../shared/datasets").is_dir():  # the datasets beside the project: the path is real
            assert (ROOT / unset).exists(), unset


def test_download_then_prepare_ml_latest_small_from_its_zip(tmp_path):
    """The zip's layout (files inside ml-latest-small/), fetched from a file:// URL, then one prepare."""
    import zipfile

    from metactr.data.download import download_dataset

    src = ml_latest_small(tmp_path / "src")
    archive = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.iterdir()):
            z.write(p, f"ml-latest-small/{p.name}")
    got = download_dataset("ml-latest-small", tmp_path / "raw", url=archive.as_uri(), echo=lambda s: None)
    assert (got / "ratings.csv").is_file() and (got / "movies.csv").is_file()
    out = prepare("movielens", got, tmp_path / "prep", PrepareConfig(protocol="random",
                                                                    filter={"min_user_interactions": 3}))
    assert "genres" in pl.read_parquet(out / "items.parquet").columns


def test_custom_schema_with_movies_table_gives_the_movielens_csv_splits(tmp_path):
    d = ml_latest_small(tmp_path)
    schema = tmp_path / "ml.yaml"
    schema.write_text(yaml.safe_dump({
        "file": "ratings.csv", "columns": {"user": "userId", "item": "movieId", "time": "timestamp",
                                           "rating": "rating"},
        "rating_range": [0.5, 5.0], "rating_step": 0.5,
        "item_table": {"file": "movies.csv", "key": "movieId", "features": ["genres"], "multi_valued": ["genres"],
                       "none_values": ["(no genres listed)"]}}))
    cfg = dict(protocol="random", filter={"min_user_interactions": 3})
    a = prepare("movielens-csv", d, tmp_path / "a", PrepareConfig(**cfg, reader={"tags": False}))
    b = prepare("custom", d, tmp_path / "b", PrepareConfig(**cfg, custom_schema=str(schema)))
    for name in ("train", "valid", "test"):
        assert pl.read_parquet(a / f"{name}.parquet").equals(pl.read_parquet(b / f"{name}.parquet")), name
    assert pl.read_parquet(a / "items.parquet")["genres"].equals(pl.read_parquet(b / "items.parquet")["genres"])
