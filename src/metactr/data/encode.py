"""Per-field vocabularies: raw value -> int code, with 0 = padding and 1 = unknown.

Real values get codes from 2 upward in sorted order of the raw values (so the codes do not
depend on file order). Multi-valued fields (lists, e.g. genres) share one vocabulary for their
elements. A prepared directory stores each vocabulary as ``vocab/<field>.parquet`` (columns
``raw``, ``code``) so that serving can map raw ids later; a value never seen maps to 1 and never
raises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from metactr.errors import DataError

PAD, UNKNOWN, FIRST_CODE = 0, 1, 2
CODE_DTYPE = pl.Int32


class Vocab:
    """Vocabulary of one field (``size`` counts the padding and unknown codes)."""

    def __init__(self, name: str, raw: pl.Series) -> None:
        self.name = name
        self.raw = raw.alias("raw")
        self.codes = pl.Series("code", np.arange(FIRST_CODE, FIRST_CODE + len(raw), dtype=np.int32))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, name: str, *columns: pl.Series) -> Vocab:
        """Sorted distinct non-null values of ``columns`` (list columns contribute their elements)."""
        parts = []
        for c in columns:
            if isinstance(c.dtype, pl.List):
                c = c.explode()
            parts.append(c.drop_nulls())
        dtype = _common_dtype([p.dtype for p in parts])
        vals = pl.concat([p.cast(dtype) for p in parts]) if parts else pl.Series([], dtype=pl.String)
        return cls(name, vals.unique().sort())

    @property
    def size(self) -> int:
        return len(self.raw) + FIRST_CODE

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([self.raw, self.codes])

    # ------------------------------------------------------------------ encoding
    def _coerce(self, s: pl.Series) -> pl.Series:
        if s.dtype == self.raw.dtype:
            return s
        if self.raw.dtype == pl.String:
            return s.cast(pl.String)
        return s.cast(self.raw.dtype, strict=False)  # a string that is no number -> null -> unknown

    def encode(self, s: pl.Series) -> pl.Series:
        """Codes for a scalar or list column; null and unseen values -> 1 (lists keep their length)."""
        if isinstance(s.dtype, pl.List):
            import pyarrow as pa

            arr = s.rechunk().to_arrow()
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            lens = s.list.len().fill_null(0).cast(pl.Int64).to_numpy()
            # flatten() yields exactly the real elements (no stand-ins for empty or null lists)
            flat = pl.Series(arr.flatten())
            codes = self.encode(flat).to_numpy() if len(flat) else np.zeros(0, np.int32)
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            from metactr.data.sessions import arrow  # pa.array without its pandas import

            out = pa.LargeListArray.from_arrays(arrow(offsets), arrow(np.asarray(codes, dtype=np.int32)))
            return pl.Series(s.name, out).cast(pl.List(CODE_DTYPE))
        s = self._coerce(s)
        if s.dtype.is_integer() and len(self.raw) and len(s) > 100_000:
            lut = self._int_lut()
            if lut is not None:  # dense integer ids (the common case): one array lookup
                lo, table = lut
                raw = s.fill_null(lo - 1).to_numpy()
                out = np.empty(len(raw), dtype=np.int32)
                step = 1 << 22  # in blocks: the int64 temporaries stay at 4M rows (peak RSS at 40M rows)
                for a in range(0, len(raw), step):
                    v = raw[a:a + step].astype(np.int64) - lo
                    inside = (v >= 0) & (v < len(table))
                    np.clip(v, 0, len(table) - 1, out=v)
                    out[a:a + step] = np.where(inside, table[v], UNKNOWN)
                return pl.Series(s.name, out)
        out = s.replace_strict(self.raw, self.codes, default=UNKNOWN, return_dtype=CODE_DTYPE)
        return out.fill_null(UNKNOWN).alias(s.name)

    def _int_lut(self) -> tuple[int, np.ndarray] | None:
        """(min raw, code table over min..max) when the integer ids span at most 4x their count."""
        if not hasattr(self, "_lut"):
            lo, hi = int(self.raw.min()), int(self.raw.max())
            self._lut = None
            if hi - lo + 1 <= max(4 * len(self.raw), 1024):
                table = np.full(hi - lo + 1, UNKNOWN, dtype=np.int32)
                table[self.raw.to_numpy().astype(np.int64) - lo] = self.codes.to_numpy()
                self._lut = (lo, table)
        return self._lut

    def lookup(self, values) -> np.ndarray:
        """Codes for raw values given as a Python list/array (serving)."""
        if not isinstance(values, pl.Series):
            values = list(values)
            if self.raw.dtype == pl.String:
                values = pl.Series("v", [None if x is None else str(x) for x in values], dtype=pl.String)
            else:  # ints (or numeric strings) -> the vocab's dtype; anything else -> unknown
                values = pl.Series("v", [_to_int(x) for x in values], dtype=pl.Int64)
        return self.encode(values).to_numpy()

    def decode(self, codes) -> list:
        """Raw values of codes (None for padding/unknown)."""
        codes = np.asarray(codes, dtype=np.int64)
        raw = self.raw.to_list()
        return [raw[c - FIRST_CODE] if FIRST_CODE <= c < self.size else None for c in codes]

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        self.frame().write_parquet(path)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        try:
            df = pl.read_parquet(path)
        except Exception as e:  # corrupt/missing file
            raise DataError(f"cannot read vocabulary: {e}", path=path) from None
        if df.columns[:2] != ["raw", "code"]:
            raise DataError("vocabulary must have columns raw, code", path=path)
        v = cls(path.stem, df["raw"])
        if not (df["code"].to_numpy() == v.codes.to_numpy()).all():
            raise DataError("vocabulary codes are not 2..n in order", path=path, field="code")
        return v


def _to_int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _common_dtype(dtypes: list) -> pl.DataType:
    if not dtypes:
        return pl.String
    if all(d.is_integer() for d in dtypes):
        return pl.Int64
    if all(d.is_numeric() for d in dtypes):
        return pl.Float64
    return pl.String


def load_vocabs(prepared_dir: str | Path) -> dict[str, Vocab]:
    """All vocabularies of a prepared directory, by field name (``user_id``, ``item_id``, features)."""
    vdir = Path(prepared_dir) / "vocab"
    if not vdir.is_dir():
        raise DataError("prepared directory has no vocab/ folder", path=vdir)
    return {p.stem: Vocab.load(p) for p in sorted(vdir.glob("*.parquet"))}


def encode_side_table(table: pl.DataFrame | None, key: str, id_vocab: Vocab, features: list[str] | None,
                      ) -> tuple[pl.DataFrame, dict[str, Vocab]]:
    """One row per id code (2..size-1) with the encoded feature columns (1 where unknown).

    ``key`` is the raw id column of ``table``; output key column is ``<key>_id``.
    """
    out_key = f"{key}_id"
    ids = pl.DataFrame({out_key: id_vocab.codes})
    vocabs: dict[str, Vocab] = {}
    if table is None:
        return ids, vocabs
    cols = [c for c in table.columns if c != key]
    if features is not None:
        missing = [f for f in features if f not in cols]
        if missing:
            raise DataError(f"unknown {key} feature '{missing[0]}' (available: {', '.join(cols)})",
                            field=f"features.{key}")
        cols = list(features)
    t = table.unique(subset=[key], keep="first", maintain_order=True)
    t = t.with_columns(id_vocab.encode(t[key]).alias(out_key)).filter(pl.col(out_key) != UNKNOWN)
    enc = [t[out_key]]
    for c in cols:
        v = Vocab.build(c, t[c])
        vocabs[c] = v
        enc.append(v.encode(t[c]).alias(c))
    feats = pl.DataFrame(enc)
    joined = ids.join(feats, on=out_key, how="left", maintain_order="left")
    fills = []
    for c in cols:
        if isinstance(joined[c].dtype, pl.List):
            # an empty list would leave the field with no slot at all: use [unknown] instead
            fills.append(pl.when(pl.col(c).list.len().fill_null(0) == 0)
                         .then(pl.lit([UNKNOWN], dtype=pl.List(CODE_DTYPE))).otherwise(pl.col(c)).alias(c))
        else:
            fills.append(pl.col(c).fill_null(UNKNOWN))
    return joined.with_columns(fills), vocabs
