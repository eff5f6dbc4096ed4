"""Run every benchmark in turn (``make bench``), each in its own process, on the real data
where the benchmark needs it. Results land in ``benchmarks/results/``; numbers depend on the
machine and its load, so each script prints the load average beside its figures.

    .venv/bin/python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    data = Path(os.environ.get("METACTR_DATA", ROOT.parent / "shared" / "datasets"))
    py = sys.executable
    rows = "200000" if args.quick else "10000000"
    runs = [
        [py, str(HERE / "bench_prepare.py"), "--rows", rows],
        [py, str(HERE / "bench_meta.py"), "--data", str(data / "ml-1m-rml")] + ([] if args.quick else ["--epoch"]),
        [py, str(HERE / "bench_selector.py"), "--dataset", "ml-100k", "--data-dir", str(data / "ml-100k")],
    ]
    if (ROOT / ".bench-venv" / "bin" / "python").exists():
        runs.append([py, str(HERE / "bench_ctr.py")] + (["--rows", "100000"] if args.quick else []))
    else:
        print("skipping bench_ctr.py: run `bash benchmarks/setup_bench_env.sh` first (DeepCTR-Torch env)")
    failed = 0
    for cmd in runs:
        print("\n$", " ".join(cmd), flush=True)
        failed += subprocess.call(cmd, cwd=ROOT) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
