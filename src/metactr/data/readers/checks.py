"""The boundary between readers and the encoder: canonical ids and checked values.

Every reader's ``RawData`` passes through here (``read_dataset``) before anything is encoded or
drawn, so that

* **the same interactions give the same split whatever the reader**: ids are put in one
  canonical form (surrounding spaces removed; a field whose every value is a plain decimal
  integer -- no sign but '-', no leading zero -- becomes Int64, otherwise it stays text), and the
  vocabulary then orders them the same way (numbers numerically, text lexically). The rows keep
  their file order (``row``), which breaks timestamp ties: the ``.dat``/``u.data`` readers,
  whose ids are already integers, give the splits they always gave.
* **impossible values never reach a split**: empty ids, missing or NaN/inf ratings, ratings
  outside the dataset's documented range (and off its step, e.g. half stars on ML-1M), labels
  other than 0/1 and timestamps that are not Unix seconds in 1970-2100 are one ``DataError``
  naming the file, line and field (``on_bad_rows="error"``, the default) or are dropped, counted
  per field and recorded (``on_bad_rows="skip"``; ``RawData.bad_rows``, then ``meta.json``).

Everything is vectorized: one boolean mask per check; only the error path looks at a row.
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
import polars as pl

from metactr.errors import ConfigError, DataError

BAD_ROW_POLICIES = ("error", "skip")
MIN_TS, MAX_TS = 0, 4_102_444_800  # 1970-01-01 .. 2100-01-01 UTC, in seconds
_INT_PATTERN = r"^-?(0|[1-9][0-9]{0,17})$"  # a canonical decimal integer that fits in Int64

# set by ``read_dataset`` while a reader runs: "skip" lets readers leave unparseable interaction
# values as null (checked and dropped here) instead of raising at once
_POLICY: ContextVar[str] = ContextVar("on_bad_rows", default="error")


def skipping() -> bool:
    """True while a reader runs under ``on_bad_rows="skip"``."""
    return _POLICY.get() == "skip"


def check_policy(policy: str) -> str:
    if policy not in BAD_ROW_POLICIES:
        raise ConfigError(f"must be error or skip, got {policy!r}", field="on_bad_rows")
    return policy


# --------------------------------------------------------------------------------- canonical ids
def _strip(s: pl.Series) -> pl.Series:
    return s.str.strip_chars() if s.dtype == pl.String else s


def canonical_id_columns(cols: list[pl.Series]) -> list[pl.Series]:
    """One id field seen in several tables (interactions, side table): one dtype for all.

    Integers stay Int64; text is stripped, and becomes Int64 only when every value of every
    column is a canonical integer (so '007' and '7' never merge, and ASINs stay text).
    """
    if all(c.dtype.is_integer() for c in cols):
        return [c.cast(pl.Int64) for c in cols]
    if not all(c.dtype == pl.String or c.dtype.is_integer() for c in cols):
        return cols  # floats, dates...: the vocabulary finds a common type
    text = [_strip(c) if c.dtype == pl.String else c.cast(pl.String) for c in cols]
    if all(bool(t.drop_nulls().str.contains(_INT_PATTERN).all()) for t in text):
        return [t.cast(pl.Int64) for t in text]
    return text


def canonicalize(raw) -> None:
    """Canonical ids (in place) and file order as ``row``; see the module docstring."""
    inter = raw.interactions
    if "row" not in inter.columns:
        inter = inter.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    for key, attr in (("user", "users"), ("item", "items")):
        side = getattr(raw, attr)
        if key not in inter.columns:
            continue
        has_side = side is not None and key in side.columns
        cols = canonical_id_columns([inter[key]] + ([side[key]] if has_side else []))
        inter = inter.with_columns(cols[0].alias(key))
        if has_side:
            setattr(raw, attr, side.with_columns(cols[1].alias(key)))
    raw.interactions = inter


# ------------------------------------------------------------------------------------ value checks
def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) or v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _masks(raw) -> list[tuple[str, pl.Series, str]]:
    """(field, bad mask, what is wrong with the value) for every check that applies."""
    df = raw.interactions
    out = []
    for key in ("user", "item"):
        if key not in df.columns:
            continue
        s = df[key]
        bad = s.is_null()
        if s.dtype == pl.String:
            bad = bad | (s.str.strip_chars() == "")
        out.append((key, bad, f"empty {key} id"))
    if "rating" in df.columns:
        r = df["rating"].cast(pl.Float64)
        out.append(("rating", r.is_null(), "missing or unparseable rating"))
        out.append(("rating", r.is_nan() | r.is_infinite(), "rating {v} is not a finite number"))
        lo, hi = raw.rating_range if raw.rating_range is not None else (None, None)
        if lo is not None:
            where = f" ({raw.rating_source}'s documented range)" if raw.rating_source else ""
            out.append(("rating", (r < lo) | (r > hi), f"rating {{v}} outside {lo:g}-{hi:g}{where}"))
        if raw.rating_step:
            q = r / raw.rating_step
            off_step = (q - q.round()).abs() > 1e-6
            out.append(("rating", off_step, f"rating {{v}} is not a multiple of {raw.rating_step:g}"))
    if "label" in df.columns:
        lab = df["label"]
        out.append(("label", lab.is_null() | ~lab.is_in([0, 1]), "label must be 0 or 1, got {v}"))
    if "timestamp" in df.columns:
        ts = df["timestamp"]
        out.append(("timestamp", ts.is_null(), "missing or unparseable timestamp"))
        if raw.has_time and ts.dtype.is_numeric():
            t = ts.cast(pl.Float64)
            out.append(("timestamp", (t < MIN_TS) | (t >= MAX_TS),
                        "timestamp {v} is not Unix seconds between 1970 and 2100" + "{ms}"))
    return [(f, m.fill_null(True) if m.null_count() else m, why) for f, m, why in out]


def check_values(raw, policy: str) -> None:
    """Raise on the first bad row (policy "error") or drop every bad row and record the counts."""
    check_policy(policy)
    masks = _masks(raw)
    df = raw.interactions
    src = raw.sources[0] if raw.sources else None
    names = raw.field_names
    any_bad = None
    for _, m, _ in masks:
        any_bad = m if any_bad is None else any_bad | m
    n_bad = int(any_bad.sum()) if any_bad is not None else 0
    raw.bad_rows = {"policy": policy, "skipped": 0, "by_field": {}}
    if n_bad == 0:
        return
    if policy == "error":
        bad_idx = any_bad.arg_true()
        i = int(bad_idx[int(df["row"].gather(bad_idx).arg_min())])  # the first bad line of the file
        for f, m, why in masks:
            if m[i]:
                v = df[f][i]
                big = f == "timestamp" and v is not None and abs(v) >= 1e11
                ms = " (milliseconds or microseconds? Unix seconds have 10 digits)" if big else ""
                raise DataError(why.format(v=_fmt(v), ms=ms), path=src, line=int(df["row"][i]) + raw.line_offset,
                                field=names.get(f, f))
    by_field: dict[str, int] = {}
    claimed = pl.Series(np.zeros(df.height, dtype=bool))
    for f, m, _ in masks:  # each bad row counted once, under its first failing field
        new = m & ~claimed
        k = int(new.sum())
        if k:
            by_field[names.get(f, f)] = by_field.get(names.get(f, f), 0) + k
        claimed = claimed | m
    first = (df["row"].filter(any_bad).head(5) + raw.line_offset).to_list()
    raw.interactions = df.filter(~any_bad)
    raw.bad_rows = {"policy": policy, "skipped": n_bad, "by_field": by_field, "first_lines": first}
    fields = ", ".join(f"{k}: {v}" for k, v in by_field.items())
    name = src.name if src is not None else "interactions"
    raw.notes.append(f"{name}: skipped {n_bad} bad rows ({fields}; first at line {first[0]})")
