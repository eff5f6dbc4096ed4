"""Benchmark: prepare a synthetic click log end to end (RML protocol) and compare with a
straightforward pandas implementation of the same steps, in the same run.

    .venv/bin/python benchmarks/bench_prepare.py --rows 10000000          # the issue's target size
    .venv/bin/python benchmarks/bench_prepare.py --rows 2000000 --pandas-rows 2000000

Each implementation runs in its own subprocess, which reads its own peak resident memory
(``VmHWM`` in ``/proc/self/status``; not ``ru_maxrss``, which Linux carries over fork+exec from the
parent, so both children used to report the parent's 0.64 GB). Timed in the child ("work"):
reading the log, encoding, dedupe, filtering, warm/cold split, sessions, writing Parquet.
Start-up (interpreter + imports: polars + metactr for ours, pandas + pyarrow for the baseline) is
the parent's wall time of the child minus that work, reported separately, and the end-to-end
rate (rows / the child's whole wall time) beside the work rate. Not timed: generating the log.

The baseline is the same steps written vectorised in pandas: ``groupby`` / ``cumcount`` /
``shift`` for the histories, and the list columns built from the shifted matrix with NumPy masks
and ``pyarrow.ListArray.from_arrays`` (no per-row Python). Each JSON carries the ``machine`` block
(``benchmarks/machine.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

MAX_LEN, MIN_USER, SEED = 10, 20, 42


def peak_rss_gb() -> float:
    """This process's own peak resident memory (VmHWM), in GB (1e9 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_ours(log: str, out: str) -> dict:
    t = time.perf_counter()
    from metactr.data.pipeline import PrepareConfig, prepare

    import_s = time.perf_counter() - t

    t = time.perf_counter()
    prepare("synthetic", log, out, PrepareConfig(protocol="rml", seed=SEED), force=True)
    secs = time.perf_counter() - t
    meta = json.loads((Path(out) / "meta.json").read_text())
    return {"seconds": secs, "import_s": import_s, "samples": sum(s["rows"] for s in meta["splits"].values())}


def _lists(mat, dtype):
    """A pyarrow list column from a (rows, MAX_LEN) float matrix with NaN = absent, vectorised."""
    import numpy as np
    import pyarrow as pa

    valid = ~np.isnan(mat)
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat[valid].astype(dtype)))


def run_pandas(log: str, out: str, rows: int | None) -> dict:
    """The same steps in vectorised pandas: groupby/cumcount/shift, list columns via NumPy + pyarrow."""
    t = time.perf_counter()
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    import_s = time.perf_counter() - t
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
        keep = (sub["pos"] >= 1).to_numpy()
        hist = pd.concat(shifted, axis=1).to_numpy(dtype=np.float64)[keep]
        hlab = pd.concat(shifted_lab, axis=1).to_numpy(dtype=np.float64)[keep]
        sub = sub[keep]
        last = sub["pos"] == sub["n"] - 1
        dest = pd.Series(np.random.default_rng(SEED).integers(1, 5, size=len(sub)), index=sub.index)
        part = np.where(last, dest, 0)
        names = ["train", "finetune_a", "finetune_b", "finetune_c", "test"]
        for j, name in enumerate(names):
            sel = part == j
            part_df = sub[sel]
            table = pa.table({"user_id": part_df["user"].to_numpy(np.int32),
                              "hist_item_ids": _lists(hist[sel], np.int32),
                              "hist_labels": _lists(hlab[sel], np.int8),
                              "target_item_id": part_df["item"].to_numpy(np.int32),
                              "label": part_df["click"].to_numpy(np.int8),
                              "timestamp": part_df["timestamp"].to_numpy()})
            pq.write_table(table, Path(out) / f"{subset}_{name}.parquet")
            n_samples += len(part_df)
    return {"seconds": time.perf_counter() - t, "import_s": import_s, "samples": n_samples}


def child(kind: str, log: str, out: str, rows: int | None) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    res = run_ours(log, out) if kind == "ours" else run_pandas(log, out, rows)
    res["peak_rss_gb"] = peak_rss_gb()  # the child's own peak, read in the child
    print(json.dumps(res))


def spawn(kind: str, log: Path, out: Path, rows: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--log", str(log), "--out", str(out)]
    if rows:
        cmd += ["--pandas-rows", str(rows)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "POLARS_MAX_THREADS": os.environ.get(
        "POLARS_MAX_THREADS", "2")})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    res["startup_s"] = wall - res["seconds"]  # interpreter + imports + exit
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=None, help="default rows / 100")
    ap.add_argument("--items", type=int, default=None, help="default rows / 200")
    ap.add_argument("--pandas-rows", type=int, default=None,
                    help="run pandas on the first N rows only (it is slow); rows/s stay comparable")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
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
    load_before = [round(x, 2) for x in os.getloadavg()]
    ours = spawn("ours", log, work / "ours", None)
    report = {"command": " ".join(["benchmarks/bench_prepare.py", *sys.argv[1:]]), "rows": a.rows, "users": users,
              "items": items, "generate_seconds": round(gen_s, 2),
              "machine": {**machine(), "load_avg_before": load_before},
              "ours": {**ours, "rows_per_s": round(a.rows / ours["seconds"]),
                       "end_to_end_rows_per_s": round(a.rows / ours["wall_s"])}}
    if not a.skip_pandas:
        prow = a.pandas_rows or a.rows
        pd_res = spawn("pandas", log, work / "pandas", a.pandas_rows)
        report["pandas"] = {**pd_res, "rows": prow, "rows_per_s": round(prow / pd_res["seconds"]),
                            "end_to_end_rows_per_s": round(prow / pd_res["wall_s"])}
        report["speedup_rows_per_s"] = round(report["ours"]["rows_per_s"] / report["pandas"]["rows_per_s"], 2)
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(a.json)


if __name__ == "__main__":
    main()
