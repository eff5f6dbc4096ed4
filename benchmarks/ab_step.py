"""In-process A/B of our training step (or prediction batch): two variants alternate in blocks.

This 2-core virtual machine's speed drifts by up to 1.5x over minutes, so two runs in separate
processes (even alternating) cannot resolve a 5-20% change: a 4-round cross-process A/B of the
same change read +35% at 09:06 UTC and -20% at 09:25 UTC on 2026-11-26. Here both variants share
one process, one model and one batch stream, and alternate every ``--steps`` steps (who goes
first alternates too); the result is the median over pairs of the per-pair time ratio.

    .venv/bin/python benchmarks/ab_step.py --compare precision            # fp32 vs bf16 autocast
    .venv/bin/python benchmarks/ab_step.py --compare gather               # advanced indexing vs index_select
    .venv/bin/python benchmarks/ab_step.py --compare native               # PyTorch lookups vs the compiled kernel
    .venv/bin/python benchmarks/ab_step.py --compare precision --predict  # prediction batches
    .venv/bin/python benchmarks/ab_step.py --data runs/prepared/ml-1m-random --compare precision

Default data: bench_ctr.py's 1M-row sample (run it once). Model hyper-parameters as bench_ctr.py.
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
    ap.add_argument("--compare", required=True, choices=["precision", "gather", "compile", "native"],
                    help="precision: fp32 (A) vs bf16 (B); gather: x[idx] (A) vs take_rows/index_select (B); "
                         "compile: eager (A) vs torch.compile of the model (B, inductor; its compile time is "
                         "reported apart: the first B block); native: the PyTorch lookups (A) vs the compiled "
                         "kernel of metactr.models.native (B)")
    ap.add_argument("--predict", action="store_true", help="time prediction batches instead of training steps")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40, help="steps (or batches) per block")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import metactr.data.prepared as prepared
    from metactr.data.batch import take_rows
    from metactr.engine.precision import autocast
    from metactr.models import native
    from metactr.strategies.plain import LossModule

    ds, split, model, opt = step_setup(args.data, args.model, "test" if args.predict else "train")
    loss_fn = LossModule(model)
    compiled = torch.compile(model, dynamic=False) if args.compare == "compile" else None
    fwd = model
    gen = torch.Generator().manual_seed(0)
    stream = iter(())
    kernel = contextlib.ExitStack()  # --compare native: the variant's native.enabled(...) block

    def next_batch():
        nonlocal stream
        b = next(stream, None)
        if b is None:
            stream = ds.iter_batches(split, args.batch_size, shuffle=not args.predict, generator=gen)
            b = next(stream)
        return b

    def use(variant: str) -> str:
        """Switch to variant A or B; returns the precision the forward runs in."""
        nonlocal fwd
        if args.compare == "native":
            kernel.close()
            kernel.enter_context(native.enabled(variant == "B"))
            return "fp32"
        if args.compare == "compile":
            fwd = compiled if variant == "B" else model
            loss_fn.model = fwd
            return "fp32"
        if args.compare == "gather":
            prepared.take_rows = take_rows if variant == "B" else (lambda x, idx: x[idx])
            return "fp32"
        return "bf16" if variant == "B" else "fp32"

    def block(precision: str) -> float:
        t0 = time.perf_counter()
        if args.predict:
            model.eval()
            with torch.inference_mode(), autocast("cpu", precision):
                for _ in range(args.steps):
                    torch.sigmoid(fwd(next_batch()).logit.float())
        else:
            model.train()
            loss_fn.precision = precision
            for _ in range(args.steps):
                loss, _ = loss_fn(next_batch(), 1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return (time.perf_counter() - t0) / args.steps * 1e3

    block(use("A"))  # warm-up of both paths
    t_first = time.perf_counter()
    block(use("B"))
    first_b_s = time.perf_counter() - t_first  # with --compare compile: the compilation
    if args.compare == "compile":
        print(f"first B block (compilation + {args.steps} steps): {first_b_s:.1f} s")
    times: dict[str, list[float]] = {"A": [], "B": []}
    for p in range(args.pairs):
        for v in ("A", "B") if p % 2 == 0 else ("B", "A"):
            times[v].append(block(use(v)))
    ratios = [a / b for a, b in zip(times["A"], times["B"], strict=True)]
    names = {"precision": ("fp32", "bf16"), "gather": ("x[idx]", "index_select"),
             "compile": ("eager", "compiled"), "native": ("torch path", "native")}[args.compare]
    what = "prediction batch" if args.predict else "training step"
    for v, name in zip("AB", names, strict=True):
        print(f"{v} {name:12s} median {statistics.median(times[v]):.3f} ms per {what}  "
              f"{[round(t, 2) for t in times[v]]}")
    print(f"A/B time ratio per pair: median {statistics.median(ratios):.3f} (> 1: B is faster)  "
          f"{[round(r, 2) for r in ratios]}")
    if args.out:
        from machine import machine  # benchmarks/machine.py
        from metactr.utils import write_json_atomic

        write_json_atomic(args.out, {"command": "python benchmarks/ab_step.py " + " ".join(sys.argv[1:]),
                                     "data": str(args.data), "model": args.model, "compare": args.compare,
                                     "variants": dict(zip("AB", names, strict=True)), "predict": args.predict,
                                     "ms": times, "first_b_block_s": first_b_s,
                                     "machine": machine(), "ratio_median": statistics.median(ratios), "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
