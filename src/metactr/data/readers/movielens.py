"""MovieLens-1M (``::``-separated ``.dat`` files) and MovieLens-100K (``u.data``/``u.user``/``u.item``).

Both are read exactly as GroupLens ships them (latin-1 text); the readers also work on a
truncated ``ratings.dat`` (``ml-1m-partial``). Side features:

* ML-1M users: gender, age (bucket code as given), occupation, zip; items: year (from the
  title), genres (multi-valued, ``|``-separated).
* ML-100K users: age, gender, occupation, zip; items: year (from the release date, else the
  title), genres (multi-valued, from the 19 flag columns).

Ratings are whole stars 1-5 (the READMEs); anything else is a bad row (``checks.py``). The
CSV releases (ml-latest, ml-20m/25m/32m) are read by ``movielens_csv.py``; ``movielens``
picks the right reader from the files it finds.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import cast_checked, numbered, read_delimited, require_file
from metactr.data.readers.checks import skipping

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]

_RATING_CASTS = {"user": pl.Int64, "item": pl.Int64, "rating": pl.Float32, "timestamp": pl.Int64}
_SCALE = {"rating_range": (1.0, 5.0), "rating_step": 1.0}  # whole stars 1-5 (ML-1M and ML-100K READMEs)


def _year_from_title(col: str) -> pl.Expr:
    return pl.col(col).str.extract(r"\((\d{4})\)\s*$", 1)


@register_reader("ml-1m")
def read_ml1m(data_dir: Path, encoding: str = "latin-1") -> RawData:
    ratings_path = require_file(data_dir, "ratings.dat")
    users_path = require_file(data_dir, "users.dat")
    movies_path = require_file(data_dir, "movies.dat")
    r = read_delimited(ratings_path, ["user", "item", "rating", "timestamp"], sep="::", encoding=encoding)
    r = numbered(cast_checked(r, _RATING_CASTS, ratings_path, lenient=skipping()))
    u = read_delimited(users_path, ["user", "gender", "age", "occupation", "zip"], sep="::", encoding=encoding)
    u = cast_checked(u, {"user": pl.Int64}, users_path)
    m = read_delimited(movies_path, ["item", "title", "genres"], sep="::", encoding=encoding)
    m = cast_checked(m, {"item": pl.Int64}, movies_path)
    items = m.select("item", _year_from_title("title").alias("year"), pl.col("genres").str.split("|"))
    return RawData(interactions=r, users=u, items=items, sources=[ratings_path, users_path, movies_path],
                   rating_source="ML-1M", **_SCALE)


@register_reader("ml-100k")
def read_ml100k(data_dir: Path, encoding: str = "latin-1") -> RawData:
    data_path = require_file(data_dir, "u.data")
    user_path = require_file(data_dir, "u.user")
    item_path = require_file(data_dir, "u.item")
    r = read_delimited(data_path, ["user", "item", "rating", "timestamp"], sep="\t", encoding=encoding)
    r = numbered(cast_checked(r, _RATING_CASTS, data_path, lenient=skipping()))
    u = read_delimited(user_path, ["user", "age", "gender", "occupation", "zip"], sep="|", encoding=encoding)
    u = cast_checked(u, {"user": pl.Int64}, user_path)
    flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
    m = read_delimited(item_path, ["item", "title", "release", "video_release", "url", *flags], sep="|",
                       encoding=encoding)
    m = cast_checked(m, {"item": pl.Int64, **{f: pl.Int8 for f in flags}}, item_path)
    names = pl.Series("genre_names", ML100K_GENRES)
    genres = pl.concat_list([pl.when(pl.col(f) == 1).then(pl.lit(names[i])) for i, f in enumerate(flags)]).list.drop_nulls()
    year = pl.coalesce(pl.col("release").str.extract(r"(\d{4})\s*$", 1), _year_from_title("title"))
    items = m.select("item", year.alias("year"), genres.alias("genres"))
    return RawData(interactions=r, users=u, items=items, sources=[data_path, user_path, item_path],
                   rating_source="ML-100K", **_SCALE)
