"""The bench's datasets: prepared once per split seed, named from meta.json, with the Bayes
ceiling where the data are the synthetic log (whose raw file keeps each click's true probability)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from metactr.errors import ConfigError, DataError
from metactr.papers.bench.config import BenchConfig, DatasetSpec
from metactr.utils import expand_path, write_json_atomic


@dataclass
class PreparedEntry:
    spec: DatasetSpec
    split_seed: int | None
    prepared: Path
    raw_log: Path | None  # the synthetic log with p_click, when there is one


def _expand(text: str) -> str:
    return str(expand_path(text, field="datasets"))


def _prepare_config(spec: DatasetSpec, protocol: str, seed: int | None):
    from metactr.config import apply_overrides, read_yaml, validate
    from metactr.data.pipeline import PrepareConfig

    base = dict(read_yaml(_expand(spec.prepare)) if isinstance(spec.prepare, str) else spec.prepare)
    base.setdefault("protocol", protocol)
    data = apply_overrides(base, list(spec.set) + ([f"seed={seed}"] if seed is not None else []))
    cfg = validate(PrepareConfig, data, source=f"datasets.{spec.name}.prepare")
    if cfg.protocol != protocol:
        raise ConfigError(f"dataset '{spec.name}' is prepared with protocol '{cfg.protocol}', the bench runs "
                          f"'{protocol}'", field=f"datasets.{spec.name}.prepare.protocol")
    return cfg


def _synthetic_log(prepared: Path) -> Path | None:
    """The raw log a prepared synthetic directory came from, if it is still there with p_click."""
    from metactr.data.stats import read_meta

    meta = read_meta(prepared)
    if meta.get("dataset") != "synthetic":
        return None
    for f in meta.get("input_fingerprint") or []:
        p = Path(f.get("file", ""))
        if p.suffix == ".parquet" and not p.name.endswith((".users.parquet", ".items.parquet")) and p.is_file():
            return p if "p_click" in pl.read_parquet_schema(p) else None
    return None


def prepare_all(cfg: BenchConfig, out: Path, echo=print) -> list[PreparedEntry]:
    """Every (dataset, split seed) as a prepared directory (reused when the pipeline's cache holds it)."""
    from metactr.data.pipeline import prepare

    entries = []
    for spec in cfg.datasets:
        if spec.prepared is not None:
            p = Path(_expand(spec.prepared))
            if not p.is_dir():
                raise DataError("prepared dataset directory not found", path=p, field=f"datasets.{spec.name}.prepared")
            entries.append(PreparedEntry(spec, None, p, _synthetic_log(p)))
            continue
        if spec.synth is not None:
            from metactr.data.synth import generate

            raw = out / "data" / spec.name / "raw" / "interactions.parquet"
            settings = raw.with_name("synth.json")  # what the log was generated with
            want = spec.synth.model_dump()
            if settings.is_file() and raw.is_file() and json.loads(settings.read_text()) != want:
                raw.unlink()  # (ours: generated here) other settings: generate it again
            if not raw.is_file():
                generate(raw, **want)
            if not settings.is_file() or json.loads(settings.read_text()) != want:
                write_json_atomic(settings, want)  # (a log of a bench made before synth.json: these settings)
            reader, raw_dir = "synthetic", raw
        else:
            reader, raw_dir = spec.dataset, Path(_expand(spec.raw))
            if not raw_dir.exists():
                raise DataError("raw data not found", path=raw_dir, field=f"datasets.{spec.name}.raw")
        for seed in (cfg.split_seeds or [None]):
            pcfg = _prepare_config(spec, cfg.protocol, seed)
            dest = out / "data" / spec.name / ("prepared" if seed is None else f"prepared_split{seed}")
            p = Path(prepare(reader, raw_dir, dest, pcfg))
            echo(f"prepared {spec.name}" + ("" if seed is None else f" (split seed {seed})") + f": {p}")
            entries.append(PreparedEntry(spec, seed, p, _synthetic_log(p)))
    return entries


def bayes_probs(entry: PreparedEntry, split_file: str) -> np.ndarray | None:
    """The generator's click probability of each row of ``split_file`` (in file order), or None.

    The prepared rows keep (user code, item code, timestamp); the vocabularies map the codes back
    to raw ids and the raw log gives ``p_click`` of that (user, item, time)."""
    if entry.raw_log is None:
        return None
    root = entry.prepared
    test = pl.read_parquet(root / f"{split_file}.parquet", columns=["user_id", "target_item_id", "timestamp"])
    uv = pl.read_parquet(root / "vocab" / "user_id.parquet").rename({"raw": "user_raw", "code": "user_id"})
    iv = pl.read_parquet(root / "vocab" / "item_id.parquet").rename({"raw": "item_raw", "code": "target_item_id"})
    t = (test.with_row_index("row").join(uv, on="user_id", how="left").join(iv, on="target_item_id", how="left"))
    log = (pl.read_parquet(entry.raw_log, columns=["user_id", "item_id", "timestamp", "p_click"])
           .rename({"user_id": "user_raw", "item_id": "item_raw"})
           .unique(subset=["user_raw", "item_raw", "timestamp"], keep="first"))
    log = log.with_columns(pl.col("user_raw").cast(t.schema["user_raw"]), pl.col("item_raw").cast(t.schema["item_raw"]))
    j = t.join(log, on=["user_raw", "item_raw", "timestamp"], how="left").sort("row")
    p = j["p_click"].to_numpy()
    if len(p) != len(test) or np.isnan(p.astype(np.float64)).any():
        return None  # a row the log does not explain: no ceiling rather than a wrong one
    return p.astype(np.float32)


def dataset_label(entry: PreparedEntry) -> dict:
    """What the reports call the data: the bench name, meta.json's dataset and how it was split."""
    from metactr.data.stats import read_meta

    meta = read_meta(entry.prepared)
    cfg = meta.get("config") or {}
    holdout = (cfg.get("rml") or {}).get("holdout") if meta.get("protocol") == "rml" else None
    src = [Path(f.get("file", "")).parent.name for f in meta.get("input_fingerprint") or []]
    paper = None
    if not meta and entry.prepared.name == "ml-1m-rml":
        paper = "exact"  # the authors' published split
    elif meta.get("dataset") == "ml-1m" and "ml-1m-partial" in src:
        paper = "same_data"
    return {"name": entry.spec.name, "dataset": meta.get("dataset") or entry.prepared.name,
            "protocol": meta.get("protocol"), "holdout": holdout, "prepared": str(entry.prepared),
            "source": sorted(set(src)), "paper": paper}
