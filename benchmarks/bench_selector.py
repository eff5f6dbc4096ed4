"""MetaSelector meta-training throughput: the vmap engine against a per-user loop, in one run.

Every path computes the same second-order Meta-SGD meta-gradient (``maml_outer_loss``) on the
same episodes: a MetaSelector over LR, FM, FFM and DeepFM (latent dim 10, DeepFM 256-256-256,
selector 200-200-200), 10 users per episode, up to ``--support`` / ``--query`` rows per user,
every parameter adapted (embedding tables included). Three paths:

* ``loop``        per-user loop, dense tables (``vectorize=False, local_tables=False``): the reference;
* ``vmap_dense``  all users in one vmap, every user carrying a full copy of every table;
* ``vmap``        all users in one vmap with task-local tables (the default engine).

Target: vmap >= 4x the loop.

    .venv/bin/python benchmarks/bench_selector.py --dataset ml-100k --data-dir ../shared/datasets/ml-100k

Without the real data (or with ``--toy``) it runs on a generated toy dataset. Prints one JSON
line with episodes/s of each path, the ratios, the mean number of rows per local table against
the full table, the machine load (``os.getloadavg``) and the command; report them with
``uptime`` when the machine is shared. Pin it for indicative numbers:

    taskset -c 1 .venv/bin/python benchmarks/bench_selector.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402  (benchmarks/machine.py)


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
    ap.add_argument("--paths", default="loop,vmap_dense,vmap", help="comma-separated subset of loop,vmap_dense,vmap")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from metactr.engine.functional import local_tables_default
    from metactr.models.metaselector import MetaSelector
    from metactr.data.toy import write_toy_selector_dataset as write_toy_dataset
    from metactr.papers.metaselector.train import (MetaTrainConfig, SelectorData, SelectorExperiment,
                                                   build_base_models, meta_train)
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

    paths = {"loop": (False, False), "vmap_dense": (True, False), "vmap": (True, True)}
    chosen = [p for p in args.paths.split(",") if p]
    unknown = [p for p in chosen if p not in paths]
    if unknown:
        ap.error(f"unknown path(s) {unknown}; choose from {list(paths)}")

    def run(vectorize: bool, local: bool) -> tuple[float, float]:
        # same initial weights and episodes for every path
        model = MetaSelector(data.ds.spec, [copy.deepcopy(b) for b in bases],
                             base_names=[b.name for b in exp.base_models])
        cfg = MetaTrainConfig(episodes=args.warmup, users_per_episode=args.users, max_support=args.support,
                              max_query=args.query, vectorize=vectorize, first_order=args.first_order)
        gen = torch.Generator().manual_seed(0)
        with local_tables_default(local):
            meta_train(model, data, cfg, adapt_groups=("base", "selector"), outer_groups=("base", "selector"),
                       generator=gen)
            cfg = cfg.model_copy(update={"episodes": args.episodes})
            t0, c0 = time.perf_counter(), time.process_time()
            meta_train(model, data, cfg, adapt_groups=("base", "selector"), outer_groups=("base", "selector"),
                       generator=gen)
        # wall clock, and this process's CPU time (less sensitive to a loaded machine)
        return args.episodes / (time.perf_counter() - t0), args.episodes / (time.process_time() - c0)

    load_before = os.getloadavg()
    timed = {p: run(*paths[p]) for p in chosen}
    eps = {p: w for p, (w, _) in timed.items()}
    cpu = {p: c for p, (_, c) in timed.items()}
    report = {
        "benchmark": "metaselector meta-training (second order, Meta-SGD)" if not args.first_order
        else "metaselector meta-training (first order)",
        "data": source, "users_per_episode": args.users, "support": args.support, "query": args.query,
        "threads": args.threads, **{f"episodes_per_s_{p}": round(v, 3) for p, v in eps.items()},
        **{f"cpu_episodes_per_s_{p}": round(v, 3) for p, v in cpu.items()},
    }
    for key, val in (("", eps), ("cpu_", cpu)):
        if "loop" in val:
            report.update({f"{key}speedup_{p}_over_loop": round(v / val["loop"], 2)
                           for p, v in val.items() if p != "loop"})
        if "vmap" in val and "vmap_dense" in val:
            report[f"{key}speedup_local_over_dense_vmap"] = round(val["vmap"] / val["vmap_dense"], 2)
    report.update({"table_rows": table_rows(data, bases, args), "target": 4.0, "loadavg_before": load_before,
                   "loadavg_after": os.getloadavg(), "machine": machine(), "command": " ".join([sys.executable, *sys.argv])})
    print(json.dumps(report))
    return 0


def table_rows(data, bases, args) -> dict:
    """Mean rows per task-local table over a few episodes, against the full table's rows."""
    from metactr.data.tasks import task_batch
    from metactr.engine.local_tables import task_rows, unique_rows
    from metactr.data.tasks import UserIndex

    emb = next(m for b in bases for m in b.modules() if type(m).__name__ == "FieldEmbedding")
    sup_idx, qry_idx = UserIndex.build(data.support), UserIndex.build(data.query)
    users = sup_idx.users[qry_idx.lookup(sup_idx.users) >= 0]
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(5):
        pick = users[torch.randperm(len(users), generator=gen)[: args.users]]
        s_rows, _ = sup_idx.sample(sup_idx.lookup(pick), args.support, gen)
        q_rows, _ = qry_idx.sample(qry_idx.lookup(pick), args.query, gen)
        batches = [task_batch(data.ds, data.support, s_rows), task_batch(data.ds, data.query, q_rows)]
        sizes.append(unique_rows(task_rows(emb, batches), emb.weight.shape[0])[0].shape[1])
    return {"local_U_mean": sum(sizes) / len(sizes), "full_V": int(emb.weight.shape[0])}


if __name__ == "__main__":
    sys.exit(main())
