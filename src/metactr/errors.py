"""User-facing errors.

Every error a user can cause (bad file, bad config, unknown model) is a ``MetactrError``. The CLI
prints ``error: <message>`` on one line and exits with code 2; it never shows a traceback for
these. The message names the file, line and field wherever they are known.
"""

from __future__ import annotations

from pathlib import Path


class MetactrError(Exception):
    """An error caused by the user's input; printed as one line by the CLI (exit code 2)."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.path:
            where.append(self.path + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        text = " ".join(self.message.split())  # one line, always
        return f"{prefix}: {text}" if prefix else text


class DataError(MetactrError):
    """Malformed or missing input data."""


class ConfigError(MetactrError):
    """Invalid experiment configuration."""


class OfflineError(MetactrError):
    """A download was needed but the network is unreachable."""
