"""metactr: CTR prediction under the generalized cold start, with meta-learning.

The Python API (``docs/api.md``); the ``metactr`` command line calls these same functions::

    import metactr
    prepared = metactr.prepare("ml-100k", raw_dir, out_dir, metactr.PrepareConfig(protocol="rml"))
    ds = metactr.load_prepared(prepared)
    model = metactr.build_model("rml", ds.spec, embed_dim=16)
    result = metactr.fit(model, ds, "wc_train", metactr.strategy_config("two_phase"), epochs=2)
    metrics = metactr.evaluate(model, ds, "wc_test")

Names are imported on first use, so ``import metactr`` (and the CLI) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The architecture: each package imports only from its own layer or the ones before it
# (tests/test_layering.py enforces it). A layer is a tuple of packages / top-level modules.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config", "utils"),  # foundation: errors, strict configs, atomic files
    ("data",),  # readers, encoding, splits, sessions, tasks, the Batch, toy datasets
    ("models",),  # every CTR model, registered by name; pure functions of (parameters, batch)
    ("engine",),  # paper-free adaptation primitives (torch.func), precision, optimizers, devices, DDP
    ("eval",),  # metrics, intervals, prediction, reports, plots
    ("strategies",),  # how a batch (or tasks) becomes a loss and an update: one registry
    ("train",),  # the one Trainer, tracking, checkpoints, `metactr train`
    ("papers",),  # what is particular to a paper: protocols, reproductions, paper numbers, CLI
    ("serve",),  # per-user adaptation behind HTTP
    ("api", "demo", "cli"),  # the public functions, the demo, the command line: wiring only
)

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "synthesize": ("metactr.data.synth", "generate"),
    "prepare": ("metactr.data.pipeline", "prepare"),
    "PrepareConfig": ("metactr.data.pipeline", "PrepareConfig"),
    "load_prepared": ("metactr.data.prepared", "PreparedDataset"),
    "PreparedDataset": ("metactr.data.prepared", "PreparedDataset"),
    "Batch": ("metactr.data.batch", "Batch"),
    "build_model": ("metactr.models.base", "build_model"),
    "list_models": ("metactr.models.base", "registry"),
    "strategy_config": ("metactr.strategies", "strategy_config"),
    "list_strategies": ("metactr.strategies", "strategy_registry"),
    "Trainer": ("metactr.train.trainer", "Trainer"),
    "fit": ("metactr.api", "fit"),
    "evaluate": ("metactr.train.trainer", "evaluate"),
    "train_from_config": ("metactr.train.run", "run_training"),
    "load_train_config": ("metactr.train.config", "load_train_config"),
    "load_checkpoint": ("metactr.train.checkpoint", "load_model"),
    "evaluate_checkpoint": ("metactr.train.run", "evaluate_checkpoint"),
    "predict": ("metactr.eval.predict", "predict_proba"),
    "reproduce_rml": ("metactr.papers.rml.reproduce", "run_reproduction"),
    "ReproduceConfig": ("metactr.papers.rml.reproduce", "ReproduceConfig"),
    "reproduce_metaselector": ("metactr.papers.metaselector.reproduce", "run_reproduction"),
}
__all__ = ["LAYERS", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'metactr' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
