"""`metactr demo`: the README's first command (placeholder until the data pipeline lands)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(out: str = typer.Option("runs/demo", help="output directory")) -> None:
        """Generate a synthetic cold-start dataset, prepare it and print its statistics."""
        typer.echo(f"demo output would go to {out}")
