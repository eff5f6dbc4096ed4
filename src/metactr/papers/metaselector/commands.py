"""``metactr reproduce metaselector``: the command line of ``papers.metaselector.reproduce``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from metactr.papers.metaselector.reproduce import run_reproduction


def reproduce_metaselector(
    dataset: Annotated[str, typer.Option("--dataset", help="ml-1m or ml-100k (the raw data in --data-dir).")] = "ml-1m",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Raw dataset folder.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory for results.json/.md and the plot.")] = Path("runs/metaselector"),
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Number of seeds (0..N-1).")] = 5,
    quick: Annotated[bool, typer.Option("--quick", help="CI-sized run (few users, short training).")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML experiment config (configs/metaselector_*.yaml).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: a.b=value (e.g. threads=2).")] = None,
    prepared: Annotated[Optional[Path], typer.Option("--prepared", help="Use this already prepared MetaSelector split (skips the pipeline).")] = None,
    validate: Annotated[bool, typer.Option("--validate", help="Validation protocol for choosing settings: support rows play train, query rows play test, test rows are never read.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if metactr wrote it (never another directory).")] = False,
) -> None:
    """Reproduce MetaSelector (Luo et al., WWW 2020): Table 3, Table 1 and Figure 3."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    command = "metactr reproduce metaselector " + " ".join(
        sys.argv[sys.argv.index("metaselector") + 1:] if "metaselector" in sys.argv else [])
    res = run_reproduction(dataset, data_dir, out, seeds=seeds, quick=quick, config=config, overrides=set_,
                           prepared=prepared, validate=validate, log=log, command=command, force=force)
    ms = next(r for r in res["methods"] if r["method"] == "metaselector")
    best = next(r for r in res["methods"] if r["method"] == res["best_single_model"])
    print(f"best single ({best['method']}): AUC {best['auc_mean']:.4f}; MetaSelector AUC "
          f"{ms['auc_mean']:.4f} (RelImpr {ms['relimpr']:+.2f}%); wrote {out / 'results.md'}")


def register(app: typer.Typer) -> None:
    """Add ``reproduce metaselector`` to the ``reproduce`` app."""
    app.command("metaselector")(reproduce_metaselector)
