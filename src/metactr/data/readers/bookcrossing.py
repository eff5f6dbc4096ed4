"""Book-Crossing (Ziegler et al. 2005): BX-Book-Ratings.csv, BX-Users.csv, BX-Books.csv.

``;``-separated, every field in double quotes, latin-1 text, one header line. Known bad lines
(e.g. in BX-Books.csv, titles with ``\\"`` and ``;`` inside) do not split into the expected
number of fields: with ``bad_lines="skip"`` (default) they are dropped and counted in the
prepared meta.json notes, with ``"error"`` the first one is a DataError naming its line.

Ratings: explicit 1-10, and 0 = an implicit interaction (the user handled the book but gave no
rating). ``implicit`` chooses: ``"drop"`` (default) removes them, ``"negative"`` keeps them with
rating 0 (below any threshold, label 0), ``"positive"`` keeps them as rating 10 (label 1).
Use ``label.threshold`` on the 1-10 scale (``configs/data/book_crossing.yaml`` uses 7).

No timestamps: the session order is the order of the lines in BX-Book-Ratings.csv (``timestamp``
= line number; meta.json records ``has_time: false``). The MetaSelector context fields are
then "unknown".
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import read_text, require_file
from metactr.data.readers.checks import skipping
from metactr.errors import ConfigError, DataError


def read_quoted_lines(path: Path, n_fields: int, *, encoding: str, bad_lines: str) -> tuple[pl.DataFrame, int, int]:
    """Split ``"a";"b";"c"`` lines vectorized; returns (fields as f0.., number of bad lines, first data line)."""
    text = read_text(path, encoding).replace("\r\n", "\n")
    lines = pl.Series("line", text.split("\n"))
    if len(lines) and lines[-1] == "":
        lines = lines.head(len(lines) - 1)
    body = lines.slice(1)  # header
    # BX-Users.csv writes a missing age as an unquoted NULL: quote it like every other field
    body = body.str.replace_all(r'(^|;)NULL(;|$)', '${1}"NULL"${2}')
    parts = body.str.strip_chars().str.strip_prefix('"').str.strip_suffix('"').str.split('";"')
    ok = parts.list.len() == n_fields
    n_bad = int((~ok).sum())
    if n_bad and bad_lines == "error":
        i = int((~ok).arg_max())
        raise DataError(f"expected {n_fields} quoted fields separated by ';', found {parts[i].len()}",
                        path=path, line=i + 2)
    line_no = pl.Series("line_no", range(2, len(body) + 2))
    df = pl.DataFrame({"p": parts, "line_no": line_no}).filter(ok)
    fields = df.select([pl.col("p").list.get(j).alias(f"f{j}") for j in range(n_fields)] + ["line_no"])
    return fields, n_bad, 2


@register_reader("book-crossing")
def read_book_crossing(data_dir: Path, implicit: Literal["drop", "negative", "positive"] = "drop",
                       bad_lines: Literal["skip", "error"] = "skip", encoding: str = "latin-1") -> RawData:
    if implicit not in ("drop", "negative", "positive"):
        raise ConfigError(f"must be drop, negative or positive, got {implicit!r}", field="reader.implicit")
    if bad_lines not in ("skip", "error"):
        raise ConfigError(f"must be skip or error, got {bad_lines!r}", field="reader.bad_lines")
    rp = require_file(data_dir, "BX-Book-Ratings.csv")
    up = require_file(data_dir, "BX-Users.csv")
    bp = require_file(data_dir, "BX-Books.csv")
    notes = []
    r, nb, _ = read_quoted_lines(rp, 3, encoding=encoding, bad_lines="error" if bad_lines == "error" else "skip")
    if nb:
        notes.append(f"{rp.name}: skipped {nb} malformed lines")
    rating = r["f2"].str.strip_chars().cast(pl.Float32, strict=False)
    failed = rating.is_null()
    if failed.any() and not skipping():
        i = int(failed.arg_max())
        raise DataError(f"rating must be a number 0-10, got {r['f2'][i]!r}", path=rp, line=int(r["line_no"][i]),
                        field="Book-Rating")
    # the range (0-10) and NaN are checked at the boundary (checks.py), after ``implicit``
    inter = pl.DataFrame({"user": r["f0"].str.strip_chars(), "item": r["f1"].str.strip_chars().str.to_uppercase(),
                          "rating": rating, "row": (r["line_no"] - 2).cast(pl.Int64)})
    if implicit == "drop":  # only the implicit zeros: bad values stay for the boundary checks
        inter = inter.filter((pl.col("rating") != 0).fill_null(True))
    elif implicit == "positive":
        inter = inter.with_columns(pl.when(pl.col("rating") == 0).then(10.0).otherwise(pl.col("rating"))
                                   .cast(pl.Float32).alias("rating"))
    inter = inter.with_columns(pl.col("row").alias("timestamp"))  # no time: file order
    u, nbu, _ = read_quoted_lines(up, 3, encoding=encoding, bad_lines=bad_lines)
    users = u.select(
        pl.col("f0").str.strip_chars().alias("user"),
        pl.col("f1").str.split(",").list.last().str.strip_chars().replace("", None).alias("country"),
        # ages outside 5-100 are known junk in BX-Users.csv: unknown
        pl.col("f2").cast(pl.Int32, strict=False).pipe(
            lambda a: pl.when((a >= 5) & (a <= 100)).then((a // 10) * 10)).alias("age_decade"),
    )
    b, nbb, _ = read_quoted_lines(bp, 8, encoding=encoding, bad_lines=bad_lines)
    items = b.select(
        pl.col("f0").str.strip_chars().str.to_uppercase().alias("item"),
        pl.col("f2").str.strip_chars().alias("author"),
        pl.col("f3").cast(pl.Int32, strict=False).alias("year"),
        pl.col("f4").str.strip_chars().alias("publisher"),
    )
    for name, n in ((up.name, nbu), (bp.name, nbb)):
        if n:
            notes.append(f"{name}: skipped {n} malformed lines")
    return RawData(interactions=inter, users=users, items=items, sources=[rp, up, bp], has_time=False,
                   line_offset=2, notes=notes, rating_range=(0.0, 10.0), rating_step=1.0,
                   rating_source="Book-Crossing",
                   field_names={"user": "User-ID", "item": "ISBN", "rating": "Book-Rating"})
