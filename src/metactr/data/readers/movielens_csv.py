"""MovieLens CSV releases (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m), and ``movielens``,
which picks the reader from the files it finds.

Files, as GroupLens ships them (UTF-8, one header line, RFC 4180 quoting):

* ``ratings.csv``  ``userId,movieId,rating,timestamp``: half stars 0.5-5.0, Unix seconds.
* ``movies.csv``   ``movieId,title,genres``: titles contain commas and quotes (a real CSV
  parser reads them); genres are ``|``-separated, ``(no genres listed)`` means none. Item side
  features: ``year`` (from the title) and ``genres`` (multi-valued).
* ``tags.csv``     (optional) ``userId,movieId,tag,timestamp``: free-text tags. With the
  ``tags`` option (default on) the item feature ``tags`` holds each movie's ``max_tags`` most
  applied tags (lower-cased; ties by name).

There are no user features in these releases. ``links.csv`` and the tag genome are not used.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import cast_checked, read_csv_strings, require_file
from metactr.data.readers.checks import skipping
from metactr.errors import ConfigError, DataError

RATING_COLUMNS = ["userId", "movieId", "rating", "timestamp"]
NO_GENRES = "(no genres listed)"
_CANON = {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "timestamp"}
_CASTS = {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}


def _header_hint(path: Path, expected: list[str], encoding: str) -> None:
    """A file whose first line is not the expected header: say so (and what it holds)."""
    try:
        with open(path, encoding=encoding, errors="replace") as f:
            first = f.readline().strip().lstrip("\ufeff")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=path) from None
    cols = [c.strip().strip('"') for c in first.split(",")]
    missing = [c for c in expected if c not in cols]
    if missing:
        raise DataError(f"missing column '{missing[0]}': the header must name {','.join(expected)} "
                        f"(found {first[:80]!r})", path=path, line=1, field=missing[0])


def _ratings(path: Path, encoding: str) -> pl.DataFrame:
    _header_hint(path, RATING_COLUMNS, encoding)
    df = None
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8") and not skipping():
        try:  # fast path: typed read; any problem falls back to the checked string read below
            df = pl.read_csv(path, columns=RATING_COLUMNS, schema_overrides=_CASTS)
            df = df.select(RATING_COLUMNS)
        except Exception:  # noqa: BLE001 (the string read below names the line and field)
            df = None
    if df is None:
        df = read_csv_strings(path, encoding=encoding, columns=RATING_COLUMNS)
        df = cast_checked(df.select(RATING_COLUMNS), _CASTS, path, line_offset=2, lenient=skipping())
    return df.rename(_CANON).with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def _movies(path: Path, encoding: str) -> pl.DataFrame:
    _header_hint(path, ["movieId", "title", "genres"], encoding)
    m = read_csv_strings(path, encoding=encoding, columns=["movieId", "title", "genres"])
    m = cast_checked(m, {"movieId": pl.Int64}, path, line_offset=2)
    genres = (pl.col("genres").fill_null("").str.split("|").list.eval(pl.element().str.strip_chars())
              .list.eval(pl.element().filter((pl.element() != "") & (pl.element() != NO_GENRES))))
    year = pl.col("title").str.extract(r"\((\d{4})\)\s*$", 1)
    return m.select(pl.col("movieId").alias("item"), year.alias("year"), genres.alias("genres"))


def _tags(path: Path, encoding: str, max_tags: int) -> pl.DataFrame:
    _header_hint(path, ["movieId", "tag"], encoding)
    t = read_csv_strings(path, encoding=encoding, columns=["movieId", "tag"])
    t = cast_checked(t, {"movieId": pl.Int64}, path, line_offset=2)
    t = t.with_columns(pl.col("tag").str.strip_chars().str.to_lowercase()).filter(
        pl.col("tag").is_not_null() & (pl.col("tag") != "") & pl.col("movieId").is_not_null())
    counts = t.group_by(["movieId", "tag"]).len().sort(["movieId", "len", "tag"], descending=[False, True, False])
    top = counts.group_by("movieId", maintain_order=True).head(max_tags)
    return top.group_by("movieId", maintain_order=True).agg(pl.col("tag").alias("tags")).rename({"movieId": "item"})


@register_reader("movielens-csv")
def read_movielens_csv(data_dir: Path, tags: bool = True, max_tags: int = 10, encoding: str = "utf-8") -> RawData:
    if not isinstance(max_tags, int) or max_tags < 1:
        raise ConfigError(f"must be an integer >= 1, got {max_tags!r}", field="reader.max_tags")
    rp = require_file(data_dir, "ratings.csv")
    mp = require_file(data_dir, "movies.csv")
    inter = _ratings(rp, encoding)
    items = _movies(mp, encoding)
    sources = [rp, mp]
    tp = data_dir / "tags.csv"
    if tags and tp.is_file():
        tag_table = _tags(tp, encoding, max_tags)
        items = items.join(tag_table, on="item", how="left", maintain_order="left").with_columns(
            pl.col("tags").fill_null(pl.lit([], dtype=pl.List(pl.String))))
        sources.append(tp)
    return RawData(interactions=inter, items=items, sources=sources, line_offset=2, rating_range=(0.5, 5.0),
                   rating_step=0.5, rating_source="MovieLens", field_names={v: k for k, v in _CANON.items()})


@register_reader("movielens")
def read_movielens(data_dir: Path, encoding: str | None = None, tags: bool = True, max_tags: int = 10) -> RawData:
    """Any MovieLens release, detected from its files: ratings.csv (CSV releases), ratings.dat
    (ML-1M) or u.data (ML-100K)."""
    from metactr.data.readers.movielens import read_ml1m, read_ml100k

    if not data_dir.is_dir():
        raise DataError("expected a MovieLens folder", path=data_dir)
    enc = {} if encoding is None else {"encoding": encoding}
    if (data_dir / "ratings.csv").is_file():
        return read_movielens_csv(data_dir, tags=tags, max_tags=max_tags, **enc)
    if (data_dir / "ratings.dat").is_file():
        return read_ml1m(data_dir, **enc)
    if (data_dir / "u.data").is_file():
        return read_ml100k(data_dir, **enc)
    raise DataError("no MovieLens files found (expected ratings.csv + movies.csv, ratings.dat or u.data)",
                    path=data_dir / "ratings.csv")
