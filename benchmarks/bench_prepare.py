"""Benchmark: prepare a synthetic click log end to end (RML protocol) and compare with a
straightforward pandas implementation of the same steps, in the same run.

    .venv/bin/python benchmarks/bench_prepare.py --rows 10000000          # the issue's target size
    .venv/bin/python benchmarks/bench_prepare.py --rows 2000000 --pandas-rows 2000000

Each implementation runs in its own subprocess so that its peak RSS (ru_maxrss) is its own.
Timed: reading the log, encoding, dedupe, filtering, warm/cold split, sessions, writing Parquet.
Not timed: generating the log. Reports rows/s (input rows / wall seconds) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LEN, MIN_USER, SEED = 10, 20, 42


def run_ours(log: str, out: str) -> dict:
    from metactr.data.pipeline import PrepareConfig, prepare

    t = time.perf_counter()
    prepare("synthetic", log, out, PrepareConfig(protocol="rml", seed=SEED), force=True)
    secs = time.perf_counter() - t
    meta = json.loads((Path(out) / "meta.json").read_text())
    return {"seconds": secs, "samples": sum(s["rows"] for s in meta["splits"].values())}


def run_pandas(log: str, out: str, rows: int | None) -> dict:
    """The same steps written the obvious way in pandas (groupby/shift, lists built per row)."""
    import numpy as np
    import pandas as pd

    t = time.perf_counter()
    df = pd.read_parquet(log, columns=["user_id", "item_id", "timestamp", "click"])
    if rows:
        df = df.iloc[:rows]
    users = np.sort(df["user_id"].unique())
    items = np.sort(df["item_id"].unique())
    df["user"] = np.searchsorted(users, df["user_id"]) + 2
    df["item"] = np.searchsorted(items, df["item_id"]) + 2
    df["order"] = np.arange(len(df))
    df = df.sort_values(["user", "timestamp", "order"])
    df = df.drop_duplicates(["user", "item"], keep="last")
    df = df[df.groupby("user")["item"].transform("size") >= MIN_USER]
    uniq = np.sort(df["user"].unique())
    cold = set(np.random.default_rng(SEED).permutation(uniq)[: int(round(len(uniq) * 0.2))])
    counts = df.groupby("item").size()
    warm = set(counts[counts > counts.quantile(0.5)].index)
    n_samples = 0
    for subset in ("wc", "cw"):
        is_cold = df["user"].isin(cold)
        is_warm = df["item"].isin(warm)
        sub = df[(is_cold == (subset == "cw")) & (is_warm == (subset == "cw"))].copy()
        sub = sub[sub.groupby("user")["item"].transform("size") >= MIN_USER]
        g = sub.groupby("user")
        sub["pos"] = g.cumcount()
        sub["n"] = g["item"].transform("size")
        shifted = [g["item"].shift(k) for k in range(MAX_LEN, 0, -1)]
        shifted_lab = [g["click"].shift(k) for k in range(MAX_LEN, 0, -1)]
        hist = pd.concat(shifted, axis=1).to_numpy()
        hlab = pd.concat(shifted_lab, axis=1).to_numpy()
        sub["hist_item_ids"] = [r[~np.isnan(r)].astype(np.int32).tolist() for r in hist]
        sub["hist_labels"] = [r[~np.isnan(r)].astype(np.int8).tolist() for r in hlab]
        sub = sub[sub["pos"] >= 1]
        last = sub["pos"] == sub["n"] - 1
        dest = pd.Series(np.random.default_rng(SEED).integers(1, 5, size=len(sub)), index=sub.index)
        part = np.where(last, dest, 0)
        names = ["train", "finetune_a", "finetune_b", "finetune_c", "test"]
        for j, name in enumerate(names):
            part_df = sub[part == j]
            part_df = pd.DataFrame({"user_id": part_df["user"].astype("int32"),
                                    "hist_item_ids": part_df["hist_item_ids"],
                                    "hist_labels": part_df["hist_labels"],
                                    "target_item_id": part_df["item"].astype("int32"),
                                    "label": part_df["click"].astype("int8"),
                                    "timestamp": part_df["timestamp"]})
            part_df.to_parquet(Path(out) / f"{subset}_{name}.parquet", index=False)
            n_samples += len(part_df)
    return {"seconds": time.perf_counter() - t, "samples": n_samples}


def child(kind: str, log: str, out: str, rows: int | None) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    res = run_ours(log, out) if kind == "ours" else run_pandas(log, out, rows)
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(json.dumps(res))


def spawn(kind: str, log: Path, out: Path, rows: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--log", str(log), "--out", str(out)]
    if rows:
        cmd += ["--pandas-rows", str(rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "POLARS_MAX_THREADS": os.environ.get(
        "POLARS_MAX_THREADS", "2")})
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=None, help="default rows / 100")
    ap.add_argument("--items", type=int, default=None, help="default rows / 200")
    ap.add_argument("--pandas-rows", type=int, default=None,
                    help="run pandas on the first N rows only (it is slow); rows/s stay comparable")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", choices=["ours", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.log, a.out, a.pandas_rows)
        return
    from metactr.data.synth import generate

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_prepare."))
    users, items = a.users or max(a.rows // 100, 100), a.items or max(a.rows // 200, 100)
    t = time.perf_counter()
    log = generate(work / "log.parquet", n_users=users, n_items=items, n_rows=a.rows, seed=0)
    gen_s = time.perf_counter() - t
    ours = spawn("ours", log, work / "ours", None)
    report = {"rows": a.rows, "users": users, "items": items, "generate_seconds": round(gen_s, 2),
              "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
              "ours": {**ours, "rows_per_s": round(a.rows / ours["seconds"])}}
    if not a.skip_pandas:
        prow = a.pandas_rows or a.rows
        pd_res = spawn("pandas", log, work / "pandas", a.pandas_rows)
        report["pandas"] = {**pd_res, "rows": prow, "rows_per_s": round(prow / pd_res["seconds"])}
        report["speedup_rows_per_s"] = round(report["ours"]["rows_per_s"] / report["pandas"]["rows_per_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
