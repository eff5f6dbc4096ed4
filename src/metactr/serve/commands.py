"""`metactr serve`: the HTTP scoring service with per-user fast adaptation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

TOKEN_ENV = "METACTR_SERVE_TOKEN"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: ``--token-file`` (first line, surrounding whitespace stripped) wins over the
    environment variable; None when neither is given."""
    from metactr.errors import ConfigError
    from metactr.serve.app import check_token

    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the token file: {type(e).__name__}", path=token_file) from None
        lines = text.strip().splitlines()
        if not lines:
            raise ConfigError("the token file is empty", path=token_file)
        try:
            return check_token(lines[0].strip())
        except ConfigError as e:
            raise ConfigError(e.message, path=token_file) from None
    env = os.environ.get(TOKEN_ENV)
    if env is None:
        return None
    try:
        return check_token(env.strip())
    except ConfigError as e:
        raise ConfigError(f"{TOKEN_ENV}: {e.message}") from None


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
              cache_size: int = typer.Option(10_000, min=1),
              token_file: Path | None = typer.Option(None, help="file holding a bearer token required on every "
                                                     f"route but /health (else ${TOKEN_ENV}, if set)"),
              max_body_bytes: int = typer.Option(1 << 20, min=1, help="larger request bodies get a 413"),
              max_items: int = typer.Option(10_000, min=1, help="most candidates per /predict"),
              max_interactions: int = typer.Option(1_000, min=1, help="most interactions per /adapt"),
              max_history: int = typer.Option(1_000, min=1, help="most history entries per request"),
              threads: int = typer.Option(1, min=1, help="torch threads (1 keeps tail latency low on few cores)"),
              access_log: bool = typer.Option(False, help="log every request (costs latency)")) -> None:
        """Serve predictions over HTTP; POST /adapt fast-adapts the model to one user."""
        import torch
        import uvicorn

        from metactr.serve.app import Limits, create_app
        from metactr.serve.service import CTRService

        token = read_token(token_file)
        limits = Limits(max_body_bytes=max_body_bytes, max_items=max_items, max_interactions=max_interactions,
                        max_history=max_history)
        torch.set_num_threads(threads)
        groups = [g for g in adapt_groups.split(",") if g] or None
        service = CTRService(checkpoint, data, adapt_groups=groups, adapt_lr=adapt_lr,
                             adapt_steps=adapt_steps, cache_size=cache_size)
        if token is None and host not in _LOOPBACK:
            print(f"warning: serving on {host} without a token (--token-file or ${TOKEN_ENV})", file=sys.stderr)
        uvicorn.run(create_app(service, limits=limits, token=token), host=host, port=port, log_level="info",
                    access_log=access_log)
