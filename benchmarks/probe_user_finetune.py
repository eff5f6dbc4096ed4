"""Does per-user fine-tuning at meta-test lift a single pre-trained base model? (MetaSelector diagnosis)

The paper's meta-test "fine-tunes" the selector and the base models on each user's training data
before scoring the user's test data (sec. 5.3). This probe measures how much such per-user
fine-tuning can give on its own: each base model is pre-trained as in `reproduce metaselector`
(pooled training rows, the config's epochs and optimizers), then, for each (steps, rate) of the
grid, every test user gets `steps` plain SGD steps on their most recent `--support` training
rows (the engine's vmapped `adapt_and_predict`, as MetaSelector's meta-test), and the test AUC /
LogLoss of the adapted models is printed next to the unadapted one.

    .venv/bin/python benchmarks/probe_user_finetune.py --config configs/metaselector_ml100k.yaml \
        --data runs/ms100k_base/prepared --models ffm,deepfm --seed 0

``--validate`` runs the same grid on a validation split made of the training rows only (base
models pre-trained on the 75% support parts, users fine-tuned on their support rows and scored on
their query rows), which is where a fine-tuning rate may be chosen. ``--data`` is a prepared MetaSelector split (``reproduce metaselector`` caches one under
``OUT/prepared``). ``--params all`` adapts every parameter, ``--params emb`` only the embedding
tables (``embedding.*``, ``linear.*``). Results go to stdout and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _grid(text: str) -> list[tuple[int, float]]:
    """``"1:0.1,3:0.3"`` -> [(1, 0.1), (3, 0.3)]; argparse turns a ValueError into a usage error."""
    pairs = [p.split(":") for p in text.split(",")]
    grid = [(int(s), float(r)) for s, r in pairs]
    if any(s < 1 or not r > 0 for s, r in grid):
        raise ValueError(text)
    return grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="prepared MetaSelector split")
    ap.add_argument("--models", default="ffm,deepfm", help="base models of the config to probe")
    ap.add_argument("--grid", type=_grid, default="1:0.1,1:1,3:0.3,5:1,1:10",
                    help="steps:rate pairs (steps >= 1, rate > 0)")
    ap.add_argument("--params", choices=["all", "emb"], default="all")
    ap.add_argument("--support", type=int, default=256, help="most recent training rows per user")
    ap.add_argument("--validate", action="store_true",
                    help="validation protocol: pre-train on the support parts, fine-tune each user on their "
                         "support rows, score their query rows (the test rows are not read)")
    ap.add_argument("--max-users", type=int, default=None, help="only the first N users")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from metactr.config import load_config
    from metactr.eval.metrics import auc, logloss
    from metactr.eval.predict import predict_proba
    from metactr.papers.metaselector.train import SelectorData, SelectorExperiment, _pretrained, meta_test
    from metactr.utils import seed_everything, write_json_atomic

    torch.set_num_threads(args.threads)
    cfg = load_config(SelectorExperiment, args.config)  # one-line errors naming file and field
    data = SelectorData.load(args.data, disjoint=False, max_users=args.max_users)
    if args.validate:  # support plays "train", query plays "test" (as `reproduce metaselector --validate`)
        data = data.validation()
    wanted = args.models.split(",")
    g = seed_everything(args.seed)
    bases = _pretrained(cfg, data.ds, data.train, g)
    y = data.test.label.numpy()
    rows = []
    for b, model in zip(cfg.base_models, bases, strict=True):
        if b.name not in wanted:
            continue
        p = predict_proba(model, data.ds, data.test, batch_size=4096)
        rows.append({"model": b.name, "steps": 0, "rate": 0.0, "auc": auc(y, p), "logloss": logloss(y, p)})
        print(f"{b.name:7s} no fine-tuning          AUC {rows[-1]['auc']:.4f}  LogLoss {rows[-1]['logloss']:.5f}",
              flush=True)
        names = [n for n, _ in model.named_parameters()
                 if args.params == "all" or n.startswith(("embedding", "linear"))]
        for steps, rate in args.grid:
            rates = {n: torch.tensor(rate) for n in names}
            mcfg = cfg.meta.model_copy(update={"test_steps": steps, "test_max_support": args.support,
                                               "test_chunk": 32})
            t0 = time.perf_counter()
            p = torch.sigmoid(meta_test(model, rates, data, mcfg)).numpy()
            rows.append({"model": b.name, "steps": steps, "rate": rate, "auc": auc(y, p), "logloss": logloss(y, p)})
            print(f"{b.name:7s} {steps} step(s), rate {rate:<6g}  AUC {rows[-1]['auc']:.4f}  LogLoss "
                  f"{rows[-1]['logloss']:.5f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.out:
        from machine import machine  # benchmarks/machine.py

        write_json_atomic(args.out, {"command": " ".join(sys.argv), "machine": machine(), "seed": args.seed, "params": args.params,
                                     "validate": args.validate, "max_users": args.max_users,
                                     "support": args.support, "rows": rows})
    return 0


if __name__ == "__main__":
    from metactr.errors import MetactrError

    try:
        sys.exit(main())
    except MetactrError as e:  # bad config or data: one line, no traceback
        sys.exit(f"error: {e}")
