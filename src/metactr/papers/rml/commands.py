"""``metactr reproduce rml``: the command line of the RML reproduction (``papers.rml.reproduce``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from metactr.config import list_override
from metactr.errors import ConfigError
from metactr.eval.report import fmt_ci
from metactr.papers.rml.reproduce import QUICK_METHODS, ReproduceConfig, load_reproduce_config, run_reproduction


def register(app: typer.Typer) -> None:
    """Add ``reproduce rml`` to ``app``."""

    @app.command("rml")
    def reproduce_rml(
        data: Annotated[Path, typer.Option(help="prepared dataset dir (ml-1m-rml layout)")] = Path(
            "../shared/datasets/ml-1m-rml"),
        out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/rml"),
        seeds: Annotated[int | None, typer.Option(
            help="number of seeds (first_seed, first_seed+1, ...)",
            show_default=f"{ReproduceConfig.model_fields['seeds'].default}, or the config's; 2 with --quick")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="CI mode: 2 methods, 2 seeds, a fraction of an epoch")] = False,
        methods: Annotated[str | None, typer.Option(help="comma-separated methods (rml, rml_wo_meta, "
                                                    "rml_wo_meta_att, rml_wo_meta_lstm, or a model name)")] = None,
        subsets: Annotated[str | None, typer.Option(help="comma-separated: wc,cw")] = None,
        mode: Annotated[str | None, typer.Option(help="faithful | full")] = None,
        epochs: Annotated[float | None, typer.Option(help="training epochs (all methods)")] = None,
        jobs: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
        report_only: Annotated[bool, typer.Option("--report-only",
                                                  help="only aggregate the jobs already finished in OUT")] = False,
        force: Annotated[bool, typer.Option("--force", help="start afresh: replace OUT if metactr wrote it (never "
                                            "another directory); without it, finished jobs in OUT are reused")] = False,
        config: Annotated[Path | None, typer.Option(help="YAML config (configs/rml_*.yaml)")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=c (e.g. "
                                                       "threads=2: torch threads per job)")] = None,
    ) -> None:
        """Reproduce the RML paper's ML-1M results with confidence intervals."""
        ov: list[str] = []
        if quick:
            ov += ["seeds=2", f"methods={json.dumps(list(QUICK_METHODS))}", "strategy.epochs=0.05",
                   "protocol.bootstrap=200"]
        ov += list(set_ or [])
        if seeds is not None:
            ov.append(f"seeds={seeds}")
        if methods:
            ov.append(list_override("methods", methods))
        if subsets:
            ov.append(list_override("subsets", subsets))
        if mode:
            ov.append(f"protocol.mode={mode}")
        if epochs is not None:
            ov.append(f"strategy.epochs={epochs}")
        cfg = load_reproduce_config(config, ov)
        if jobs < 1:
            raise ConfigError("--jobs must be >= 1", field="jobs")
        jobs = min(jobs, os.cpu_count() or 1)
        if force and report_only:
            raise ConfigError("--force would delete the jobs --report-only aggregates", field="force")
        res = run_reproduction(data, out, cfg, jobs=jobs, echo=typer.echo, report_only=report_only, force=force)
        for r in res["rows"]:
            if r["stage"] == "finetune_c":
                typer.echo(f"{r['method']:>18} {r['subset']} FT-C AUC {fmt_ci(r['auc_mean'], r['auc_ci95'])}"
                           f" logloss {fmt_ci(r['logloss_mean'], r['logloss_ci95'])} (n_test {r['n_test']})")
        typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'} (wall {res['wall_s']} s)")
