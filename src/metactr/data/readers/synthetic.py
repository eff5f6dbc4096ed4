"""The canonical interaction Parquet (what ``metactr data synth`` writes, or any log in that form).

Columns ``user_id``, ``item_id``, ``timestamp`` (Unix seconds) and one of ``click``/``label``
(0/1) or ``rating``; optional side tables ``<stem>.users.parquet`` (``user_id`` + features) and
``<stem>.items.parquet`` (``item_id`` + features) beside it. ``data_dir`` may be the file or a
folder holding exactly one such log.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from metactr.data.readers import RawData, register_reader
from metactr.errors import DataError


def _log_file(data_dir: Path) -> Path:
    if data_dir.is_file():
        return data_dir
    cands = [p for p in sorted(data_dir.glob("*.parquet"))
             if not (p.name.endswith(".users.parquet") or p.name.endswith(".items.parquet"))]
    if len(cands) != 1:
        raise DataError(f"expected exactly one interaction .parquet in the folder, found {len(cands)}", path=data_dir)
    return cands[0]


def _read(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    try:
        return pl.read_parquet(path, columns=columns)
    except pl.exceptions.ColumnNotFoundError as e:
        raise DataError(f"missing column: {e}", path=path) from None
    except Exception as e:
        raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:200]}", path=path) from None


@register_reader("synthetic")
def read_synthetic(data_dir: Path) -> RawData:
    path = _log_file(data_dir)
    if not path.is_file():
        raise DataError("interaction log not found", path=path)
    try:
        names = pl.read_parquet_schema(path)
    except Exception as e:  # noqa: BLE001 (a corrupt or non-Parquet file: polars raises many types)
        raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:200]}", path=path) from None
    label_col = next((c for c in ("click", "label", "rating") if c in names), None)
    for c in ("user_id", "item_id", "timestamp"):
        if c not in names:
            raise DataError(f"missing column '{c}'", path=path, field=c)
    if label_col is None:
        raise DataError("missing label column (click, label or rating)", path=path, field="click")
    df = _read(path, ["user_id", "item_id", "timestamp", label_col])
    out_label = "rating" if label_col == "rating" else "label"
    inter = df.rename({"user_id": "user", "item_id": "item", label_col: out_label})
    sources = [path]
    side = {}
    for kind, key in (("users", "user_id"), ("items", "item_id")):
        p = path.with_name(f"{path.stem}.{kind}.parquet")
        if p.is_file():
            t = _read(p)
            if key not in t.columns:
                raise DataError(f"missing column '{key}'", path=p, field=key)
            side[kind] = t.rename({key: key.split("_")[0]})
            sources.append(p)
    return RawData(interactions=inter, users=side.get("users"), items=side.get("items"), sources=sources)
