"""Bring your own log: any CSV or Parquet file described by a small YAML schema.

Example (``configs/data/custom_example.yaml``; documented in docs/data.md)::

    file: clicks.csv            # relative to the schema's folder, else to --data-dir
    format: csv                 # csv | parquet
    separator: ","
    has_header: true
    encoding: utf-8
    columns:
      user: uid
      item: sku
      time: ts                  # optional; absent -> file order
      label: clicked            # a 0/1 column ...
      # rating: stars           # ... or a rating, labelled with the config's label.threshold
    time_format: null           # strftime format for text times; null = integer Unix seconds
    user_features: [age_band]   # columns of the log, first value per user
    item_features: [category, tags]
    multi_valued: [tags]        # list-valued features, elements split on multi_value_separator
    multi_value_separator: "|"

Without a header line, refer to columns as ``column_1``, ``column_2``, ... (Polars' names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from metactr.config import StrictModel, read_yaml, validate
from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import read_csv_strings
from metactr.errors import ConfigError, DataError


class ColumnMap(StrictModel):
    user: str
    item: str
    time: str | None = None
    label: str | None = None
    rating: str | None = None


class CustomSchema(StrictModel):
    file: str
    format: Literal["csv", "parquet"] = "csv"
    separator: str = ","
    has_header: bool = True
    encoding: str = "utf-8"
    columns: ColumnMap
    time_format: str | None = None
    user_features: list[str] = []
    item_features: list[str] = []
    multi_valued: list[str] = []
    multi_value_separator: str = "|"


def load_schema(path: str | Path) -> CustomSchema:
    s = validate(CustomSchema, read_yaml(path), source=path)
    c = s.columns
    if (c.label is None) == (c.rating is None):
        raise ConfigError("give exactly one of columns.label or columns.rating", path=path, field="columns")
    if len(s.separator) != 1:
        raise ConfigError("separator must be one character", path=path, field="separator")
    for f in s.multi_valued:
        if f not in s.user_features + s.item_features:
            raise ConfigError(f"'{f}' is not a user or item feature", path=path, field="multi_valued")
    return s


def _id_column(s: pl.Series) -> pl.Series:
    """Integer ids when every value is an integer (codes then follow numeric order), else text."""
    if s.dtype.is_integer():
        return s.cast(pl.Int64)
    as_int = s.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
    return as_int if as_int.null_count() == s.null_count() else s.cast(pl.String)


@register_reader("custom")
def read_custom(data_dir: Path, schema: str) -> RawData:
    schema_path = Path(schema)
    s = load_schema(schema_path)
    path = schema_path.parent / s.file
    if not path.is_file():
        path = (data_dir if data_dir.is_dir() else data_dir.parent) / s.file
    if not path.is_file():
        raise DataError("data file named by the schema not found", path=path, field="file")
    c = s.columns
    needed = [x for x in (c.user, c.item, c.time, c.label, c.rating) if x] + s.user_features + s.item_features
    needed = list(dict.fromkeys(needed))
    off = 2 if s.has_header else 1
    if s.format == "csv":
        df = read_csv_strings(path, sep=s.separator, encoding=s.encoding, has_header=s.has_header)
    else:
        try:
            df = pl.read_parquet(path)
        except Exception as e:
            raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:160]}", path=path) from None
        off = 1
    missing = [x for x in needed if x not in df.columns]
    if missing:
        hint = " (wrong separator?)" if df.width == 1 else ""
        raise DataError(f"missing column '{missing[0]}'{hint} (columns: {', '.join(df.columns[:12])})",
                        path=path, field=missing[0])
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))

    def checked(col: str, dtype, what: str) -> pl.Series:
        src = df[col]
        out = src.str.strip_chars().cast(dtype, strict=False) if src.dtype == pl.String else src.cast(dtype, strict=False)
        bad = out.is_null() & src.is_not_null() | src.is_null()
        if bad.any():
            i = int(bad.arg_max())
            raise DataError(f"{what}, got {src[i]!r}", path=path, line=i + off, field=col)
        return out

    if c.time is None:
        ts = df["row"]
    elif s.time_format:
        src = df[c.time].cast(pl.String)
        ts = src.str.strptime(pl.Datetime("us"), s.time_format, strict=False)
        if ts.is_null().any():
            i = int(ts.is_null().arg_max())
            raise DataError(f"time does not match format {s.time_format!r}: {src[i]!r}", path=path, line=i + off,
                            field=c.time)
        ts = ts.dt.epoch("s")
    else:
        ts = checked(c.time, pl.Int64, "time must be an integer (Unix seconds) or set time_format")
    cols = {"user": _id_column(df[c.user]), "item": _id_column(df[c.item]), "timestamp": ts, "row": df["row"]}
    if c.label:
        lab = checked(c.label, pl.Int64, "label must be 0 or 1")
        if not lab.is_in([0, 1]).all():
            i = int((~lab.is_in([0, 1])).arg_max())
            raise DataError(f"label must be 0 or 1, got {lab[i]!r}", path=path, line=i + off, field=c.label)
        cols["label"] = lab.cast(pl.Int8)
    else:
        cols["rating"] = checked(c.rating, pl.Float64, "rating must be a number")
    inter = pl.DataFrame(cols)

    def side(key: str, features: list[str]) -> pl.DataFrame | None:
        if not features:
            return None
        t = df.select(*features).with_columns(_id_column(df[c.user if key == "user" else c.item]).alias(key))
        t = t.unique(subset=[key], keep="first", maintain_order=True)
        conv = []
        for f in features:
            if f in s.multi_valued:
                conv.append(pl.col(f).cast(pl.String).str.split(s.multi_value_separator)
                            .list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != "")).fill_null([]))
            else:
                conv.append(pl.col(f).cast(pl.String))
        return t.with_columns(conv)

    return RawData(interactions=inter, users=side("user", s.user_features), items=side("item", s.item_features),
                   sources=[path, schema_path], has_time=c.time is not None, line_offset=off)
