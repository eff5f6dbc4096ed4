"""Shared parsing helpers: read delimited text strictly and name the bad line/field on error.

Parsing is vectorized: the file is read once into Polars as strings, field counts are checked
with NumPy over the raw bytes, and casts are checked column-wise (a failed cast is located by
comparing nulls before and after). Only the error path computes a line number.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl

from metactr.errors import DataError

_UNIT_SEP = "\x1f"  # stands in for multi-character separators such as MovieLens' '::'


def require_file(data_dir: Path, *names: str) -> Path:
    """The first of ``names`` that exists in ``data_dir``; DataError naming the expected file otherwise."""
    for n in names:
        p = data_dir / n
        if p.is_file():
            return p
    raise DataError(f"missing file (expected {' or '.join(names)})", path=data_dir / names[0])


def read_text(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"bad {encoding} text ({e.reason}); set the reader's encoding option (e.g. latin-1)",
                        path=path, line=line) from None
    except LookupError:
        raise DataError(f"unknown encoding '{encoding}'", path=path, field="encoding") from None


def read_delimited(path: Path, columns: list[str], *, sep: str, encoding: str = "utf-8",
                   has_header: bool = False) -> pl.DataFrame:
    """Read an unquoted delimited file into string columns; every line must have len(columns) fields."""
    text = read_text(path, encoding)
    shown = sep  # the file's separator, for messages (a multi-character one is replaced below)
    if len(sep) > 1:
        if _UNIT_SEP in text:
            raise DataError("unexpected control character \\x1f in file", path=path)
        text = text.replace(sep, _UNIT_SEP)
        sep = _UNIT_SEP
    text = text.replace("\r\n", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    arr = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)
    n_lines = len(nl)
    sep_byte = ord(sep) if ord(sep) < 128 else None
    if sep_byte is None:
        raise DataError(f"separator {sep!r} must be ASCII", path=path, field="separator")
    # number of separators on each line (a line = bytes up to its newline)
    line_of_sep = np.searchsorted(nl, np.flatnonzero(arr == sep_byte))
    counts = np.bincount(line_of_sep, minlength=n_lines)
    blank = np.diff(np.concatenate([[-1], nl])) == 1
    if blank.any():
        nonblank = np.flatnonzero(~blank)
        inner = np.flatnonzero(blank[: int(nonblank[-1])]) if nonblank.size else np.zeros(0, dtype=np.int64)
        if inner.size:  # trailing blank lines are harmless; inner ones would shift every line number
            raise DataError("blank line inside the file (truncated or concatenated?)", path=path,
                            line=int(inner[0]) + 1)
    expected = len(columns) - 1
    bad = np.flatnonzero((counts != expected) & ~blank)
    if bad.size:
        i = int(bad[0])
        start = 0 if i == 0 else int(nl[i - 1]) + 1
        snippet = arr[start:int(nl[i])].tobytes().decode("utf-8", "replace")[:60]
        hint = " (wrong separator?)" if counts[i] == 0 else ""
        snippet = snippet.replace(_UNIT_SEP, shown)
        raise DataError(f"expected {len(columns)} fields separated by {shown!r}, found {counts[i] + 1}{hint}: "
                        f"{snippet!r}", path=path, line=i + 1)
    if n_lines - int(blank.sum()) - int(has_header) <= 0:
        return pl.DataFrame({c: pl.Series([], dtype=pl.String) for c in columns})
    df = pl.read_csv(io.BytesIO(arr.tobytes()), has_header=has_header, separator=sep, quote_char=None,
                     new_columns=columns, infer_schema=False)
    return df


def cast_checked(df: pl.DataFrame, casts: dict[str, pl.DataType], path: Path, *, line_offset: int = 1,
                 lenient: bool = False, hint: str = "") -> pl.DataFrame:
    """Cast string columns; the first value that does not parse is a DataError naming line and field.

    ``line_offset`` = file line of row 0 (2 when there is a header line). ``lenient``: leave
    values that do not parse as null instead (``on_bad_rows: skip``: the boundary checks drop
    and count them). ``hint`` is added to the message when the first data line fails.
    """
    out = []
    for name, dtype in casts.items():
        if name not in df.columns:
            raise DataError(f"missing column '{name}'", path=path, field=name)
        col = df[name]
        src = col.str.strip_chars() if col.dtype == pl.String else col
        casted = src.cast(dtype, strict=False)
        failed = casted.is_null() & src.is_not_null()
        if failed.any() and not lenient:
            i = int(failed.arg_max())
            what = f"empty {name}" if src[i] == "" else f"cannot parse {src[i]!r} as {dtype}"
            raise DataError(what + (hint if i == 0 else ""), path=path, line=i + line_offset, field=name)
        out.append(casted.alias(name))
    return df.with_columns(out)


def numbered(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``row`` (int64 file order) used to break timestamp ties."""
    return df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def locate_bad_csv_line(path: Path, *, sep: str, encoding: str, n_fields: int | None,
                        ) -> tuple[int | None, str]:
    """Error path only: the first line whose field count differs (Python's csv, streaming).

    ``n_fields`` None: the first line (a header) sets the count."""
    import csv

    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f, delimiter=sep)
            for row in reader:
                if n_fields is None:
                    n_fields = len(row)
                    continue
                if row and len(row) != n_fields:
                    hint = " (wrong separator?)" if len(row) == 1 else ""
                    return reader.line_num, f"expected {n_fields} fields, found {len(row)}{hint}"
    except UnicodeDecodeError as e:
        return None, f"bad {encoding} text ({e.reason}); set the encoding option"
    except csv.Error as e:
        return None, f"malformed CSV: {e}"
    return None, ""


def read_csv_strings(path: Path, *, sep: str = ",", encoding: str = "utf-8", has_header: bool = True,
                     columns: list[str] | None = None, new_columns: list[str] | None = None) -> pl.DataFrame:
    """Read a (possibly quoted) CSV into string columns; errors name the file, line and field."""
    if not path.is_file():
        raise DataError("missing file", path=path)
    enc = encoding.lower().replace("_", "-")
    try:
        if enc in ("utf-8", "utf8"):
            src = path
        else:
            src = io.BytesIO(read_text(path, encoding).encode("utf-8"))
        df = pl.read_csv(src, separator=sep, has_header=has_header, infer_schema=False, new_columns=new_columns,
                         columns=columns if has_header else None)
    except pl.exceptions.ColumnNotFoundError as e:
        raise DataError(f"missing column ({' '.join(str(e).split())[:120]})", path=path) from None
    except pl.exceptions.PolarsError as e:  # malformed text (field counts, quotes, encoding, no data)
        n = len(new_columns) if new_columns and not has_header else None
        line, why = locate_bad_csv_line(path, sep=sep, encoding=encoding, n_fields=n)
        if "invalid utf-8" in str(e).lower():
            why = why or "bad utf-8 text; set the encoding option (e.g. latin-1)"
        raise DataError(why or f"cannot parse CSV: {' '.join(str(e).split())[:160]}", path=path, line=line) from None
    if columns is not None and has_header:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"missing column '{missing[0]}'", path=path, field=missing[0])
    return df
