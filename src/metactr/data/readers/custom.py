"""Bring your own log: any CSV or Parquet file described by a small YAML schema, with optional
side tables of user and item features joined by key.

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
    # rating_range: [1, 5]      # optional: ratings outside are bad rows; rating_step: 1
    time_format: null           # strftime format for text times; null = integer Unix seconds
    user_features: [age_band]   # columns of the log, first value per user
    item_features: [category]
    multi_valued: []            # list-valued features, elements split on multi_value_separator
    multi_value_separator: "|"
    item_table:                 # optional side tables, joined on their key column
      file: items.csv
      key: sku
      features: [brand, tags]
      multi_valued: [tags]
      multi_value_separator: "|"
      none_values: ["(none)"]   # values (or list elements) that mean "no value"
    # user_table: {file: users.csv, key: uid, features: [...]}

Without a header line, refer to columns as ``column_1``, ``column_2``, ... (1-based).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl

from metactr.config import StrictModel, read_yaml, validate
from metactr.data.readers import RawData, register_reader
from metactr.data.readers._io import read_csv_strings
from metactr.data.readers.checks import skipping
from metactr.errors import ConfigError, DataError


class ColumnMap(StrictModel):
    user: str
    item: str
    time: str | None = None
    label: str | None = None
    rating: str | None = None


class SideTable(StrictModel):
    """A table of user or item features, one row per key (later duplicates are ignored)."""

    file: str
    key: str
    features: list[str]
    format: Literal["csv", "parquet"] = "csv"
    separator: str = ","
    has_header: bool = True
    encoding: str = "utf-8"
    multi_valued: list[str] = []
    multi_value_separator: str = "|"
    none_values: list[str] = []


class CustomSchema(StrictModel):
    file: str
    format: Literal["csv", "parquet"] = "csv"
    separator: str = ","
    has_header: bool = True
    encoding: str = "utf-8"
    columns: ColumnMap
    rating_range: tuple[float, float] | None = None
    rating_step: float | None = None
    time_format: str | None = None
    user_features: list[str] = []
    item_features: list[str] = []
    multi_valued: list[str] = []
    multi_value_separator: str = "|"
    user_table: SideTable | None = None
    item_table: SideTable | None = None


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
    if s.rating_range is not None and not s.rating_range[0] <= s.rating_range[1]:
        raise ConfigError("rating_range must be [low, high] with low <= high", path=path, field="rating_range")
    if s.rating_step is not None and not s.rating_step > 0:
        raise ConfigError("rating_step must be > 0", path=path, field="rating_step")
    for kind, t, own in (("user", s.user_table, s.user_features), ("item", s.item_table, s.item_features)):
        if t is None:
            continue
        name = f"{kind}_table"
        if len(t.separator) != 1:
            raise ConfigError("separator must be one character", path=path, field=f"{name}.separator")
        if not t.features:
            raise ConfigError("list at least one feature", path=path, field=f"{name}.features")
        for f in t.multi_valued:
            if f not in t.features:
                raise ConfigError(f"'{f}' is not one of the table's features", path=path, field=f"{name}.multi_valued")
        both = [f for f in t.features if f in own]
        if both:
            raise ConfigError(f"'{both[0]}' is both a {kind} feature of the log and of the table", path=path,
                              field=f"{name}.features")
        if t.key in t.features:
            raise ConfigError("the key cannot also be a feature", path=path, field=f"{name}.key")
    return s


def _locate(name: str, schema_path: Path, data_dir: Path, field: str) -> Path:
    path = schema_path.parent / name
    if not path.is_file():
        path = (data_dir if data_dir.is_dir() else data_dir.parent) / name
    if not path.is_file():
        raise DataError("data file named by the schema not found", path=path, field=field)
    return path


def _read_table(path: Path, fmt: str, sep: str, encoding: str, has_header: bool) -> tuple[pl.DataFrame, int]:
    """The file as a frame (CSV: all strings) and the file line of its first row."""
    if fmt == "parquet":
        try:
            return pl.read_parquet(path), 1
        except Exception as e:  # noqa: BLE001 (pyarrow/polars raise many types for a corrupt file)
            raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:160]}", path=path) from None
    df = read_csv_strings(path, sep=sep, encoding=encoding, has_header=has_header)
    if not has_header:  # name columns column_1, column_2, ... whatever the Polars version calls them
        df = df.rename({old: f"column_{i + 1}" for i, old in enumerate(df.columns)})
    return df, 2 if has_header else 1


def _missing(df: pl.DataFrame, needed: list[str], path: Path) -> None:
    missing = [x for x in needed if x not in df.columns]
    if missing:
        hint = " (wrong separator?)" if df.width == 1 else ""
        raise DataError(f"missing column '{missing[0]}'{hint} (columns: {', '.join(df.columns[:12])})",
                        path=path, field=missing[0])


def _convert(features: list[str], multi: list[str], sep: str, none_values: list[str]) -> list[pl.Expr]:
    """Raw text features; multi-valued ones as lists (elements stripped, empty and 'none' dropped)."""
    conv = []
    for f in features:
        col = pl.col(f).cast(pl.String)
        if f in multi:
            keep = pl.element() != ""
            if none_values:
                keep = keep & ~pl.element().is_in(none_values)
            conv.append(col.str.split(sep).list.eval(pl.element().str.strip_chars()).list.eval(
                pl.element().filter(keep)).fill_null(pl.lit([], dtype=pl.List(pl.String))).alias(f))
        else:
            conv.append((pl.when(col.is_in(none_values)).then(None).otherwise(col) if none_values else col).alias(f))
    return conv


def _side_table(t: SideTable, kind: str, schema_path: Path, data_dir: Path) -> tuple[pl.DataFrame, Path]:
    path = _locate(t.file, schema_path, data_dir, f"{kind}_table.file")
    df, off = _read_table(path, t.format, t.separator, t.encoding, t.has_header)
    _missing(df, [t.key, *t.features], path)
    key = df[t.key].cast(pl.String).str.strip_chars()
    empty = key.is_null() | (key == "")
    if empty.any():
        raise DataError(f"empty {kind} key", path=path, line=int(empty.arg_max()) + off, field=t.key)
    out = df.select(pl.lit(key).alias(kind), *_convert(t.features, t.multi_valued, t.multi_value_separator,
                                                       t.none_values))
    return out.unique(subset=[kind], keep="first", maintain_order=True), path


@register_reader("custom")
def read_custom(data_dir: Path, schema: str) -> RawData:
    schema_path = Path(schema)
    s = load_schema(schema_path)
    path = _locate(s.file, schema_path, data_dir, "file")
    c = s.columns
    needed = [x for x in (c.user, c.item, c.time, c.label, c.rating) if x] + s.user_features + s.item_features
    needed = list(dict.fromkeys(needed))
    df, off = _read_table(path, s.format, s.separator, s.encoding, s.has_header)
    _missing(df, needed, path)
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    lenient = skipping()

    def checked(col: str, dtype, what: str) -> pl.Series:
        src = df[col]
        out = (src.str.strip_chars() if src.dtype == pl.String else src).cast(dtype, strict=False)
        bad = out.is_null() & src.is_not_null() | src.is_null()
        if bad.any() and not lenient:
            i = int(bad.arg_max())
            raise DataError(f"{what}, got {src[i]!r}", path=path, line=i + off, field=col)
        return out

    if c.time is None:
        ts = df["row"]
    elif df[c.time].dtype in (pl.Date,) or isinstance(df[c.time].dtype, pl.Datetime):  # typed Parquet times
        ts = df[c.time].cast(pl.Datetime("us")).dt.epoch("s")
    elif s.time_format:
        src = df[c.time].cast(pl.String)
        try:
            ts = src.str.strptime(pl.Datetime("us"), s.time_format, strict=False)
        except pl.exceptions.PolarsError as e:
            raise ConfigError(f"bad time_format: {' '.join(str(e).split())[:120]}", path=schema_path,
                              field="time_format") from None
        if ts.is_null().any() and not lenient:
            i = int(ts.is_null().arg_max())
            raise DataError(f"time does not match format {s.time_format!r}: {src[i]!r}", path=path, line=i + off,
                            field=c.time)
        ts = ts.dt.epoch("s")
    else:
        ts = checked(c.time, pl.Int64, "time must be an integer (Unix seconds) or set time_format")

    def ids(col: str) -> pl.Series:
        v = df[col]
        return v if v.dtype.is_integer() or v.dtype == pl.String else v.cast(pl.String)

    cols = {"user": ids(c.user), "item": ids(c.item), "timestamp": ts, "row": df["row"]}
    if c.label:
        lab = checked(c.label, pl.Int64, "label must be 0 or 1")
        if not lab.is_in([0, 1]).fill_null(True).all() and not lenient:
            i = int((~lab.is_in([0, 1])).fill_null(False).arg_max())
            raise DataError(f"label must be 0 or 1, got {lab[i]!r}", path=path, line=i + off, field=c.label)
        cols["label"] = lab if lenient else lab.cast(pl.Int8)  # lenient: bad values go to the boundary checks
    else:
        cols["rating"] = checked(c.rating, pl.Float64, "rating must be a number")
    inter = pl.DataFrame(cols)
    sources = [path, schema_path]

    def side(kind: str, features: list[str], table: SideTable | None) -> pl.DataFrame | None:
        log_side = None
        if features:
            key_col = c.user if kind == "user" else c.item
            t = df.select(*features).with_columns(ids(key_col).alias(kind))
            t = t.unique(subset=[kind], keep="first", maintain_order=True)
            log_side = t.with_columns(_convert(features, s.multi_valued, s.multi_value_separator, []))
        if table is None:
            return log_side
        tab, tpath = _side_table(table, kind, schema_path, data_dir)
        sources.append(tpath)
        if log_side is None:
            return tab
        log_side = log_side.with_columns(pl.col(kind).cast(pl.String).str.strip_chars())
        return log_side.join(tab, on=kind, how="full", coalesce=True, maintain_order="left")

    def key_first(t: pl.DataFrame | None, kind: str) -> pl.DataFrame | None:
        return None if t is None else t.select(kind, pl.exclude(kind))

    users = key_first(side("user", s.user_features, s.user_table), "user")
    items = key_first(side("item", s.item_features, s.item_table), "item")
    names = {"user": c.user, "item": c.item, "label": c.label or "label", "rating": c.rating or "rating",
             "timestamp": c.time or "timestamp"}
    return RawData(interactions=inter, users=users, items=items, sources=sources, has_time=c.time is not None,
                   line_offset=off, rating_range=s.rating_range, rating_step=s.rating_step,
                   rating_source="the schema" if s.rating_range else "", field_names=names)
