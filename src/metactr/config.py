"""Experiment configs are validated data.

A YAML file parses into a pydantic model whose every level forbids unknown keys. Command-line
overrides (``--set a.b=c``, the value parsed as YAML) are applied on top before validation.
Priority, lowest to highest (as in RecBole): model defaults < YAML file < ``--set`` overrides.
Any problem becomes a one-line ``ConfigError`` naming the file and the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from metactr.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = None
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path, line=line) from None
    except UnicodeDecodeError:
        raise ConfigError("config is not UTF-8 text", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("top level of a config must be a mapping", path=path)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) onto a nested dict, in order."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value", field=item)
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key", field=item)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set '{key}': '{p}' is not a section", field=key)
            node = nxt
        node[parts[-1]] = value
    return data


def validate(model_cls: type[M], data: dict[str, Any], *, source: str | Path | None = None,
             prefix: str = "") -> M:
    """``model_cls`` from ``data``; the first problem becomes a one-line ``ConfigError`` whose field
    is the key path (under ``prefix`` when the data is a nested section of a larger config)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join([prefix] * bool(prefix) + [str(x) for x in err["loc"]]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{msg}{more}", path=source, field=loc) from None


def load_config(model_cls: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate(model_cls, data, source=path if path is not None else "--set")


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def list_override(key: str, csv: str) -> str:
    """A ``--set`` override ``key=[...]`` from a comma-separated CLI value (``--methods a,b``)."""
    import json

    return f"{key}={json.dumps([v.strip() for v in csv.split(',') if v.strip()])}"
