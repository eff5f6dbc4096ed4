"""Does session-level fast adaptation help? RML's variants and the strong simple baselines on one
powered split, with intervals over seeds and test users and paired differences (issue 15).

Every method runs the RML protocol (``papers.rml.protocol.run_protocol``, mode ``full``: every
FT row used, every test row scored): train on ``{subset}_train``, fine-tune on FT-A, FT-B, FT-C,
score the test window after FT-C. ``session_maml`` also adapts each test session on its own
history before scoring its target. Settings are fixed in advance (no tuning, on test rows or
otherwise); the table is what they give.

    python benchmarks/probe_session_meta.py --data runs/prepared/ml-1m-rml-future --seeds 2 \\
        --out benchmarks/results/session_meta_ml1m_future.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from metactr.data.prepared import PreparedDataset
from metactr.eval.intervals import compare_methods
from metactr.papers.rml.protocol import ProtocolConfig, run_protocol
from metactr.strategies import strategy_config

RML = {"embed_dim": 16, "att_hidden": [128, 64], "lstm_hidden": 16, "mlp_hidden": [128, 64], "dropout": 0.3,
       "logloss_weight": 0.7, "l2_weight": 3.5e-5, "aux_weight": 0.3}
RML_NO_DROPOUT = {**RML, "dropout": 0.0}


def methods(data: str, subset: str) -> dict[str, tuple[str, dict, object]]:
    stats = {"stats_from": data, "stats_splits": [f"{subset}_train"]}
    return {
        "rml (two-phase, faithful)": ("rml", RML, strategy_config("two_phase")),
        "rml_wo_meta (plain)": ("rml", RML, strategy_config("plain")),
        "rml session_maml (meta, 1 step)": ("rml", RML_NO_DROPOUT, strategy_config(
            "session_maml", {"adapt_groups": ["meta"], "inner_lr": 0.1, "inner_steps": 1, "history_size": 5})),
        "din (plain)": ("din", {"embed_dim": 16, "hidden": [200, 80]}, strategy_config("plain")),
        "rates_lr": ("rates_lr", {"prior_strength": 20, **stats}, strategy_config("plain", {"lr": 0.05})),
        "popularity": ("popularity", {"prior_strength": 20, **stats}, strategy_config("plain", {"lr": 0.05})),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--subsets", default="wc,cw")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--only", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = PreparedDataset(args.data)
    report: dict = {"data": args.data, "seeds": args.seeds, "epochs": args.epochs, "subsets": {}}
    for subset in args.subsets.split(","):
        y = users = None
        preds: dict[str, list[np.ndarray]] = {}
        times: dict[str, float] = {}
        for name, (model, kw, strat) in methods(args.data, subset).items():
            if args.only and name.split(" ")[0] not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                got = {}
                run_protocol(ds, subset, model, kw, strat, ProtocolConfig(mode="full", bootstrap=0), seed,
                             epochs=args.epochs, batch_size=128,
                             on_scores=lambda stage, yy, p, got=got: got.__setitem__(stage, (yy, p)))
                yy, p = got["finetune_c"]
                preds.setdefault(name, []).append(np.asarray(p, dtype=np.float64))
                y = np.asarray(yy)
            times[name] = round(time.perf_counter() - t0, 1)
            print(f"{subset} {name}: {times[name]} s", flush=True)
        users = ds.split(f"{subset}_test").user_id.numpy()
        cmp = compare_methods(y, users, {k: np.stack(v) for k, v in preds.items()},
                              baselines=[k for k in preds if k.startswith(("rates_lr", "popularity", "din"))])
        ablation = "rml_wo_meta (plain)"
        vs_ablation = (compare_methods(y, users, {k: np.stack(v) for k, v in preds.items()}, reference=ablation)
                       if ablation in preds else None)
        report["subsets"][subset] = {"rows": cmp.rows(), "pairs": cmp.pair_rows(), "reference": cmp.reference,
                                     "pairs_vs_wo_meta": vs_ablation.pair_rows() if vs_ablation else [],
                                     "n_test": cmp.n_test, "n_users": cmp.n_users, "seconds": times}
        print(f"\n{subset.upper()}: {cmp.n_test} test rows, {cmp.n_users} users; reference {cmp.reference}")
        for r in cmp.rows():
            print(f"  {r['method']:<34} AUC {r['auc_mean']:.4f} [{r['auc_ci95'][0]:.4f}, {r['auc_ci95'][1]:.4f}]"
                  f"  GAUC {r['gauc_mean']:.4f}  LogLoss {r['logloss_mean']:.4f}")
        for p in cmp.pair_rows():
            print(f"  {p['method']:<34} - ref: {p['delta_auc']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
                  f"{'  *' if p['excludes_zero'] else ''}")
        for p in report["subsets"][subset]["pairs_vs_wo_meta"]:
            print(f"  {p['method']:<34} - w/o Meta: {p['delta_auc']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
                  f"{'  *' if p['excludes_zero'] else ''}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
