"""Session-level meta-learning speed (issue 15): meta-training vmap vs a per-task loop, and
test-time adaptation of 1,000 sessions, same model and data, one run.

    .venv/bin/python benchmarks/bench_session_adapt.py --data runs/prepared/ml-1m-rml-future \\
        [--model rml] [--threads 2] [--reps 5] [--out benchmarks/results/session_adapt.json]

* **meta-training**: one outer step of ``session_maml`` (``maml_outer_loss`` + backward) on a
  batch of ``--batch`` sessions of ``wc_train`` (each session a task: support = its last
  ``--history`` labelled items, query = its target), second order, ``--steps`` inner steps on
  RML's ``meta`` group; ``vmap`` (what the strategy runs) against ``loop`` (the same meta-gradient,
  one task at a time: ``vectorize=False``). Reported: sessions/s, median of ``--reps``.
* **test-time adaptation**: ``eval.adapted.session_adapted_proba`` on the first 1,000 rows of
  ``wc_test`` (each session adapted on its own history, then its target scored), against the
  plain prediction (0 steps) of the same rows. Reported: seconds for the 1,000 sessions.

The model is untrained (speed does not depend on the weights). The machine block and load average
are recorded: rerun on a quiet machine before quoting absolute times; the ratios are same-run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from machine import machine  # noqa: E402  (benchmarks/machine.py)

from metactr.data.prepared import PreparedDataset  # noqa: E402
from metactr.data.tasks import session_tasks  # noqa: E402
from metactr.engine.functional import live_params, maml_outer_loss  # noqa: E402
from metactr.eval.adapted import session_adapted_proba  # noqa: E402
from metactr.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="rml")
    ap.add_argument("--group", default="meta")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--history", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = PreparedDataset(args.data)
    model = build_model(args.model, ds.spec, **({"dropout": 0.0} if args.model == "rml" else {}))
    names = model.params_in(args.group)
    batch = ds.batch(ds.split("wc_train"), torch.arange(args.batch))
    support, sw, query, qw = session_tasks(batch, args.history)

    def outer(vectorize: bool) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = maml_outer_loss(model, live_params(model), support, query, names=names, lr=0.1, steps=args.steps,
                               support_weight=sw, query_weight=qw, vectorize=vectorize)
        loss.backward()
        return time.perf_counter() - t0

    res: dict = {"data": args.data, "model": args.model, "group": args.group, "threads": args.threads,
                 "batch": args.batch, "history": args.history, "steps": args.steps, "load_before": os.getloadavg()}
    for impl, vec in (("vmap", True), ("loop", False)):
        outer(vec)  # warm-up
        t = statistics.median(outer(vec) for _ in range(args.reps))
        res[f"train_{impl}_sessions_per_s"] = round(args.batch / t, 1)
    res["train_vmap_over_loop"] = round(res["train_vmap_sessions_per_s"] / res["train_loop_sessions_per_s"], 2)

    test = ds.split("wc_test")
    n = min(args.sessions, len(test))
    sub = test.subset(torch.arange(n))
    for label, steps in (("adapted", args.steps), ("plain", 0)):
        session_adapted_proba(model, ds, sub, names=names, lr=0.1, steps=steps, history_size=args.history)
        times = []
        for _ in range(max(1, args.reps // 2)):
            t0 = time.perf_counter()
            session_adapted_proba(model, ds, sub, names=names, lr=0.1, steps=steps, history_size=args.history)
            times.append(time.perf_counter() - t0)
        res[f"test_{label}_s"] = round(statistics.median(times), 3)
    res["test_sessions"] = n
    res["load_after"] = os.getloadavg()
    res["machine"] = machine()
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
