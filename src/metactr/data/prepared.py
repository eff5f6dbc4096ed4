"""Load a prepared dataset directory into tensors and cut it into batches.

Layout (the RML paper's published ``ml-1m-rml`` layout, which our splitter also writes):

    {wc,cw}_{train,finetune_a,finetune_b,finetune_c,test}.parquet
        user_id, hist_item_ids list, hist_labels list, target_item_id, label
        [optional] ctx_<name> int columns (per-sample context fields), timestamp
    users.parquet   user_id + encoded user fields (int, or list<int> for multi-valued)
    items.parquet   item_id + encoded item fields
    meta.json       [optional] schema, vocab sizes, counts, config hash (written by ``prepare``)

Any other split names work too (``<name>.parquet``). Everything is converted to tensors once;
a batch is then a handful of index gathers, with no per-row Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from metactr.data.batch import Batch, FeatureSpec, Field, take_rows
from metactr.errors import DataError

SPLIT_COLUMNS = ("user_id", "hist_item_ids", "hist_labels", "target_item_id", "label")
RML_SPLITS = ("train", "finetune_a", "finetune_b", "finetune_c", "test")
MAX_MULTI_LEN = 16  # cap on slots of one multi-valued field (directors can reach 12 on ML-1M)


def pad_lists(col: pl.Series, width: int, *, keep: str = "last", dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Turn a list column into a left-aligned [N, width] array (0-padded) and its lengths.

    Lists longer than ``width`` keep their last (most recent) or first elements. Vectorized:
    one explode, one scatter.
    """
    n = len(col)
    if col.null_count():  # a null list counts as empty (explode would emit a null row for it)
        col = pl.select(pl.when(col.is_null()).then(pl.lit([], dtype=col.dtype)).otherwise(col)).to_series()
    lens = col.list.len().to_numpy().astype(np.int64)
    # empty lists contribute no rows, so offsets are the plain cumulative lengths
    flat = col.explode(empty_as_null=False).fill_null(0).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    out = np.zeros((n, width), dtype=dtype)
    kept = np.minimum(lens, width)
    if kept.sum() == 0:
        return out, kept
    rows = np.repeat(np.arange(n), kept)
    cols = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    skip = (lens - kept) if keep == "last" else np.zeros_like(lens)
    src = np.repeat(starts + skip, kept) + cols
    out[rows, cols] = flat[src]
    return out, kept


@dataclass
class Split:
    """One split as tensors: sample i is (user_id[i], hist[i], target[i], label[i], context[i])."""

    name: str
    user_id: Tensor  # [N] long
    hist_ids: Tensor  # [N, L] long, 0 = padding
    hist_len: Tensor  # [N] long
    hist_labels: Tensor  # [N, L] float
    target: Tensor  # [N] long
    label: Tensor  # [N] float
    context: Tensor  # [N, Sc] long
    timestamp: Tensor | None = None  # [N] long, when the split has one
    # Row-major copies [N, 3 + L + Sc] long / [N, 1 + L] float that the columns above are
    # views of (see ``Split.packed``): a random batch is then 2 row gathers instead of 7
    # column gathers, each a cache miss per row (subset of 1,024 random rows: 0.71 -> 0.34 ms).
    rows: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @classmethod
    def packed(cls, name: str, user_id: Tensor, hist_ids: Tensor, hist_len: Tensor, hist_labels: Tensor,
               target: Tensor, label: Tensor, context: Tensor, timestamp: Tensor | None = None) -> Split:
        """A split whose columns are views of two row-major tensors (same values)."""
        ints = torch.cat([t.long() for t in (user_id[:, None], target[:, None], hist_len[:, None], hist_ids, context)],
                         dim=1)
        floats = torch.cat([label[:, None].float(), hist_labels.float()], dim=1)
        return cls._from_rows(name, ints, floats, timestamp)

    @classmethod
    def _from_rows(cls, name: str, ints: Tensor, floats: Tensor, timestamp: Tensor | None) -> Split:
        L = floats.shape[1] - 1
        return cls(name, ints[:, 0], ints[:, 3:3 + L], ints[:, 2], floats[:, 1:], ints[:, 1], floats[:, 0],
                   ints[:, 3 + L:], timestamp, rows=(ints, floats))

    @classmethod
    def concat(cls, name: str, splits: list[Split]) -> Split:
        """The rows of ``splits`` one after another (timestamps kept when every split has them)."""
        if not splits:
            raise ValueError("Split.concat needs at least one split")
        ts = torch.cat([s.timestamp for s in splits]) if all(s.timestamp is not None for s in splits) else None
        cols = ("user_id", "hist_ids", "hist_len", "hist_labels", "target", "label", "context")
        return cls.packed(name, *(torch.cat([getattr(s, c) for s in splits]) for c in cols), ts)

    def subset(self, idx: Tensor | slice) -> Split:
        ts = None if self.timestamp is None else take_rows(self.timestamp, idx)
        if self.rows is not None:
            return Split._from_rows(self.name, take_rows(self.rows[0], idx), take_rows(self.rows[1], idx), ts)
        return Split(self.name, *(take_rows(t, idx) for t in (self.user_id, self.hist_ids, self.hist_len,
                                                               self.hist_labels, self.target, self.label,
                                                               self.context)), ts)


class PreparedDataset:
    """Feature tables + splits of a prepared directory; builds ``Batch``es by index."""

    def __init__(self, root: str | Path, *, use_ids: bool = True, max_hist_len: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError("prepared dataset directory not found", path=self.root)
        self.meta: dict = {}
        meta_path = self.root / "meta.json"
        if meta_path.is_file():
            try:
                self.meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg}", path=meta_path, line=e.lineno) from None
        self._check_complete()
        self.use_ids = use_ids
        self._splits: dict[str, Split] = {}
        self._max_hist_len = max_hist_len
        users = self._read_table("users.parquet", "user_id")
        items = self._read_table("items.parquet", "item_id")
        context_fields = self.meta.get("context_fields", [])
        self._build_tables(users, items, context_fields)

    def _check_complete(self) -> None:
        """A directory written by ``prepare`` (its meta.json has a format version) must hold every
        file it lists; a missing one is named (other layouts, e.g. ml-1m-rml, may lack tables)."""
        if "format_version" not in self.meta:
            return
        splits = self.meta.get("splits")
        listed = splits if isinstance(splits, dict) else {}
        names = ["users.parquet", "items.parquet"] + [f"{k}.parquet" for k in listed]
        for name in names:
            if not (self.root / name).is_file():
                raise DataError("missing prepared file (the directory is incomplete; prepare it again with --force)",
                                path=self.root / name)

    def _scan(self, path: Path, exprs: list) -> tuple:
        try:
            return pl.scan_parquet(path).select(exprs).collect().row(0)
        except Exception as e:  # noqa: BLE001 (a corrupt file: polars/pyarrow raise many types)
            raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:160]}", path=path) from None

    # ------------------------------------------------------------------ tables
    def _read_table(self, name: str, key: str) -> pl.DataFrame | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            df = pl.read_parquet(path)
        except Exception as e:  # pyarrow/polars raise many types for a corrupt file
            raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:160]}", path=path) from None
        if key not in df.columns:
            raise DataError(f"missing column '{key}'", path=path, field=key)
        return df

    def _max_id(self, key: str, table: pl.DataFrame | None) -> int:
        mx = 0
        if table is not None and table.height:
            mx = int(table[key].max())
        declared = self.meta.get("vocab_sizes", {}).get(key)
        if declared:
            mx = max(mx, int(declared) - 1)
        for p in self.split_paths().values():
            col = "target_item_id" if key == "item_id" else "user_id"
            exprs = [pl.col(col).max()]
            if key == "item_id":
                exprs.append(pl.col("hist_item_ids").list.max().max().alias("h"))
            row = self._scan(p, exprs)
            mx = max([mx] + [int(v) for v in row if v is not None])
        return mx

    def _encode_table(self, table: pl.DataFrame | None, key: str, n_rows: int) -> tuple[tuple[Field, ...], Tensor]:
        fields: list[Field] = []
        blocks: list[np.ndarray] = []
        ids = np.arange(n_rows, dtype=np.int64)
        if self.use_ids:
            fields.append(Field(key, n_rows))
            blocks.append(ids[:, None])
        if table is not None:
            row_index = table[key].to_numpy().astype(np.int64)
            vocab_decl = self.meta.get("vocab_sizes", {})
            for name in table.columns:
                if name == key:
                    continue
                col = table[name]
                if isinstance(col.dtype, pl.List):
                    width = int(min(max(col.list.len().max() or 1, 1), MAX_MULTI_LEN))
                    vals, _ = pad_lists(col, width, keep="first")
                elif col.dtype.is_integer():
                    width = 1
                    vals = col.fill_null(0).to_numpy().astype(np.int64)[:, None]
                else:
                    continue  # raw strings/floats are not model features in a prepared table
                if (vals < 0).any():
                    raise DataError("negative code in encoded column", path=self.root, field=name)
                block = np.zeros((n_rows, width), dtype=np.int64)
                block[row_index] = vals
                vocab = max(int(vals.max(initial=0)) + 1, int(vocab_decl.get(name, 0)))
                fields.append(Field(name, vocab, width))
                blocks.append(block)
        mat = np.concatenate(blocks, axis=1) if blocks else np.zeros((n_rows, 0), dtype=np.int64)
        return tuple(fields), torch.from_numpy(mat)

    def _build_tables(self, users: pl.DataFrame | None, items: pl.DataFrame | None, context_fields: list) -> None:
        n_users = self._max_id("user_id", users) + 1
        n_items = self._max_id("item_id", items) + 1
        user_fields, self.user_table = self._encode_table(users, "user_id", n_users)
        item_fields, self.item_table = self._encode_table(items, "item_id", n_items)
        ctx = tuple(Field(c["name"], int(c["vocab_size"]), 1) for c in context_fields)
        L = self._max_hist_len or int(self.meta.get("max_hist_len", 0)) or self._infer_hist_len()
        self.spec = FeatureSpec(user=user_fields, item=item_fields, context=ctx, max_hist_len=L)
        self.n_users, self.n_items = n_users, n_items

    def _infer_hist_len(self) -> int:
        L = 1
        for p in self.split_paths().values():
            v = self._scan(p, [pl.col("hist_item_ids").list.len().max()])[0]
            L = max(L, int(v or 1))
        return L

    # ------------------------------------------------------------------ splits
    def split_paths(self) -> dict[str, Path]:
        skip = {"users.parquet", "items.parquet"}
        return {p.stem: p for p in sorted(self.root.glob("*.parquet")) if p.name not in skip}

    @property
    def split_names(self) -> list[str]:
        return list(self.split_paths())

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = self._load_split(name)
        return self._splits[name]

    def _load_split(self, name: str) -> Split:
        path = self.root / f"{name}.parquet"
        if not path.is_file():
            avail = ", ".join(self.split_names) or "none"
            raise DataError(f"no split '{name}' (available: {avail})", path=path)
        try:
            df = pl.read_parquet(path)
        except Exception as e:
            raise DataError(f"cannot read Parquet: {' '.join(str(e).split())[:160]}", path=path) from None
        for c in SPLIT_COLUMNS:
            if c not in df.columns:
                raise DataError(f"missing column '{c}'", path=path, field=c)
        lab = df["label"]
        if lab.null_count() or not lab.is_in([0, 1]).all():
            bad = int(np.flatnonzero(~lab.fill_null(-1).is_in([0, 1]).to_numpy())[0])
            raise DataError(f"label must be 0 or 1, got {lab[bad]!r}", path=path, line=bad + 1, field="label")
        L = self.spec.max_hist_len
        hist, hlen = pad_lists(df["hist_item_ids"], L, keep="last")
        hlab, _ = pad_lists(df["hist_labels"], L, keep="last", dtype=np.float32)
        ctx_cols = [f"ctx_{f.name}" for f in self.spec.context]
        for c in ctx_cols:
            if c not in df.columns:
                raise DataError(f"missing context column '{c}'", path=path, field=c)
        ctx = (df.select(ctx_cols).to_numpy().astype(np.int64) if ctx_cols
               else np.zeros((df.height, 0), dtype=np.int64))
        ts = torch.from_numpy(df["timestamp"].to_numpy().astype(np.int64)) if "timestamp" in df.columns else None
        uid = df["user_id"].to_numpy().astype(np.int64)
        tgt = df["target_item_id"].to_numpy().astype(np.int64)
        if uid.size and (uid.max() >= self.n_users or tgt.max() >= self.n_items or hist.max() >= self.n_items):
            raise DataError("id outside the dataset's vocabulary", path=path)
        return Split.packed(name, torch.from_numpy(uid), torch.from_numpy(hist), torch.from_numpy(hlen),
                            torch.from_numpy(hlab), torch.from_numpy(tgt),
                            torch.from_numpy(lab.to_numpy().astype(np.float32)), torch.from_numpy(ctx), ts)

    # ------------------------------------------------------------------ batches
    def batch(self, split: Split, idx: Tensor | slice | None = None) -> Batch:
        """Gather the feature rows of samples ``idx`` (all samples when None)."""
        s = split if idx is None else split.subset(idx)
        hist_mask = s.hist_ids > 0
        return Batch(
            user=take_rows(self.user_table, s.user_id),
            item=take_rows(self.item_table, s.target),
            context=s.context,
            hist=take_rows(self.item_table, s.hist_ids),
            hist_mask=hist_mask,
            hist_label=s.hist_labels * hist_mask,
            label=s.label,
            user_id=s.user_id,
        )

    def iter_batches(self, split: Split | str, batch_size: int, *, shuffle: bool = False,
                     generator: torch.Generator | None = None, drop_last: bool = False,
                     rank: int = 0, world_size: int = 1):
        """Yield Batches. With ``world_size`` > 1 each rank takes a disjoint, equal share of
        every global batch (so that DDP sees the same global batches as one process)."""
        if isinstance(split, str):
            split = self.split(split)
        n = len(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            if not shuffle and world_size == 1:  # a contiguous range: views, no gather
                yield self.batch(split, slice(start, min(start + batch_size, n)))
                continue
            idx = order[start:start + batch_size]
            if world_size > 1:
                idx = idx[rank::world_size]
            yield self.batch(split, idx)
