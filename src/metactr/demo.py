"""``metactr demo``: the README's first command.

Four small steps, each a function: synthesize a seeded click log with drifting interests ->
prepare it with the RML generalized cold-start protocol -> print its statistics -> meta-train RML
(two-phase) on each subset, fine-tune on FT-A, FT-B, FT-C in turn and score the test set after
each. Sized to run in about a minute on two cores.
"""

from __future__ import annotations

from pathlib import Path

import typer

DEMO_USERS, DEMO_ITEMS, DEMO_ROWS, DEMO_SEED = 1200, 600, 120_000, 7


def synthesize_step(out: Path) -> Path:
    from metactr.data.synth import generate

    # interests drift (rho < 1) but slowly enough, and exposure follows interest strongly enough,
    # that a session says something about the next click (docs/synthetic.md)
    return generate(out / "raw" / "interactions.parquet", n_users=DEMO_USERS, n_items=DEMO_ITEMS,
                    n_rows=DEMO_ROWS, seed=DEMO_SEED, rho=0.95, exposure_temp=2.0)


def prepare_step(raw: Path, out: Path) -> Path:
    from metactr.data.pipeline import PrepareConfig, prepare

    return prepare("synthetic", raw, out / "prepared", PrepareConfig(protocol="rml", seed=DEMO_SEED))


def stats_step(prepared: Path) -> list[dict]:
    from metactr.data.stats import print_stats

    return print_stats(prepared)


def rml_step(prepared: Path, out: Path, *, epochs: float = 2.0, seed: int = DEMO_SEED) -> list[dict]:
    """Meta-train RML with the paper's two-phase strategy on WC and CW, then the FT-A/B/C protocol.

    Writes ``out/rml/results.json`` and ``results.md``; returns the result rows."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from metactr.data.prepared import PreparedDataset
    from metactr.eval.report import markdown_table, write_run
    from metactr.papers.rml.protocol import STAGE_LABELS, ProtocolConfig, run_protocol
    from metactr.strategies.config import TwoPhaseConfig

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = PreparedDataset(prepared)
    strategy = TwoPhaseConfig(lr=0.01, local_lr=0.01)
    protocol = ProtocolConfig(mode="full", bootstrap=0)
    rows = [r for subset in ("wc", "cw")
            for r in run_protocol(ds, subset, "rml", {}, strategy, protocol, seed, epochs=epochs, batch_size=128)]
    table = Table(title=f"RML on the synthetic log (seed {seed}, {epochs:g} epochs, every test row scored)")
    for col in ("subset", "stage", "test AUC", "test logloss", "n_test"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["subset"].upper(), STAGE_LABELS[r["stage"]], f"{r['auc']:.4f}", f"{r['logloss']:.4f}",
                      str(r["n_test"]))
    Console().print(table)
    md = "# metactr demo: RML on a synthetic log\n\n" + markdown_table(
        ["subset", "stage", "AUC", "logloss", "n_test"],
        [[r["subset"].upper(), STAGE_LABELS[r["stage"]], r["auc"], r["logloss"], r["n_test"]] for r in rows])
    write_run(out / "rml", {"rows": rows, "seed": seed, "strategy": {**strategy.model_dump(), "epochs": epochs, "batch_size": 128},
                            "protocol": protocol.model_dump()}, md)
    return rows


def run_demo(out: Path) -> Path:
    """Run every demo step under ``out``; returns the prepared directory."""
    out = Path(out)
    raw = synthesize_step(out)
    typer.echo(f"[1/4] synthetic log: {raw}")
    prepared = prepare_step(raw, out)
    typer.echo(f"[2/4] prepared (RML generalized cold-start protocol): {prepared}")
    typer.echo("[3/4] statistics per split:")
    stats_step(prepared)
    typer.echo("[4/4] RML: two-phase meta-training, then fine-tuning on FT-A, FT-B, FT-C:")
    rml_step(prepared, out)
    typer.echo(f"results: {out / 'rml' / 'results.md'}")
    return prepared


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="output directory")) -> None:
        """Synthesize a cold-start dataset, prepare it, print its statistics, then meta-train RML and
        fine-tune it on FT-A/B/C."""
        run_demo(out)
