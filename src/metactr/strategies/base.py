"""What a strategy is: how a batch (or a meta-batch of tasks) becomes a loss and an update.

A ``Strategy`` owns no loop, device, file or log. The Trainer (``metactr.train.trainer``) builds a
``Context`` (model on its device, dataset and split, the shuffling generator, run length, the
process group) and asks the strategy for its ``Phase``s: most strategies have one, Meta-Embedding
two (pre-train the base, then meta-train the generator). For every phase the Trainer calls
``start()``, then for each epoch iterates ``stream()`` and hands each item (moved to the device)
to ``step()``, which updates the parameters and returns the loss; ``epoch_end()`` after each
epoch. Optimizers, schedulers and any extra state are exposed for checkpoints, so that a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from metactr.data.prepared import PreparedDataset, Split
from metactr.engine.distributed import DistInfo
from metactr.errors import ConfigError
from metactr.models.base import CTRModel


@dataclass
class Context:
    """What the Trainer hands a strategy for one run."""

    model: CTRModel
    dataset: PreparedDataset
    split: Split
    generator: torch.Generator
    epochs: float
    batch_size: int
    device: torch.device = torch.device("cpu")
    dist: DistInfo = field(default_factory=DistInfo)
    precision: str = "fp32"
    drop_last: bool = False

    def row_batches(self, *, share: bool = False) -> Iterator:
        """One epoch of shuffled row batches (``share``: this rank's part of each global batch)."""
        rank, world = (self.dist.rank, self.dist.world_size) if share else (0, 1)
        return self.dataset.iter_batches(self.split, self.batch_size, shuffle=True, generator=self.generator,
                                         drop_last=self.drop_last, rank=rank, world_size=world)

    @property
    def row_steps(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def numpy_rng(self) -> np.random.Generator:
        """A NumPy generator seeded from the run's generator (task samplers draw from it)."""
        return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))


class Phase:
    """One stage of a strategy's training: a stream of step inputs and the step."""

    name: str = "train"
    log_every: int | None = None  # the Trainer logs the mean loss every so many steps
    train_mode: bool = True  # the model's mode during the phase (False: dropout off)
    sharded_rows: bool = False  # each rank streams its own share of the rows (losses are summed across ranks)

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        """Called by the Trainer when the phase begins (also on resume, before state is restored)."""

    def stream(self) -> Iterator[Any]:
        """The inputs of one epoch's steps (row batches, task batches ...), on the CPU."""
        raise NotImplementedError

    def step(self, item: Any) -> Tensor:
        """One update from ``item``; returns the (detached) loss."""
        raise NotImplementedError

    def rows(self, item: Any) -> int:
        """Samples in ``item`` (for samples/s)."""
        first = item[0] if isinstance(item, tuple) and not hasattr(item, "label") else item
        lab = first.label
        return int(lab.numel())

    def epoch_end(self) -> None:
        """After each epoch (per-epoch schedulers)."""

    def lr(self) -> float | None:
        return None


class Strategy:
    """Base class; subclasses set ``names`` and implement ``setup``."""

    names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.ctx: Context | None = None

    def setup(self, ctx: Context) -> list[Phase]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer that exists now, by name (checkpointed)."""
        return {}

    def schedulers(self) -> dict[str, Any]:
        return {}

    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors a checkpoint must keep besides the model (e.g. learned inner rates)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state a checkpoint must keep (e.g. a task sampler's NumPy generator)."""
        return {}

    def load_extra(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, t in self.extra_tensors().items():
                if k in tensors:
                    t.copy_(tensors[k])

    def finish(self) -> dict[str, Any]:
        """After the last phase (e.g. install generated embeddings); extra results."""
        return {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The global/outer optimizer: what the RML protocol's fine-tuning continues with."""
        return next(iter(self.optimizers().values()))


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    for n in cls.names:
        _REGISTRY[n] = cls
    return cls


def strategy_registry() -> dict[str, type[Strategy]]:
    import metactr.strategies  # noqa: F401  (registers every strategy module)

    return dict(_REGISTRY)


def build_strategy(cfg: Any) -> Strategy:
    """The strategy object of a config (``metactr.strategies.config``)."""
    reg = strategy_registry()
    if cfg.name not in reg:
        raise ConfigError(f"unknown strategy '{cfg.name}' (known: {', '.join(sorted(reg))})", field="strategy.name")
    return reg[cfg.name](cfg)


def group_names(model: CTRModel, groups: list[str] | None) -> list[str]:
    names = [n for n, _ in model.named_parameters()] if groups is None else model.params_in(*groups)
    if not names:
        raise ConfigError(f"model '{model.name}' has no parameters in group(s) {groups}", field="strategy")
    return names


def sharded(n: int, dist: DistInfo) -> tuple[Tensor | None, float]:
    """This rank's items of ``n`` and its loss weight (share of the whole): all and 1 for one process."""
    if not dist.enabled:
        return None, 1.0
    idx = torch.arange(dist.rank, n, dist.world_size)
    return idx, len(idx) / n

