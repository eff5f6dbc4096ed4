"""Readers: raw files of one dataset -> one canonical interaction table (``RawData``).

Every reader returns the same shape so that the encoder and splitter never know where the data
came from:

    interactions  user, item, timestamp (int64, seconds or any monotone clock), row (int64 file
                  order, breaks timestamp ties), and either ``rating`` (float) or ``label`` (0/1)
    users         user + raw user side features (scalars, or lists for multi-valued fields)
    items         item + raw item side features

Registry: ``read_dataset(name, data_dir, on_bad_rows=..., **opts)``. Reader options are keyword
arguments of the reader function; an unknown option is a ``ConfigError``. ``read_dataset`` is
the one boundary between readers and the encoder: it puts ids in a canonical form and checks
every interaction's values (``checks.py``), whatever the reader.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from metactr.errors import ConfigError, DataError


@dataclass
class RawData:
    """The canonical interaction table and the raw side-feature tables of one dataset."""

    interactions: pl.DataFrame
    users: pl.DataFrame | None = None
    items: pl.DataFrame | None = None
    sources: list[Path] = field(default_factory=list)  # input files, for the cache fingerprint
    has_time: bool = True  # False: ``timestamp`` is file order (Book-Crossing)
    line_offset: int = 1  # file line of the interaction with row 0 (2 with a header line)
    notes: list[str] = field(default_factory=list)
    rating_range: tuple[float, float] | None = None  # the dataset's documented rating scale
    rating_step: float | None = None  # e.g. 1 (whole stars) or 0.5 (half stars)
    rating_source: str = ""  # whose documented range (named in the error)
    field_names: dict[str, str] = field(default_factory=dict)  # canonical -> the file's column name
    bad_rows: dict = field(default_factory=dict)  # filled by checks.check_values

    @property
    def label_kind(self) -> str:
        return "label" if "label" in self.interactions.columns else "rating"


_READERS: dict[str, Callable[..., RawData]] = {}


def register_reader(*names: str) -> Callable[[Callable[..., RawData]], Callable[..., RawData]]:
    def deco(fn: Callable[..., RawData]) -> Callable[..., RawData]:
        for n in names:
            _READERS[n] = fn
        return fn

    return deco


def reader_names() -> list[str]:
    _load_all()
    return sorted(_READERS)


def _load_all() -> None:
    # import for the registration side effect; each module is small
    from metactr.data.readers import (amazon, avazu, bookcrossing, custom, movielens, movielens_csv,  # noqa: F401
                                      synthetic)


def read_dataset(name: str, data_dir: str | Path, *, on_bad_rows: str = "error", **opts) -> RawData:
    """Read dataset ``name`` from ``data_dir`` (a folder, or a file for single-file datasets).

    ``on_bad_rows``: "error" (a bad value is a DataError naming file, line and field) or
    "skip" (bad rows are dropped and counted in ``RawData.bad_rows`` and ``notes``).
    """
    from metactr.data.readers import checks

    checks.check_policy(on_bad_rows)
    _load_all()
    if name not in _READERS:
        raise ConfigError(f"unknown dataset '{name}' (known: {', '.join(sorted(_READERS))})", field="dataset")
    fn = _READERS[name]
    accepted = set(inspect.signature(fn).parameters) - {"data_dir"}
    for k in opts:
        if k not in accepted:
            raise ConfigError(f"unknown option for reader '{name}' (known: {', '.join(sorted(accepted)) or 'none'})",
                              field=f"reader.{k}")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError("data directory not found", path=data_dir)
    token = checks._POLICY.set(on_bad_rows)
    try:
        raw = fn(data_dir, **opts)
    finally:
        checks._POLICY.reset(token)
    if raw.interactions.height == 0:
        raise DataError("no interactions read", path=raw.sources[0] if raw.sources else data_dir)
    checks.canonicalize(raw)
    checks.check_values(raw, on_bad_rows)
    if raw.interactions.height == 0:
        raise DataError("no valid interactions left after skipping bad rows", path=raw.sources[0] if raw.sources
                        else data_dir, field="on_bad_rows")
    return raw
