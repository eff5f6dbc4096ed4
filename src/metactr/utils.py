"""Small shared helpers: atomic writes, output directories metactr may own, seeding, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(final: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only if the block succeeds.

    Readers never see a half-written file or directory: on any error the temporary is removed
    and ``final`` keeps its previous content (or stays absent).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        else:
            os.replace(tmp, final)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


# What atomic_path leaves behind when a process is killed mid-write: ``.<name>.<8 random>.tmp``
# (tempfile's names: lowercase letters, digits and '_') and a directory swap's ``.<name>.old``.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\..+\.old$")


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove what ``atomic_path`` left in ``directory`` when a writer was killed (only its own
    name patterns, never another file); returns the removed paths. Only safe when no metactr
    process is writing there (e.g. on ``--resume``)."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if _TEMP.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- output directories
MARKER = ".metactr"  # {"written_by": "metactr", "what": ..., "command": ...} in every directory metactr owns


def _out_error(message: str, path: Path):
    from metactr.errors import ConfigError

    return ConfigError(message, path=path, field="out")


def owns_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding metactr's marker (metactr wrote it), or a prepared
    dataset directory that an earlier metactr wrote before markers existed (its ``meta.json``
    carries the prepared layout's ``format_version``, ``dataset`` and ``config`` keys)."""
    m = Path(path) / MARKER
    if not m.is_file():
        legacy = Path(path) / "meta.json"
        try:
            meta = json.loads(legacy.read_text(encoding="utf-8")) if legacy.is_file() else {}
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and {"format_version", "dataset", "config", "vocab_sizes"} <= set(meta)
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("written_by") == "metactr"
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(path: str | Path, *, what: str = "output") -> bool:
    """May metactr write the directory ``path``? True: it exists and is metactr's (marker);
    False: it is absent or empty. Raises a one-line ``ConfigError`` (exit 2) naming it when it is
    a file or a non-empty directory without the marker: metactr never replaces what it did not write."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise _out_error(f"the {what} path is a file, not a directory: choose another path (metactr does not "
                         "replace what it did not write)", path)
    if owns_dir(path):
        return True
    if any(path.iterdir()):
        raise _out_error(f"the {what} directory is not empty and was not written by metactr (no {MARKER} "
                         "marker): choose another path or empty it yourself (--force replaces only "
                         "metactr's own output)", path)
    return False


def write_marker(directory: str | Path, *, what: str = "output", command: str | None = None) -> None:
    cmd = command if command is not None else " ".join(["metactr", *sys.argv[1:]])
    write_json_atomic(Path(directory) / MARKER, {"written_by": "metactr", "what": what, "command": cmd})


def claim_out_dir(path: str | Path, *, force: bool = False, what: str = "output",
                  command: str | None = None) -> Path:
    """Make ``path`` an output directory of metactr's and return it.

    Absent or empty: created, with the marker file ``.metactr`` (JSON ``{"written_by": "metactr",
    "command": ...}``). Already metactr's (marker present): kept as it is, so that resumable
    commands (``reproduce rml``, ``train --resume``) reuse what they finished; with ``force=True``
    it is deleted and recreated empty. A plain file, or a non-empty directory without the marker:
    a one-line ``ConfigError`` naming it (exit 2), whatever ``force`` says. Every command with an
    output directory (``data prepare``, ``train``, ``reproduce ...``, ``demo``) goes through here
    (``data prepare`` through ``check_out_dir``: it builds beside and swaps atomically)."""
    path = Path(path)
    ours = check_out_dir(path, what=what)
    if ours and force:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (ours and not force):
        write_marker(path, what=what, command=command)
    return path


def check_out_file(path: str | Path, *, is_ours: Callable[[Path], bool], what: str = "output") -> Path:
    """May metactr (over)write the file ``path``? Absent, or a file ``is_ours`` recognises as
    metactr's: yes (returned). A directory, or another file: a one-line ``ConfigError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise _out_error(f"the {what} path is a directory, a file was expected", path)
    if path.exists() and not is_ours(path):
        raise _out_error(f"the {what} file exists and was not written by metactr: choose another path "
                         "(metactr does not replace what it did not write)", path)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def data_root() -> Path:
    """Where the real datasets live: ``$METACTR_DATA`` or ``../shared/datasets``."""
    env = os.environ.get("METACTR_DATA")
    if env:
        return Path(env)
    return Path.cwd().parent / "shared" / "datasets"


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_path(text: str, *, field: str | None = None) -> Path:
    """Expand ``~`` and ``${VAR}`` / ``$VAR``; ``${METACTR_DATA}`` falls back to ``data_root()``. An
    unset variable is a one-line ``ConfigError`` naming it (and ``field``, the config key that used it)."""
    from metactr.errors import ConfigError

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name == "METACTR_DATA":
            return str(data_root())
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"environment variable ${{{name}}} is not set (used in path '{text}')", field=field)
        return value

    return Path(_VAR.sub(sub, text)).expanduser()
