"""Amazon reviews, ratings-only CSV (``user,item,rating,timestamp``, no header, as in
``ratings_Electronics.csv``), with optional product metadata for the item category.

Metadata (optional, ``metadata`` option or a ``meta*.json`` file in the folder): JSON lines with
``asin`` and either ``category`` (a list of strings, 2018 release) or ``categories`` (a list of
category paths, 2014 release); the item side feature ``category`` is the multi-valued set of
category names. Lines that are not JSON are a DataError naming the line. Ratings are 1-5 stars.
The MetaSelector paper used the 5-core subset: set ``filter.min_user_interactions: 5``.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import cast_checked, read_csv_strings, read_text
from metactr.data.readers.checks import skipping
from metactr.errors import DataError


def _ratings_file(data_dir: Path) -> Path:
    if data_dir.is_file():
        return data_dir
    cands = sorted(data_dir.glob("*.csv"))
    if len(cands) != 1:
        raise DataError(f"expected exactly one ratings *.csv in the folder, found {len(cands)}",
                        path=data_dir / "ratings.csv")
    return cands[0]


def _read_metadata(path: Path) -> pl.DataFrame:
    asins, cats = [], []
    text = read_text(path, "utf-8")  # metadata is small next to the ratings; error path names the line
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not a JSON line ({e.msg})", path=path, line=n) from None
        if not isinstance(obj, dict) or "asin" not in obj:
            raise DataError("missing key 'asin'", path=path, line=n, field="asin")
        c = obj.get("category")
        try:
            if c is None and obj.get("categories") is not None:
                c = sorted({str(x) for p in obj["categories"] for x in p})
            c = [str(x) for x in c] if c else []
        except TypeError:
            raise DataError("must be a list of strings (category) or of lists (categories)", path=path, line=n,
                            field="category") from None
        if isinstance(obj.get("category"), str):
            raise DataError("must be a list of strings", path=path, line=n, field="category")
        asins.append(str(obj["asin"]))
        cats.append(c)
    return pl.DataFrame({"item": asins, "category": cats}, schema={"item": pl.String, "category": pl.List(pl.String)})


@register_reader("amazon")
def read_amazon(data_dir: Path, metadata: str | None = None, has_header: bool = False) -> RawData:
    path = _ratings_file(data_dir)
    cols = ["user", "item", "rating", "timestamp"]
    df = read_csv_strings(path, sep=",", has_header=has_header, new_columns=cols)
    if df.width != 4:
        raise DataError(f"expected 4 columns user,item,rating,timestamp, found {df.width}", path=path, line=1)
    off = 2 if has_header else 1
    hint = "" if has_header else " (the first line looks like a header: set reader.has_header: true)"
    df = cast_checked(df, {"rating": pl.Float32, "timestamp": pl.Int64}, path, line_offset=off, lenient=skipping(),
                      hint=hint)
    inter = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    sources = [path]
    items = None
    meta_path = Path(metadata) if metadata else next(iter(sorted((data_dir if data_dir.is_dir() else data_dir.parent)
                                                                 .glob("meta*.json"))), None)
    if meta_path is not None:
        if not meta_path.is_file():
            raise DataError("metadata file not found", path=meta_path, field="reader.metadata")
        items = _read_metadata(meta_path)
        sources.append(meta_path)
    return RawData(interactions=inter, items=items, sources=sources, line_offset=off, rating_range=(1.0, 5.0),
                   rating_source="Amazon reviews")
