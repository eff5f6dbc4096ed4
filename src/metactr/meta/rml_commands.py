"""Commands of this concern (placeholder: filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this concern's commands to ``app``."""
