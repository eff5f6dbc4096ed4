"""Tiny synthetic datasets in the prepared layouts, for tests, benchmarks and CI (one place).

``write_toy_rml_dataset``: the ml-1m-rml layout (``{wc,cw}_{train,finetune_a..c,test}``) with a
known signal (a user's taste for an item kind). ``write_toy_selector_dataset``: the MetaSelector
layout (``ms_support`` / ``ms_query`` / ``ms_test``), half the users clicking by popularity and
half by genre taste. The seeded click-log generator for real-sized runs is ``data.synth``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS, RML_PARTS, RML_SUBSETS

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


def write_toy_rml_dataset(root: str | Path, *, n_users: int = 60, n_items: int = 80, rows_per_user: int = 12,
                          hist_len: int = 6, seed: int = 0) -> Path:
    """Write ``{wc,cw}_{train,finetune_a..c,test}.parquet``, ``users.parquet``, ``items.parquet``.

    Each user's last row goes to FT-A/FT-B/FT-C/test in turn, the others to train (the paper's
    protocol); WC and CW use disjoint users.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_all = 2 * n_users
    taste = rng.integers(0, 2, n_all + 1)
    kind = rng.integers(0, 2, n_items + 1)
    pl.DataFrame({"user_id": np.arange(1, n_all + 1, dtype=np.int32),
                  "gender": (taste[1:] + 1).astype(np.int16),
                  "age": rng.integers(1, 8, n_all).astype(np.int16),
                  "occupation": rng.integers(1, 22, n_all).astype(np.int16)}).write_parquet(root / "users.parquet")
    genres = [sorted(set(rng.integers(1, 6, 2).tolist())) for _ in range(n_items)]
    pl.DataFrame({"item_id": np.arange(1, n_items + 1, dtype=np.int32),
                  "rate": (kind[1:] + 1).astype(np.int16),
                  "year": rng.integers(1, 10, n_items).astype(np.int16),
                  "genres": pl.Series(genres, dtype=pl.List(pl.Int16)),
                  "directors": pl.Series([[int(x)] for x in rng.integers(1, 20, n_items)],
                                         dtype=pl.List(pl.Int32))}).write_parquet(root / "items.parquet")
    for s, subset in enumerate(RML_SUBSETS):
        rows: dict[str, list] = {st: [] for st in RML_PARTS}
        for k, u in enumerate(range(1 + s * n_users, 1 + (s + 1) * n_users)):
            items = rng.integers(1, n_items + 1, rows_per_user + hist_len)
            p = 0.2 + 0.6 * (kind[items] == taste[u])
            labels = (rng.random(items.size) < p).astype(np.int8)
            # the held-out (FT/test) row follows the rule without noise, alternating classes
            # across users so that every FT/test split holds both labels
            want = taste[u] if (k // 4) % 2 == 0 else 1 - taste[u]
            items[-1] = 1 + int(np.flatnonzero(kind[1:] == want)[k % max(1, int((kind[1:] == want).sum()))])
            labels[-1] = int(kind[items[-1]] == taste[u])
            for r in range(rows_per_user):
                t = hist_len + r
                lo = max(0, t - hist_len - r % 3)  # varying session lengths (padding in batches)
                row = (u, items[lo:t].tolist(), labels[lo:t].tolist(), int(items[t]), int(labels[t]))
                stage = "train" if r < rows_per_user - 1 else RML_PARTS[1 + k % 4]
                rows[stage].append(row)
        for st, rs in rows.items():
            u, h, hl, tg, lb = zip(*rs, strict=True) if rs else ([], [], [], [], [])
            pl.DataFrame({"user_id": pl.Series(u, dtype=pl.Int32),
                          "hist_item_ids": pl.Series(h, dtype=pl.List(pl.Int32)),
                          "hist_labels": pl.Series(hl, dtype=pl.List(pl.Int8)),
                          "target_item_id": pl.Series(tg, dtype=pl.Int32),
                          "label": pl.Series(lb, dtype=pl.Int8)}).write_parquet(root / f"{subset}_{st}.parquet")
    return root


def write_toy_selector_dataset(out, *, n_users: int = 40, n_items: int = 60, rows_per_user: tuple[int, int] = (12, 30),
                      max_hist_len: int = 5, seed: int = 0, newusers: int = 0) -> None:
    """A small prepared directory in the MetaSelector layout (for tests, benchmarks and demos).

    Labels follow a logistic model in which half the users click by item popularity and half by
    genre taste, so that different base models suit different users. Per user, rows are in time
    order: first 80% = train (75% ``ms_support`` / 25% ``ms_query``), last 20% = ``ms_test``.
    With ``newusers`` > 0, that many extra users go to ``ms_newuser_train`` / ``ms_newuser_test``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total_users = n_users + newusers
    genres = [sorted(set(rng.integers(1, 7, size=rng.integers(1, 3)).tolist())) for _ in range(n_items)]
    pl.DataFrame({"item_id": np.arange(1, n_items + 1), "genres": genres},
                 schema={"item_id": pl.Int64, "genres": pl.List(pl.Int64)}).write_parquet(out / "items.parquet")
    pl.DataFrame({"user_id": np.arange(1, total_users + 1), "gender": rng.integers(1, 3, total_users),
                  "age": rng.integers(1, 8, total_users)}).write_parquet(out / "users.parquet")
    pop = rng.normal(0, 1.2, n_items + 1)
    taste = rng.normal(0, 1.5, (total_users + 1, 7))
    kind = rng.integers(0, 2, total_users + 1)
    splits: dict[str, list[dict]] = {k: [] for k in (SUPPORT, QUERY, TEST, NEW_TRAIN, NEW_TEST)}
    for u in range(1, total_users + 1):
        n = int(rng.integers(rows_per_user[0], rows_per_user[1] + 1))
        items = rng.integers(1, n_items + 1, n)
        g_score = np.array([taste[u, genres[i - 1]].mean() for i in items])
        z = np.where(kind[u] == 0, pop[items], g_score) + rng.normal(0, 0.3, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-2 * z))).astype(np.int64)
        n_train = max(2, int(round(0.8 * n)))
        n_sup = max(1, int(round(0.75 * n_train)))
        n_train, n_sup = n_train + 1, n_sup + 1  # row 0 only seeds the history (no empty sessions)
        for j in range(1, n):
            lo = max(0, j - max_hist_len)
            row = {"user_id": u, "hist_item_ids": items[lo:j].tolist(), "hist_labels": labels[lo:j].tolist(),
                   "target_item_id": int(items[j]), "label": int(labels[j]), "ctx_weekday": int(rng.integers(1, 8)),
                   "ctx_season": int(rng.integers(1, 5)), "timestamp": 1000 * u + j}
            if u > n_users:
                splits[NEW_TRAIN if j < n_train else NEW_TEST].append(row)
            else:
                splits[SUPPORT if j < n_sup else QUERY if j < n_train else TEST].append(row)
    schema = {"user_id": pl.Int64, "hist_item_ids": pl.List(pl.Int64), "hist_labels": pl.List(pl.Int64),
              "target_item_id": pl.Int64, "label": pl.Int64, "ctx_weekday": pl.Int64, "ctx_season": pl.Int64,
              "timestamp": pl.Int64}
    for name, rows in splits.items():
        if name in (NEW_TRAIN, NEW_TEST) and not newusers:
            continue
        pl.DataFrame(rows, schema=schema).write_parquet(out / f"{name}.parquet")
    meta = {"context_fields": [{"name": "weekday", "vocab_size": 8}, {"name": "season", "vocab_size": 5}],
            "max_hist_len": max_hist_len, "protocol": "metaselector", "toy": True}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
