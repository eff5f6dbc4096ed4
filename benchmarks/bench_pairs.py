"""Paired AUC differences between any two methods of a finished ``metactr bench`` run (the bench
itself compares every method with one reference). Same intervals as the bench: training seeds x
a bootstrap of test users, both methods on the same resamples (``eval.intervals.compare_methods``).

    .venv/bin/python benchmarks/bench_pairs.py --out runs/bench_full \\
        --pairs rml_session_maml:rml_wo_meta,din_label:din [--stage finetune_c] [--n-boot 1000]

Prints one Markdown row per (dataset, subset, pair): delta AUC [95%], excludes zero or not, the
delta GAUC and the number of test rows / users. Only jobs already finished are read.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections import defaultdict

import numpy as np

from metactr.eval.intervals import compare_methods


def load(out: str, stage: str) -> dict:
    """{(dataset, subset): {"y":..., "user":..., method: [seeds, n]}} from OUT/runs/*.npz."""
    got: dict = defaultdict(lambda: defaultdict(dict))
    for f in sorted(glob.glob(os.path.join(out, "runs", "*.npz"))):
        dataset, method, subset, seed = os.path.basename(f)[:-4].split("__")
        d = np.load(f)
        key = f"p__{method}__{stage}"
        if key not in d.files:
            continue
        cell = got[(dataset, subset)]
        cell["y"], cell["user"] = d["y"], d["user"]
        cell.setdefault("p", {}).setdefault(method, {})[int(seed.removeprefix("seed"))] = d[key]
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the bench's --out directory")
    ap.add_argument("--pairs", required=True, help="comma-separated method:reference pairs")
    ap.add_argument("--stage", default="finetune_c")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    print("| dataset | subset | method | reference | Δ AUC [95%] | verdict | Δ GAUC | seeds | rows / users |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (dataset, subset), cell in sorted(load(args.out, args.stage).items()):
        for a, b in pairs:
            if a not in cell["p"] or b not in cell["p"]:
                continue
            seeds = sorted(set(cell["p"][a]) & set(cell["p"][b]))
            preds = {m: np.stack([cell["p"][m][s] for s in seeds]) for m in (a, b)}
            c = compare_methods(cell["y"], cell["user"], preds, reference=b, n_boot=args.n_boot, pair_seeds=True)
            d = c.pairs[0]
            gauc = "–" if np.isnan(d.delta_gauc) else f"{d.delta_gauc:+.4f}"  # one row per user: undefined
            verdict = ("**better**" if d.ci95[0] > 0 else "**worse**") if d.excludes_zero else "tie"
            print(f"| {dataset} | {subset.upper()} | {a} | {b} | {d.delta_auc:+.4f} [{d.ci95[0]:+.4f}, "
                  f"{d.ci95[1]:+.4f}] | {verdict} | {gauc} | {len(seeds)} | {c.n_test:,} / {c.n_users} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
