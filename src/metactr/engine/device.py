"""Where tensors live: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""

from __future__ import annotations

import torch

from metactr.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for a config value; ``cuda`` without CUDA is a ``ConfigError``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (cpu, cuda, cuda:N or auto)", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available", field="device")
    return dev
