"""MetaSelector meta-training throughput: the vmap engine against a per-user loop, in one run.

Both paths compute the same second-order Meta-SGD meta-gradient (``maml_outer_loss`` with
``vectorize=True`` vs ``False``) on the same episodes: a MetaSelector over LR, FM, FFM and DeepFM
(latent dim 10, DeepFM 256-256-256, selector 200-200-200), 10 users per episode, up to
``--support`` / ``--query`` rows per user. Target: vmap >= 4x the loop.

    .venv/bin/python benchmarks/bench_selector.py --dataset ml-100k --data-dir ../shared/datasets/ml-100k

Without the real data (or with ``--toy``) it runs on a generated toy dataset. Prints one JSON
line with episodes/s of each path, the ratio, the machine load (``os.getloadavg``) and the
command; report them with ``uptime`` when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--toy", action="store_true", help="use a generated toy dataset")
    ap.add_argument("--episodes", type=int, default=10, help="timed episodes per path")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--users", type=int, default=10, help="users per episode")
    ap.add_argument("--support", type=int, default=64)
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-order", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metactr.meta.selector import MetaSelector
    from metactr.meta.selector_train import (MetaTrainConfig, SelectorData, SelectorExperiment,
                                             build_base_models, meta_train, write_toy_dataset)
    from metactr.utils import data_root

    tmp = tempfile.TemporaryDirectory()
    raw = args.data_dir or data_root() / args.dataset
    if args.toy or not raw.exists():
        root = Path(tmp.name) / "toy"
        write_toy_dataset(root, n_users=200, n_items=300, rows_per_user=(40, 120), max_hist_len=10)
        source = "toy"
    else:
        from metactr.data.pipeline import PrepareConfig, prepare

        root = prepare(args.dataset, raw, Path(tmp.name) / "prep", PrepareConfig(protocol="metaselector"))
        source = str(raw)
    data = SelectorData.load(root, disjoint=False)
    exp = SelectorExperiment()
    torch.manual_seed(0)
    bases = build_base_models(exp, data.ds)

    def run(vectorize: bool) -> float:
        model = MetaSelector(data.ds.spec, [b for b in bases], base_names=[b.name for b in exp.base_models])
        cfg = MetaTrainConfig(episodes=args.warmup, users_per_episode=args.users, max_support=args.support,
                              max_query=args.query, vectorize=vectorize, first_order=args.first_order)
        gen = torch.Generator().manual_seed(0)
        meta_train(model, data, cfg, adapt_groups=("base", "selector"), outer_groups=("base", "selector"),
                   generator=gen)
        cfg = cfg.model_copy(update={"episodes": args.episodes})
        t0 = time.perf_counter()
        meta_train(model, data, cfg, adapt_groups=("base", "selector"), outer_groups=("base", "selector"),
                   generator=gen)
        return args.episodes / (time.perf_counter() - t0)

    load_before = os.getloadavg()
    loop = run(False)
    vmap = run(True)
    print(json.dumps({
        "benchmark": "metaselector meta-training (second order, Meta-SGD)" if not args.first_order
        else "metaselector meta-training (first order)",
        "data": source, "users_per_episode": args.users, "support": args.support, "query": args.query,
        "threads": args.threads, "episodes_per_s_loop": round(loop, 3), "episodes_per_s_vmap": round(vmap, 3),
        "speedup": round(vmap / loop, 2), "target": 4.0, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "command": " ".join([sys.executable, *sys.argv]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
