"""`metactr data ...` commands (placeholder until the data pipeline lands)."""

import typer

app = typer.Typer(no_args_is_help=True)
