"""``metactr bench``: the command line of ``papers.bench.run``.

``--quick``: a CI-sized run (a small synthetic log and the toy ml-1m-rml-layout dataset, four
methods, two seeds, a fraction of an epoch). ``--config``: a bench YAML (configs/bench/*.yaml).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from metactr.config import list_override
from metactr.errors import ConfigError

QUICK_METHODS = ["popularity", "rates_lr", "basic", "rml_wo_meta"]


def quick_config(out: Path) -> dict:
    from metactr.data.toy import write_toy_rml_dataset

    toy = out / "data" / "toy" / "prepared"
    if not (toy / "wc_test.parquet").is_file():
        write_toy_rml_dataset(toy, n_users=80, rows_per_user=14, seed=0)
    return {"protocol": "rml", "seeds": 2, "n_boot": 200, "batch_rows": 16, "methods": QUICK_METHODS,
            "contrasts": ["rml_wo_meta:basic"],
            "datasets": [{"name": "synthetic-quick", "synth": {"n_users": 400, "n_items": 200, "n_rows": 40000, "seed": 7},
                          "prepare": {"protocol": "rml", "seed": 7, "session": {"max_len": 10},
                                      "rml": {"holdout": "future"}}},
                         {"name": "toy", "prepared": str(toy)}],
            "rml": {"strategy": {"epochs": 0.5, "batch_size": 256}}}


def load(config: Path | None, quick: bool, out: Path, overrides: list[str]):
    from metactr.config import apply_overrides, read_yaml, validate
    from metactr.papers.bench.config import BenchConfig

    if config is None and not quick:
        raise ConfigError("give --config FILE (configs/bench/*.yaml) or --quick", field="--config")
    data = read_yaml(config) if config is not None else quick_config(out)
    return validate(BenchConfig, apply_overrides(data, overrides), source=config or "--quick")


def print_leaderboard(res: dict, echo=typer.echo) -> None:
    from metactr.eval.bench_report import pair_verdict

    final = res["final_stage"]
    pairs = {(p["dataset"], p["subset"], p["stage"], p["method"]): p for p in res["pairs"]}
    groups: dict = {}
    for r in res["rows"]:
        if r["stage"] == final:
            groups.setdefault((r["dataset"], r["subset"]), []).append(r)
    for (name, sub), rows in groups.items():
        rows.sort(key=lambda r: -r["auc_mean"])
        echo(f"\n{name}{' ' + sub.upper() if sub else ''} ({rows[0]['n_test']:,} test rows, {rows[0]['n_users']:,} users, "
             f"seeds {max(r['seeds'] for r in rows)}):")
        for r in rows:
            p = pairs.get((name, sub, final, r["method"]))
            lo, hi = r["auc_ci95"]
            if r.get("upper_bound"):
                tag = "upper bound" if r["method"] == "bayes_ceiling" else "oracle"
            elif p is None:
                tag = "reference"
            else:
                tag = f"{p['delta_auc']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] {pair_verdict(p)}"
            echo(f"  {r['method']:>24}  AUC {r['auc_mean']:.4f} [{lo:.4f}, {hi:.4f}]  GAUC {r['gauc_mean']:.4f}  "
                 f"LogLoss {r['logloss_mean']:.4f}  {tag}")
    if res.get("contrasts"):
        echo("\ncontrasts (paired, same resamples):")
        for c in res["contrasts"]:
            lo, hi = c["ci95"]
            echo(f"  {c['dataset']}{' ' + c['subset'].upper() if c['subset'] else ''}: {c['method']} - {c['reference']}"
                 f"  ΔAUC {c['delta_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}] {pair_verdict(c)}")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        config: Annotated[Path | None, typer.Option(help="bench YAML (configs/bench/*.yaml)")] = None,
        out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/bench"),
        quick: Annotated[bool, typer.Option(help="CI-sized run: synthetic log + toy, 4 methods, 2 seeds")] = False,
        jobs: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto")] = None,
        seeds: Annotated[int | None, typer.Option(help="number of training seeds")] = None,
        methods: Annotated[str | None, typer.Option(help="comma-separated methods")] = None,
        report_only: Annotated[bool, typer.Option(help="only aggregate the jobs already finished in OUT")] = False,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=c")] = None,
    ) -> None:
        """Datasets x methods x seeds with intervals over seeds x test users; results.json/.md, report.html."""
        from metactr.papers.bench.run import run_bench

        ov = list(set_ or [])
        if seeds is not None:
            ov.append(f"seeds={seeds}")
        if methods:
            ov.append(list_override("methods", methods))
        if device:
            ov.append(f"device={device}")
        if jobs < 1:
            raise ConfigError("--jobs must be >= 1", field="--jobs")
        from metactr.papers.bench.config import check_methods
        from metactr.utils import claim_out_dir

        if quick:  # --quick writes its toy data there before the config exists
            claim_out_dir(out, what="bench output", command="metactr bench")
        cfg = load(config, quick, out, ov)
        check_methods(cfg)  # a bad method or protocol setting: the one-line error, nothing written
        res = run_bench(cfg, out, jobs=min(jobs, os.cpu_count() or 1), echo=typer.echo, report_only=report_only,
                        command="metactr " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        print_leaderboard(res)
        wall = "aggregated only" if res["wall_s"] is None else f"wall {res['wall_s']} s"
        typer.echo(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'report.html'} ({wall})")
