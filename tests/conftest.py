"""Shared fixtures. Tests that need the real datasets take the path from ``METACTR_DATA``
(default ``../shared/datasets``) and skip with a clear reason where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metactr.utils import data_root

torch.set_num_threads(1)


def _dataset(name: str) -> Path:
    root = data_root()
    path = root / name
    if not path.exists():
        pytest.skip(f"real dataset '{name}' not found under {root} (set METACTR_DATA to the datasets folder)")
    return path


@pytest.fixture
def real_data():
    """Call with a dataset folder name (e.g. 'ml-100k'); skips when it is absent."""
    return _dataset
