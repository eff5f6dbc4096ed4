"""Meta-training throughput: the torch.func vmap engine against a per-task loop, same model and data.

    .venv/bin/python benchmarks/bench_meta.py --data ../shared/datasets/ml-1m-rml [--threads 2]
        [--models rml,deepfm] [--steps 1,5] [--reps 5] [--epoch] [--adapt-emb] [--out bench.json]

For each model: 32 user tasks x (20 support + 10 query rows) from ``cw_train``, second-order
MAML on the model's adapted groups (RML: ``meta``, the subset its local step adapts; other
models: every group but ``emb``; ``--adapt-emb`` adds the ``emb`` group, i.e. the embedding
tables). Implementations of the same meta-gradient:

* ``vmap``      ``maml_outer_loss(vectorize=True)``: all tasks' inner loops in one vmap, embedding
                tables task-local (only the rows each task touches; adapted or not);
* ``vmap-dense`` the same with ``local_tables=False``: every task looks up (and, with
                ``--adapt-emb``, adapts) the full tables, so each lookup's gradient is ``[T, V, D]``;
* ``loop-func`` ``maml_outer_loss(vectorize=False, local_tables=False)``: torch.func, one task at a time;
* ``loop-l2l-style`` a learn2learn-STYLE re-implementation (not the learn2learn package, which is
                not installed): per task, ``torch.autograd.grad`` with ``create_graph=True`` on the
                module's parameters, query loss backward, summed, the way learn2learn's examples and
                most reference code do it.

Reported: tasks/s (median of ``--reps`` timed meta-steps after a warm-up) and, as separate rows,
the two effects that the plain "vmap / loop" ratio mixes:

* **vectorisation** = ``vmap-dense / loop-func``: same dense tables, vmap instead of a loop;
* **task-local tables** = ``vmap / vmap-dense``: same vmap, each task's tables cut to its rows;
* and ``vmap / loop-l2l-style`` (both effects, against the reference-style loop).

RML's per-task loop (~1 task/s in issue 17) is op-count bound, not a bug: profiled here
(``--profile``, ml-1m-rml, 8 tasks, 1 inner step, 1 thread, load average 5-9 on the shared 2-core
Zen 4 host), a loop-func meta-step of RML makes over 7,000 operator calls per task (the top 12
rows of the profile alone: 115k calls for 16 tasks; its LSTM is unrolled step by step over the
session, and second-order MAML differentiates that graph twice), averaging 3-100 us each: 3.97 s
of CPU for 16 tasks, ~0.25 s per task, dominated by ``mul`` / ``mm`` / ``add`` and their backward
nodes, none of them large. The loop pays that per task; vmap pays it once per meta-batch
(3.2x there). Inner steps multiply the per-task graph (``--steps 5``: not re-measured here), and the
issue's ~1 task/s was measured on the Zen 3 host. ``--profile`` prints the top operators of one
loop-func meta-step (torch.profiler).

``--epoch`` also times one epoch of RML two-phase meta-training on ``cw_train``, with each of
``--epoch-threads`` (default 1 and 2; ``reproduce rml`` runs each job on 1 thread, jobs in parallel).
The machine's load (``os.getloadavg``) is printed with the numbers: rerun on a quiet machine.
``--device cuda`` (default ``cpu``) puts the model and the task batches on the GPU and stops each
clock after ``torch.cuda.synchronize()``; ``--epoch`` stays on CPU (the strategies take no device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import Tensor

from metactr.data.prepared import PreparedDataset
from metactr.data.tasks import UserTaskSampler
from metactr.engine.functional import live_params, maml_outer_loss
from metactr.models.base import build_model, objective
from metactr.strategies.config import strategy_config
from metactr.train.trainer import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine  # noqa: E402  (benchmarks/machine.py)

IMPLS = ("vmap", "vmap-dense", "loop-func", "loop-l2l-style")


def adapted_names(model, adapt_emb: bool = False) -> list[str]:
    groups = model.param_groups()
    emb = groups.get("emb", []) if adapt_emb else []
    if "meta" in groups and groups["meta"]:
        return groups["meta"] + emb
    return [n for g, ns in groups.items() if g != "emb" for n in ns] + emb


def l2l_loop_loss(model, tb, names, lr, steps) -> Tensor:
    """Per-task loop with torch.autograd (create_graph): the learn2learn-style reference."""
    T = tb.support.label.shape[0]
    total = 0.0
    for t in range(T):
        params = live_params(model)
        s, q = tb.support.select(t), tb.query.select(t)
        for _ in range(steps):
            loss, _ = objective(model, params, s, tb.support_weight[t])
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            params = {**params, **{n: params[n] - lr * g for n, g in zip(names, grads, strict=True)}}
        qloss, _ = objective(model, params, q, tb.query_weight[t])
        (qloss / T).backward()  # per-task backward, as learn2learn examples do
        total += float(qloss.detach()) / T
    return torch.tensor(total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impl(model, tbs, names, steps, impl: str, reps: int, device: torch.device = torch.device("cpu")) -> float:
    lr = 0.01
    times = []
    for i, tb in enumerate(tbs[: reps + 1]):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if impl == "loop-l2l-style":
            l2l_loop_loss(model, tb, names, lr, steps)
        else:
            loss = maml_outer_loss(model, live_params(model), tb.support, tb.query, names=names, lr=lr, steps=steps,
                                   support_weight=tb.support_weight, query_weight=tb.query_weight,
                                   vectorize=impl.startswith("vmap"), local_tables=impl == "vmap")
            loss.backward()
        _sync(device)
        if i > 0:  # first call is warm-up
            times.append(time.perf_counter() - t0)
    return tb.support.label.shape[0] / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/ml-1m-rml")
    ap.add_argument("--split", default="cw_train")
    ap.add_argument("--models", default="rml,deepfm")
    ap.add_argument("--steps", default="1,5")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--support", type=int, default=20)
    ap.add_argument("--query", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--profile", action="store_true", help="print the top operators of one loop-func meta-step")
    ap.add_argument("--epoch-batch-size", type=int, default=128)
    ap.add_argument("--adapt-emb", action="store_true", help="adapt the embedding group (emb) too")
    ap.add_argument("--epoch", action="store_true", help="also time one epoch of RML two-phase on --split")
    ap.add_argument("--epoch-fraction", type=float, default=1.0)
    ap.add_argument("--epoch-threads", default="1,2",
                    help="torch thread counts to time the epoch with (reproduce runs each job on 1 thread)")
    ap.add_argument("--model-kw", default="{}", help='JSON {model: {kwarg: value}}, e.g. a smaller RML')
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.epoch and device.type != "cpu":
        ap.error("--epoch times the CPU strategies only; drop it with --device " + args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = PreparedDataset(args.data)
    sampler = UserTaskSampler(ds, args.split, tasks_per_batch=args.tasks, support_size=args.support,
                              query_size=args.query, drop_last=True)
    tbs = []
    for tb in sampler.iterate(np.random.default_rng(0)):
        if device.type != "cpu":
            tb = tb._replace(support=tb.support.to(device), query=tb.query.to(device),
                             support_weight=tb.support_weight.to(device), query_weight=tb.query_weight.to(device))
        tbs.append(tb)
        if len(tbs) > args.reps:
            break
    report: dict = {"command": " ".join(sys.argv), "model_kw": json.loads(args.model_kw), "threads": args.threads,
                    "adapt_emb": args.adapt_emb, "load_before": os.getloadavg(), "device": args.device,
                    "machine": machine(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "tasks": args.tasks, "support": args.support, "query": args.query, "results": []}
    impls = [i.replace("loop-l2l", "loop-l2l-style") if i == "loop-l2l" else i for i in args.impls.split(",")]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}")
    print(f"load average before: {os.getloadavg()}; threads={args.threads}")
    print(f"{'model':8} {'steps':>5} " + " ".join(f"{i:>12}" for i in impls)
          + "   vectorisation (vmap-dense/loop-func) | task-local tables (vmap/vmap-dense) | vmap/loop-l2l-style")
    for name in args.models.split(","):
        model = build_model(name, ds.spec, **json.loads(args.model_kw).get(name, {})).to(device)
        model.train()
        names = adapted_names(model, args.adapt_emb)
        for steps in [int(s) for s in args.steps.split(",")]:
            tps = {impl: time_impl(model, tbs, names, steps, impl, args.reps, device) for impl in impls}
            ratios = {}
            if "vmap-dense" in tps and "loop-func" in tps:
                ratios["vectorisation"] = tps["vmap-dense"] / tps["loop-func"]
            if "vmap" in tps and "vmap-dense" in tps:
                ratios["task_local_tables"] = tps["vmap"] / tps["vmap-dense"]
            if "vmap" in tps and "loop-l2l-style" in tps:
                ratios["vmap_over_l2l_style_loop"] = tps["vmap"] / tps["loop-l2l-style"]
            report["results"].append({"model": name, "inner_steps": steps, "adapted": len(names),
                                      "tasks_per_s": tps, "speedup": ratios})
            print(f"{name:8} {steps:>5} " + " ".join(f"{tps[i]:>12.1f}" for i in impls) + "   "
                  + ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()), flush=True)
            if args.profile and steps == 1:
                from torch.profiler import profile

                with profile() as prof:
                    time_impl(model, tbs[:2], names, steps, "loop-func", 1, device)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.epoch:
        n = int(len(ds.split(args.split)) * args.epoch_fraction)
        report["epoch"] = []
        for threads in [int(t) for t in args.epoch_threads.split(",")]:
            torch.set_num_threads(threads)
            model = build_model("rml", ds.spec)
            t0 = time.perf_counter()
            train(model, ds, args.split, strategy_config("two_phase"), epochs=args.epoch_fraction,
                  batch_size=args.epoch_batch_size, seed=0)
            wall = time.perf_counter() - t0
            report["epoch"].append({"split": args.split, "threads": threads, "fraction": args.epoch_fraction,
                                    "rows": n, "wall_s": wall, "epoch_s_extrapolated": wall / args.epoch_fraction})
            print(f"RML two_phase on {args.split}, {threads} thread(s): {args.epoch_fraction} epoch ({n} tasks) "
                  f"in {wall:.1f} s -> {wall / args.epoch_fraction:.1f} s per epoch", flush=True)
    report["load_after"] = os.getloadavg()
    print(f"load average after: {os.getloadavg()}")
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
