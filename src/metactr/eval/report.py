"""Results are files: every run directory gets config.yaml, results.json and results.md.

Reports are rendered from these files, never from memory of a run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from metactr.config import dump_config
from metactr.utils import write_json_atomic, write_text_atomic


def fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(mean: float, half: float, digits: int = 4) -> str:
    """``0.8123 ± 0.0051`` (half-width of the 95% interval)."""
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(half, digits)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_run(out_dir: str | Path, results: Any, markdown: str, config: BaseModel | dict | None = None) -> Path:
    """Write results.json, results.md and (when given) config.yaml into ``out_dir`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = dump_config(config) if isinstance(config, BaseModel) else json.dumps(config, indent=2)
        write_text_atomic(out / "config.yaml", text)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", markdown)
    return out


def append_jsonl(path: str | Path, record: dict) -> None:
    """One line per epoch/stage; appends are line-atomic for the small records written here."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
