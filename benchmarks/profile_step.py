"""Where one DeepFM (or DIN) training step goes: its parts timed alone, in one process.

    .venv/bin/python benchmarks/profile_step.py [--model deepfm] [--predict] [--out X.json]

Parts, each the median over ``--blocks`` blocks of ``--steps`` calls on bench_ctr.py's data (batch
1,024, 2 threads): the batch gather (the next rows of a shuffled epoch order), the embedding part (``flat_fields`` forward + backward; DeepFM
only), the MLP alone forward + backward with an input that needs its gradient, the whole model's
forward + backward (loss included), the fused Adam step, and the whole training step. Blocks of the
parts alternate, so a drift of this VM's speed hits every part alike.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ctr import step_parser, step_setup  # benchmarks/bench_ctr.py: the same models


def main(argv: list[str] | None = None) -> int:
    ap = step_parser(__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--predict", action="store_true",
                    help="the parts of a prediction batch instead (inference mode, in-order test rows): the "
                         "batch gather, the embeddings, the MLP alone, the whole forward")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from machine import machine

    from metactr.models.base import objective
    from metactr.models.interactions import flat_fields

    ds, split, model, opt = step_setup(args.data, args.model, "train")
    idx = [torch.randperm(len(split), generator=torch.Generator().manual_seed(i))[:1024] for i in range(8)]
    batches = [ds.batch(split, i) for i in idx]
    mlp_in = torch.randn(1024, model.mlp.net[0].in_features, requires_grad=True)
    k = [0]

    def nxt():
        k[0] += 1
        return batches[k[0] % len(batches)]

    def fwd_bwd():
        loss, _ = objective(model, None, nxt())
        loss.backward()

    def step():
        loss, _ = objective(model, None, nxt())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(99))
    pos = [0]

    def gather():  # as an epoch does: the next 1,024 rows of a shuffled order (cold in the caches)
        pos[0] = (pos[0] + 1024) % (len(split) - 1024)
        return ds.batch(split, perm[pos[0]:pos[0] + 1024])

    parts = {"batch gather": gather,
             "MLP alone fwd+bwd": lambda: model.mlp(mlp_in).sum().backward(),
             "model fwd+bwd (loss incl.)": fwd_bwd, "Adam step": opt.step, "whole step": step}
    if args.model == "deepfm":
        parts["embeddings fwd+bwd"] = lambda: flat_fields(model.embedding, nxt(), True).sum().backward()
    if args.predict:
        test = ds.split("test")
        start = [0]

        def in_order():  # as predict_proba does: the next 1,024 test rows, in order
            start[0] = (start[0] + 1024) % (len(test) - 1024)
            return ds.batch(test, slice(start[0], start[0] + 1024))

        model.eval()
        x = mlp_in.detach()
        parts = {"batch gather": in_order, "MLP alone fwd": lambda: model.mlp(x),
                 "whole forward": lambda: torch.sigmoid(model(nxt()).logit)}
        if args.model == "deepfm":
            parts["embeddings fwd"] = lambda: flat_fields(model.embedding, nxt(), True)
    else:
        loss, _ = objective(model, None, nxt())
        loss.backward()  # grads exist for the Adam part
    times: dict[str, list[float]] = {p: [] for p in parts}
    with torch.inference_mode() if args.predict else contextlib.nullcontext():
        for _ in range(2):
            for fn in parts.values():
                fn()
        for b in range(args.blocks):
            for name in (list(parts) if b % 2 == 0 else list(parts)[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    parts[name]()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    med = {p: statistics.median(t) for p, t in times.items()}
    for p, m in med.items():
        print(f"{p:28s} {m:7.3f} ms  ({min(times[p]):.3f}-{max(times[p]):.3f})")
    if args.predict:
        print(f"MLP alone / whole forward: {med['MLP alone fwd'] / med['whole forward']:.0%}")
    else:
        print(f"MLP alone / whole step: {med['MLP alone fwd+bwd'] / med['whole step']:.0%}")
    if args.out:
        from metactr.utils import write_json_atomic

        write_json_atomic(args.out, {"command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:]),
                                     "model": args.model, "predict": args.predict, "median_ms": med, "ms": times, "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
