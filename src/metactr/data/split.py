"""The three split protocols, written straight to Parquet split files in user chunks.

Input is the encoded interaction log sorted by (user, time, file order) as NumPy arrays
(``Log``). Each protocol decides, per user and per sample, which split a sample goes to; the
session lists are built chunk by chunk (``sessions.build_samples``) and streamed to one Parquet
writer per split, so memory stays bounded by the chunk size, not the log size.

* ``rml``  -- the generalized cold-start protocol of Recurrent Meta-Learning (MM'22, Sec. 4.2):
  warm/cold users (seeded, default 4:1), warm/cold items by an interaction-count threshold
  (default the median, ~1:1), subsets WC = warm users x cold items and CW = cold users x warm
  items, sliding-window sessions, each user's last session to one of FT-A/FT-B/FT-C/test
  (``paper``), or each user's last ``test_sessions`` sessions to test and the three before them
  to FT-C, FT-B, FT-A (``temporal``), or a time cut (``future``, see ``future_bounds``): every
  session whose target comes after the ``future_start`` quantile of the subset's target times
  goes, by time, to consecutive windows FT-A, FT-B, FT-C, test (relative sizes
  ``future_windows``), training keeps only sessions before the cut. ``paper`` and ``temporal``
  give one (or k) test session per user: a few hundred rows on ML-1M-partial; ``future`` gives
  thousands (the rows an interval needs).
  Deviation, documented: users are filtered twice, on the whole log and again inside each subset
  (``subset_min_interactions``), which is what the authors' published ML-1M split shows (every
  WC/CW user there has >= 20 interactions in the subset).
* ``random`` -- every interaction with at least one earlier interaction of its user is a sample
  (no empty sessions); seeded 80/10/10 split by sample.
* ``metaselector`` -- MetaSelector (WWW'20, Sec. 5.1/5.3): per user chronological 80% train /
  20% test, train split 75% support / 25% query (chronologically, our reading); an optional
  fraction of users held out entirely as new users (their own 80/20 train/test). Positions are
  counted over all of a user's interactions, but a user's first interaction (no history) is
  not a sample, so that no session is empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from metactr.data.sessions import arrow, build_samples, numpy_of, positions, target_mask
from metactr.errors import DataError

RML_PARTS = ("train", "finetune_a", "finetune_b", "finetune_c", "test")  # the RML protocol's splits per subset
FT_STAGES = RML_PARTS[1:4]
RML_SUBSETS = ("wc", "cw")
MS_SPLITS = ("ms_support", "ms_query", "ms_test")
MS_NEWUSER_SPLITS = ("ms_newuser_train", "ms_newuser_test")
RANDOM_SPLITS = ("train", "valid", "test")
WEEKDAY_VOCAB = 9  # 0 pad, 1 unknown, Monday..Sunday -> 2..8
SEASON_VOCAB = 6  # 0 pad, 1 unknown, winter/spring/summer/autumn -> 2..5


@dataclass
class Log:
    """Encoded interactions sorted by (user, timestamp, row)."""

    user: np.ndarray  # int32 codes
    item: np.ndarray  # int32 codes
    label: np.ndarray  # int8
    timestamp: np.ndarray  # int64
    n_items: int  # item vocabulary size (codes < n_items)
    has_time: bool = True

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask_or_idx) -> Log:
        return Log(self.user[mask_or_idx], self.item[mask_or_idx], self.label[mask_or_idx],
                   self.timestamp[mask_or_idx], self.n_items, self.has_time)


@dataclass
class SplitCounts:
    rows: int = 0
    users: int = 0
    positives: int = 0
    items_seen: np.ndarray | None = None

    def as_dict(self) -> dict:
        items = int(self.items_seen.sum()) if self.items_seen is not None else 0
        return {"rows": self.rows, "users": self.users, "items": items,
                "pos_rate": round(self.positives / self.rows, 6) if self.rows else None}


@dataclass
class SplitSink:
    """One Parquet writer per split; every split file exists at the end, even if empty."""

    out_dir: Path
    names: tuple[str, ...]
    n_items: int
    context: bool = False
    writers: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        cols = [("user_id", pa.int32()), ("hist_item_ids", pa.list_(pa.int32())),
                ("hist_labels", pa.list_(pa.int8())), ("target_item_id", pa.int32()), ("label", pa.int8())]
        if self.context:
            cols += [("ctx_weekday", pa.int32()), ("ctx_season", pa.int32())]
        cols.append(("timestamp", pa.int64()))
        self.schema = pa.schema(cols)
        for n in self.names:
            self.writers[n] = pq.ParquetWriter(self.out_dir / f"{n}.parquet", self.schema, compression="lz4",
                                                # ids rarely repeat within a page: dictionary
                                                # encoding costs time and saves little
                                                use_dictionary=["label", "hist_labels"])
            self.counts[n] = SplitCounts(items_seen=np.zeros(self.n_items, dtype=bool))

    def write(self, name: str, log: Log, s, sel: np.ndarray) -> None:
        """Write samples ``sel`` (a boolean mask over the chunk's samples ``s``) of chunk ``log``."""
        if not sel.any():
            return
        idx = s.target_idx[sel]
        sel_pa = arrow(sel)  # arrow(): pa.array without pyarrow's pandas import (issue 17)
        hist_items = s.hist_items.filter(sel_pa)
        cols = {
            "user_id": arrow(log.user[idx]),
            "hist_item_ids": hist_items,
            "hist_labels": s.hist_labels.filter(sel_pa),
            "target_item_id": arrow(log.item[idx]),
            "label": arrow(log.label[idx]),
        }
        if self.context:
            wd, se = context_codes(log.timestamp[idx], log.has_time)
            cols["ctx_weekday"], cols["ctx_season"] = arrow(wd), arrow(se)
        cols["timestamp"] = arrow(log.timestamp[idx])
        self.writers[name].write_table(pa.Table.from_arrays([cols[f.name] for f in self.schema], schema=self.schema))
        c = self.counts[name]
        c.rows += len(idx)
        c.positives += int(log.label[idx].sum())
        u = log.user[idx]  # sorted by user within a chunk, and chunks never split a user
        c.users += int(np.count_nonzero(u[1:] != u[:-1])) + 1
        c.items_seen[log.item[idx]] = True
        flat = numpy_of(hist_items.flatten())
        c.items_seen[flat] = True

    def close(self) -> dict[str, dict]:
        for w in self.writers.values():
            w.close()
        return {n: c.as_dict() for n, c in self.counts.items()}


def context_codes(ts: np.ndarray, has_time: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weekday (Mon=2..Sun=8) and season (DJF=2, MAM=3, JJA=4, SON=5) codes of Unix seconds."""
    if not has_time:
        one = np.ones(len(ts), dtype=np.int32)
        return one, one.copy()
    dt = pl.from_epoch(pl.Series(ts), time_unit="s")
    wd = (dt.dt.weekday().cast(pl.Int32) + 1).to_numpy()  # polars weekday: Monday=1
    season = ((dt.dt.month().cast(pl.Int32) % 12) // 3 + 2).to_numpy()
    return wd.astype(np.int32), season.astype(np.int32)


def user_chunks(user: np.ndarray, chunk_rows: int) -> Iterator[slice]:
    """Slices of the sorted log that hold about ``chunk_rows`` rows and never split a user."""
    n = len(user)
    if n == 0:
        return
    change = np.flatnonzero(user[1:] != user[:-1]) + 1
    starts = np.concatenate([[0], change, [n]])
    i, last = 0, len(starts) - 1
    while i < last:
        j = int(np.searchsorted(starts, starts[i] + chunk_rows, side="right")) - 1
        j = min(max(j, i + 1), last)  # at least one user per chunk
        yield slice(int(starts[i]), int(starts[j]))
        i = j


def unique_sorted(a: np.ndarray) -> np.ndarray:
    """Distinct values of a grouped (sorted) array, without np.unique's hash/sort."""
    if len(a) == 0:
        return a[:0]
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def filter_min_interactions(log: Log, min_count: int) -> Log:
    _, cnt = positions(log.user)
    return log if (cnt >= min_count).all() else log.take(cnt >= min_count)


# ---------------------------------------------------------------------------------------- rml
def rml_assign(log: Log, *, cold_user_fraction: float, item_warm_quantile: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """(cold user codes sorted, warm-item flags indexed by item code, item count threshold)."""
    users = unique_sorted(log.user)
    rng = np.random.default_rng(seed)
    n_cold = int(round(len(users) * cold_user_fraction))
    cold = np.sort(rng.permutation(users)[:n_cold])
    counts = np.bincount(log.item, minlength=log.n_items)
    present = counts[counts > 0]
    threshold = float(np.quantile(present, item_warm_quantile)) if present.size else 0.0
    warm_item = counts > threshold
    return cold, warm_item, threshold


def rml_holdout_dest(users: np.ndarray, n_user_codes: int, *, finetune_users: int | None, seed: int,
                     subset: str) -> np.ndarray:
    """Per user code: 1..4 = FT-A, FT-B, FT-C, test for the user's last session (paper mode)."""
    rng = np.random.default_rng([seed, 1 if subset == "wc" else 2])
    dest = np.zeros(n_user_codes, dtype=np.int8)
    if finetune_users is None:
        dest[users] = rng.integers(1, 5, size=len(users))
    else:
        if 3 * finetune_users >= len(users):
            raise DataError(f"{subset.upper()} has {len(users)} users, too few for 3 x {finetune_users} "
                            "fine-tuning users plus a test set", field="rml.finetune_users")
        order = rng.permutation(users)
        k = finetune_users
        dest[order[:k]], dest[order[k:2 * k]], dest[order[2 * k:3 * k]], dest[order[3 * k:]] = 1, 2, 3, 4
    return dest


def future_bounds(target_ts: np.ndarray, start: float, windows) -> tuple[float, np.ndarray]:
    """The future holdout's time cut and the upper bounds of FT-A, FT-B, FT-C.

    ``cut`` is the ``start`` quantile of the target times (the ``round(start * n)``-th smallest);
    targets at or before it train. The ``m`` later targets are cut, in time order, into windows
    of ``round(cumsum(windows) / sum(windows) * m)`` cumulative sizes; ``bounds[j]`` is the time
    of the last target of window j (ties at a bound stay in the earlier window, so windows are
    consecutive in time and their sizes drift by the tied targets only). A target at time t > cut
    goes to window ``searchsorted(bounds, t)``: 0..2 = FT-A..FT-C, 3 = test.
    """
    s = np.sort(np.asarray(target_ts))
    n = len(s)
    if n == 0:
        return 0.0, np.zeros(3)
    k = int(np.clip(round(start * n), 1, n))
    cut = s[k - 1]
    held = s[k:][s[k:] > cut]
    w = np.asarray(windows, dtype=np.float64)
    ends = np.rint(np.cumsum(w)[:3] / w.sum() * len(held)).astype(np.int64)
    bounds = np.where(ends >= 1, held[np.maximum(ends - 1, 0)] if len(held) else cut, cut)
    return cut, bounds.astype(np.float64)


def temporal_part(k: np.ndarray, test_sessions: int) -> np.ndarray:
    """``temporal``: session k (counted back from the last, 0 = last) -> part index in RML_PARTS."""
    kt = test_sessions
    return np.where(k < kt, 4, np.where(k < kt + 3, 3 - (k - kt), 0))


def write_groups(out_dir: Path, log: Log, is_cold_user: np.ndarray, warm_item: np.ndarray) -> None:
    """protocol/user_groups.parquet and item_groups.parquet: who is warm or cold (for analysis and
    tests; a subfolder, so loaders that glob ``*.parquet`` never take them for splits)."""
    d = out_dir / "protocol"
    d.mkdir(exist_ok=True)
    users = unique_sorted(log.user)
    pl.DataFrame({"user_id": users, "cold": is_cold_user[users]}).write_parquet(d / "user_groups.parquet")
    items = np.flatnonzero(np.bincount(log.item, minlength=log.n_items) > 0).astype(np.int32)
    pl.DataFrame({"item_id": items, "warm": warm_item[items]}).write_parquet(d / "item_groups.parquet")


def write_rml(log: Log, out_dir: Path, *, n_user_codes: int, cfg, chunk_rows: int) -> tuple[dict, dict]:
    """Write {wc,cw}_{train,finetune_a..c,test}.parquet; returns (counts, protocol facts)."""
    r, sess = cfg.rml, cfg.session
    cold, warm_item, threshold = rml_assign(log, cold_user_fraction=r.cold_user_fraction,
                                            item_warm_quantile=r.item_warm_quantile, seed=cfg.seed)
    is_cold_user = np.zeros(n_user_codes, dtype=bool)
    is_cold_user[cold] = True
    counts, facts = {}, {"item_count_threshold": threshold, "warm_items": int(warm_item.sum()),
                         "cold_items": int(((np.bincount(log.item, minlength=log.n_items) > 0) & ~warm_item).sum()),
                         "warm_users": int(len(unique_sorted(log.user)) - len(cold)), "cold_users": int(len(cold))}
    if r.holdout == "future":
        facts["future_order"] = "timestamp" if log.has_time else "file order (no timestamps)"
    write_groups(out_dir, log, is_cold_user, warm_item)
    for subset, user_cold, item_warm in (("wc", False, False), ("cw", True, True)):
        mask = (is_cold_user[log.user] == user_cold) & (warm_item[log.item] == item_warm)
        sub = filter_min_interactions(log.take(mask), r.subset_min_interactions)
        users = unique_sorted(sub.user)
        facts[f"{subset}_users"] = int(len(users))
        dest = (rml_holdout_dest(users, n_user_codes, finetune_users=r.finetune_users, seed=cfg.seed, subset=subset)
                if r.holdout == "paper" else None)
        if r.holdout == "future":
            is_t = target_mask(sub.user, stride=sess.stride, min_hist=sess.min_len)[0]
            cut, bounds = future_bounds(sub.timestamp[is_t], r.future_start, r.future_windows)
            facts[f"{subset}_future_cut"], facts[f"{subset}_future_bounds"] = float(cut), bounds.tolist()
        names = tuple(f"{subset}_{p}" for p in RML_PARTS)
        sink = SplitSink(out_dir, names, log.n_items)
        try:
            for sl in user_chunks(sub.user, chunk_rows):
                ch = sub.take(sl)
                s = build_samples(ch.user, ch.item, ch.label, max_len=sess.max_len, stride=sess.stride,
                                  min_hist=sess.min_len)
                k = s.rev_pos // sess.stride  # sessions counted back from the last one
                if r.holdout == "paper":
                    part = np.where(k == 0, dest[ch.user[s.target_idx]], 0)
                elif r.holdout == "temporal":
                    part = temporal_part(k, r.test_sessions)
                else:
                    t = ch.timestamp[s.target_idx]
                    part = np.where(t > cut, 1 + np.searchsorted(bounds, t, side="left"), 0)
                for j, name in enumerate(names):
                    sink.write(name, ch, s, part == j)
        finally:
            counts.update(sink.close())
    return counts, facts


# ---------------------------------------------------------------------------------------- random
def write_random(log: Log, out_dir: Path, *, cfg, chunk_rows: int) -> tuple[dict, dict]:
    rc = cfg.random
    u = np.random.default_rng(cfg.seed).random(len(log))
    part_of_row = np.where(u < rc.test_fraction, 2, np.where(u < rc.test_fraction + rc.valid_fraction, 1, 0))
    sink = SplitSink(out_dir, RANDOM_SPLITS, log.n_items)
    try:
        for sl in user_chunks(log.user, chunk_rows):
            ch = log.take(sl)
            s = build_samples(ch.user, ch.item, ch.label, max_len=cfg.session.max_len, stride=1, min_hist=1)
            part = part_of_row[sl][s.target_idx]
            for j, name in enumerate(RANDOM_SPLITS):
                sink.write(name, ch, s, part == j)
    finally:
        counts = sink.close()
    return counts, {}


# ---------------------------------------------------------------------------------------- metaselector
def leading_count(n: np.ndarray, fraction: float) -> np.ndarray:
    """How many of each user's ``n`` chronologically first rows go to the first part of a cut at
    ``fraction``: ``round(n * fraction)``, at least 1 and, where ``n >= 2``, at most ``n - 1``
    (both parts non-empty). Shared by the MetaSelector pipeline and its validation protocol."""
    return np.clip(np.rint(n * fraction), 1, np.maximum(n - 1, 1)).astype(np.int64)


def write_metaselector(log: Log, out_dir: Path, *, n_user_codes: int, cfg, chunk_rows: int) -> tuple[dict, dict]:
    ms = cfg.metaselector
    users = unique_sorted(log.user)
    rng = np.random.default_rng([cfg.seed, 3])
    n_new = int(round(len(users) * ms.newuser_fraction))
    is_new = np.zeros(n_user_codes, dtype=bool)
    is_new[rng.permutation(users)[:n_new]] = True
    names = MS_SPLITS + (MS_NEWUSER_SPLITS if ms.newuser_fraction > 0 else ())
    sink = SplitSink(out_dir, names, log.n_items, context=True)
    try:
        for sl in user_chunks(log.user, chunk_rows):
            ch = log.take(sl)
            s = build_samples(ch.user, ch.item, ch.label, max_len=cfg.session.max_len, stride=1, min_hist=1)
            pos, cnt = positions(ch.user)
            pos, cnt = pos[s.target_idx], cnt[s.target_idx]
            n_train = leading_count(cnt, ms.train_fraction)
            n_support = leading_count(n_train, ms.support_fraction)
            new = is_new[ch.user[s.target_idx]]
            part = np.where(pos < n_support, 0, np.where(pos < n_train, 1, 2))
            part = np.where(new, np.where(pos < n_train, 3, 4), part)
            for j, name in enumerate(names):
                sink.write(name, ch, s, part == j)
    finally:
        counts = sink.close()
    return counts, {"newusers": int(n_new)}
