"""Per-split statistics of a prepared directory (users, items, samples, sparsity, positive rate),
in the spirit of the RML paper's Table 1 (sparsity = samples / (users x items)).

Computed from the split files themselves (not from meta.json), so they also describe
directories we did not write, such as the authors' published ``ml-1m-rml``. Items counts the
distinct items among targets and session items.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from metactr.errors import DataError

_SKIP = {"users.parquet", "items.parquet"}


_PART_ORDER = ["train", "support", "query", "valid", "finetune_a", "finetune_b", "finetune_c", "test"]


def _split_order(p: Path) -> tuple:
    """wc_* before cw_* (the paper's order), then train, fine-tuning, test within a subset."""
    stem = p.stem
    prefix = 0 if stem.startswith("wc_") else 1 if stem.startswith("cw_") else 2
    rank = next((i for i, part in enumerate(_PART_ORDER) if stem.endswith(part)), len(_PART_ORDER))
    return (prefix, "newuser" in stem, rank, stem)


def split_stats(prepared_dir: str | Path) -> list[dict]:
    root = Path(prepared_dir)
    if not root.is_dir():
        raise DataError("prepared dataset directory not found", path=root)
    files = sorted((p for p in root.glob("*.parquet") if p.name not in _SKIP), key=_split_order)
    if not files:
        raise DataError("no split files (*.parquet) in directory", path=root)
    rows = []
    for p in files:
        lf = pl.scan_parquet(p)
        try:
            names = lf.collect_schema().names()
        except Exception as e:
            raise DataError(f"cannot read Parquet: {e}", path=p) from None
        for c in ("user_id", "target_item_id", "hist_item_ids", "label"):
            if c not in names:
                raise DataError(f"missing column '{c}'", path=p, field=c)
        head = lf.select(
            pl.len().alias("samples"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("label").cast(pl.Float64).mean().alias("pos_rate"),
            pl.col("hist_item_ids").list.len().mean().alias("mean_session_len"),
        ).collect().row(0, named=True)
        items = pl.concat([lf.select(pl.col("target_item_id").alias("i")),
                           lf.select(pl.col("hist_item_ids").explode().alias("i"))]).drop_nulls().unique().select(
            pl.len()).collect().item()
        n, u = int(head["samples"]), int(head["users"])
        rows.append({
            "split": p.stem, "users": u, "items": int(items), "samples": n,
            "sparsity": (n / (u * items)) if u and items else None,
            "pos_rate": float(head["pos_rate"]) if head["pos_rate"] is not None else None,
            "mean_session_len": float(head["mean_session_len"]) if head["mean_session_len"] is not None else None,
        })
    return rows


def stats_table(rows: list[dict], title: str | None = None):
    """A Rich table of ``split_stats`` rows."""
    from rich.table import Table

    t = Table(title=title)
    for name, just in (("split", "left"), ("users", "right"), ("items", "right"), ("samples", "right"),
                       ("sparsity", "right"), ("pos. rate", "right"), ("sess. len", "right")):
        t.add_column(name, justify=just, no_wrap=True)
    for r in rows:
        t.add_row(r["split"], f"{r['users']:,}", f"{r['items']:,}", f"{r['samples']:,}",
                  "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.5f}%",
                  "-" if r["pos_rate"] is None else f"{r['pos_rate']:.3f}",
                  "-" if r["mean_session_len"] is None else f"{r['mean_session_len']:.1f}")
    return t


MIN_TEST_ROWS = 1000


def stats_warnings(rows: list[dict], meta: dict | None = None, *, min_test_rows: int = MIN_TEST_ROWS) -> list[str]:
    """One-line warnings about a prepared directory: test sets under ``min_test_rows`` rows (an
    AUC on a few hundred rows has a 95% interval of about +-0.05, wider than the gaps between
    methods), and a ``future`` holdout cut by file order because the data have no timestamps."""
    out = []
    small = [f"{r['split']} {r['samples']:,}" for r in rows
             if r["split"].endswith("test") and r["samples"] < min_test_rows]
    meta = meta or {}
    if small:
        hint = "; try rml.holdout=future" if meta.get("protocol") == "rml" else ""
        out.append(f"warning: test set(s) under {min_test_rows:,} rows ({', '.join(small)}): "
                   f"too few to tell methods apart{hint}")
    facts = meta.get("protocol_facts") or {}
    if facts.get("future_order", "timestamp") != "timestamp":
        out.append(f"note: the data have no timestamps; the future holdout was cut by {facts['future_order']}")
    return out


def read_meta(prepared_dir: str | Path) -> dict:
    """meta.json of a prepared directory ({} when absent or unreadable: stats describe any directory)."""
    p = Path(prepared_dir) / "meta.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def print_stats(prepared_dir: str | Path, *, console=None) -> list[dict]:
    from rich.console import Console

    rows = split_stats(prepared_dir)
    console = console or Console()
    console.print(stats_table(rows, title=str(prepared_dir)))
    for line in stats_warnings(rows, read_meta(prepared_dir)):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return rows


def click_counts(prepared_dir: str | Path, splits: list[str] | None = None) -> dict:
    """Target rows of ``splits`` (default: every split whose name ends in ``train``) as columns:
    ``{"splits": [...], "user_id", "item_id", "label"}`` NumPy arrays (int64 / float64). The
    simple rate baselines (``models.rates``) count clicks from them."""
    root = Path(prepared_dir)
    if not root.is_dir():
        raise DataError("prepared dataset directory not found", path=root)
    avail = {p.stem: p for p in root.glob("*.parquet") if p.name not in _SKIP}
    names = list(splits) if splits is not None else sorted(n for n in avail if n.endswith("train"))
    missing = [n for n in names if n not in avail]
    if missing or not names:
        raise DataError(f"no split(s) {missing or 'ending in train'} to count clicks from "
                        f"(available: {', '.join(sorted(avail)) or 'none'})", path=root, field="stats_splits")
    cols = []
    for n in names:
        try:
            cols.append(pl.read_parquet(avail[n], columns=["user_id", "target_item_id", "label"]))
        except Exception as e:
            raise DataError(f"cannot read Parquet: {e}", path=avail[n]) from None
    df = pl.concat(cols)
    return {"splits": names, "user_id": df["user_id"].to_numpy().astype("int64"),
            "item_id": df["target_item_id"].to_numpy().astype("int64"),
            "label": df["label"].to_numpy().astype("float64")}
