"""``metactr demo``: the README's first command.

Three small steps, each a function, so that a training step can be appended later:
synthesize a seeded click log -> prepare it with the RML protocol -> print its statistics.
Sized to run in a few seconds on two cores.
"""

from __future__ import annotations

from pathlib import Path

import typer

DEMO_USERS, DEMO_ITEMS, DEMO_ROWS, DEMO_SEED = 500, 1500, 50_000, 7


def synthesize_step(out: Path) -> Path:
    from metactr.data.synth import generate

    return generate(out / "raw" / "interactions.parquet", n_users=DEMO_USERS, n_items=DEMO_ITEMS,
                    n_rows=DEMO_ROWS, seed=DEMO_SEED)


def prepare_step(raw: Path, out: Path) -> Path:
    from metactr.data.pipeline import PrepareConfig, prepare

    return prepare("synthetic", raw, out / "prepared", PrepareConfig(protocol="rml", seed=DEMO_SEED))


def stats_step(prepared: Path) -> list[dict]:
    from metactr.data.stats import print_stats

    return print_stats(prepared)


def run_demo(out: Path) -> Path:
    """Run every demo step under ``out``; returns the prepared directory."""
    out = Path(out)
    raw = synthesize_step(out)
    typer.echo(f"[1/3] synthetic log: {raw}")
    prepared = prepare_step(raw, out)
    typer.echo(f"[2/3] prepared (RML generalized cold-start protocol): {prepared}")
    typer.echo("[3/3] statistics per split:")
    stats_step(prepared)
    return prepared


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="output directory")) -> None:
        """Generate a synthetic cold-start dataset, prepare it and print its statistics."""
        run_demo(out)
