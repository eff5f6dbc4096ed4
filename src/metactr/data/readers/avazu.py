"""Avazu CTR (Kaggle 2014): the 24-column ``train.csv`` (or any file with its header).

* user = ``device_id``; where it is the anonymous value ``a99f214a`` (most rows), the user is
  ``device_ip + "|" + device_model`` instead (the usual reading of this log).
* item = the ad, identified by ``item_fields`` (default ``["C14"]``, the anonymized creative id);
  item side features: C15/C16 (banner width/height), C17 (creative group), C18-C21 (first value
  seen per item).
* time = ``hour`` (YYMMDDHH, UTC) -> Unix seconds; ties keep file order.
* label = ``click``.
* user side features: device_type, device_conn_type (first value seen per user).

Only the needed columns are parsed (lazy scan), so the full 40M-row file is read in one pass.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.data.readers.checks import skipping
from metactr.errors import DataError

ANON_DEVICE = "a99f214a"
COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
           "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
ITEM_FEATURES = ["C15", "C16", "C17", "C18", "C19", "C20", "C21"]
USER_FEATURES = ["device_type", "device_conn_type"]


def _find(data_dir: Path) -> Path:
    if data_dir.is_file():
        return data_dir
    for name in ("train.csv", "train.gz", "train"):
        if (data_dir / name).is_file():
            return data_dir / name
    cands = sorted(data_dir.glob("*.csv"))
    if len(cands) == 1:
        return cands[0]
    raise DataError("no Avazu file (expected train.csv or exactly one *.csv)", path=data_dir / "train.csv")


@register_reader("avazu")
def read_avazu(data_dir: Path, item_fields: list[str] | None = None) -> RawData:
    path = _find(data_dir)
    item_fields = list(item_fields or ["C14"])
    try:
        header = pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except Exception as e:
        raise DataError(f"cannot read CSV header: {' '.join(str(e).split())[:160]}", path=path, line=1) from None
    if len(header) == 1:
        raise DataError("header has one column: wrong separator (expected ',')", path=path, line=1)
    need = ["click", "hour", "device_id", "device_ip", "device_model", *item_fields, *ITEM_FEATURES, *USER_FEATURES]
    for c in dict.fromkeys(need):
        if c not in header:
            raise DataError(f"missing column '{c}'", path=path, line=1, field=c)
    cols = list(dict.fromkeys(need))
    try:
        df = pl.read_csv(path, columns=cols, infer_schema=False)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, pl.exceptions.ShapeError) as e:
        from metactr.data.readers._io import locate_bad_csv_line

        line, why = locate_bad_csv_line(path, sep=",", encoding="utf-8", n_fields=None)
        raise DataError(why or f"cannot parse CSV: {' '.join(str(e).split())[:160]}", path=path, line=line) from None
    hour = (df["hour"].str.strip_chars() + "00").str.strptime(pl.Datetime("us"), "%y%m%d%H%M", strict=False)
    if hour.is_null().any() and not skipping():
        i = int(hour.is_null().arg_max())
        raise DataError(f"hour must be YYMMDDHH, got {df['hour'][i]!r}", path=path, line=i + 2, field="hour")
    click = df["click"].str.strip_chars().cast(pl.Int8, strict=False)
    if click.is_null().any() and not skipping():
        i = int(click.is_null().arg_max())
        raise DataError(f"click must be 0 or 1, got {df['click'][i]!r}", path=path, line=i + 2, field="click")
    user = pl.when(pl.col("device_id") == ANON_DEVICE).then(
        pl.concat_str(["device_ip", "device_model"], separator="|")).otherwise(pl.col("device_id"))
    item = pl.concat_str(item_fields, separator="|") if len(item_fields) > 1 else pl.col(item_fields[0])
    base = df.with_columns(user.alias("user"), item.alias("item"))
    inter = pl.DataFrame({"user": base["user"], "item": base["item"],
                          "timestamp": hour.dt.epoch("s"), "label": click}).with_row_index("row").with_columns(
        pl.col("row").cast(pl.Int64))
    users = base.select("user", *USER_FEATURES).unique(subset=["user"], keep="first", maintain_order=True)
    items = base.select("item", *ITEM_FEATURES).unique(subset=["item"], keep="first", maintain_order=True)
    return RawData(interactions=inter, users=users, items=items, sources=[path], line_offset=2,
                   field_names={"user": "device_id", "item": "|".join(item_fields), "timestamp": "hour",
                                "label": "click"})
