"""`metactr serve`: the HTTP scoring service with per-user fast adaptation."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(checkpoint: Path = typer.Argument(..., help="checkpoint (.safetensors/.json or their stem)"),
              data: Path = typer.Option(..., "--data", help="prepared dataset directory the model was trained on"),
              host: str = typer.Option("127.0.0.1", help="bind address"),
              port: int = typer.Option(8000, min=1, max=65535),
              adapt_groups: str = typer.Option("", help="comma-separated parameter groups to adapt "
                                               "(default: 'meta' if the model has it, else all but 'emb')"),
              adapt_lr: float = typer.Option(0.01, help="inner learning rate (> 0)"),
              adapt_steps: int = typer.Option(3, min=0),
              cache_size: int = typer.Option(10_000, min=1)) -> None:
        """Serve predictions over HTTP; POST /adapt fast-adapts the model to one user."""
        import uvicorn

        from metactr.serve.app import create_app
        from metactr.serve.service import CTRService

        groups = [g for g in adapt_groups.split(",") if g] or None
        service = CTRService(checkpoint, data, adapt_groups=groups, adapt_lr=adapt_lr,
                             adapt_steps=adapt_steps, cache_size=cache_size)
        uvicorn.run(create_app(service), host=host, port=port, log_level="info")
