"""The validated config of one training run (``metactr train CONFIG``).

Every section forbids unknown keys; ``load_train_config`` reports a bad key or value as a
one-line ``ConfigError`` naming the file and the key path. Paths may use ``~`` and
``${METACTR_DATA}`` (default: ``../shared/datasets`` beside the project, see ``utils.data_root``).

A config trains either on an already prepared directory (``data.prepared``) or straight from raw
files (``data.dataset`` + ``data.raw_dir`` + ``data.protocol``): the prepared result is cached in
``data.out`` (default ``<run out>/../_prepared/<dataset>-<protocol>``) and reused when the
pipeline's config hash matches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from metactr.config import StrictModel, load_config
from metactr.errors import ConfigError
from metactr.engine.precision import Precision, resolve_precision
from metactr.strategies.config import StrategyConfig
from metactr.train.tracking import TrackingConfig


class DataConfig(StrictModel):
    prepared: str | None = None  # a prepared directory (ml-1m-rml layout)
    dataset: str | None = None  # or: raw dataset name for metactr.data.pipeline.prepare
    raw_dir: str | None = None
    protocol: Literal["rml", "random", "metaselector"] = "random"
    out: str | None = None  # where the prepared data are cached
    prepare: dict[str, Any] = Field(default_factory=dict)  # PrepareConfig overrides
    train_split: str = "train"
    valid_split: str | None = "valid"  # None: no validation (no early stopping, best = last)
    test_split: str | None = "test"
    use_ids: bool = True  # user_id/item_id as features
    max_hist_len: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.prepared is None) == (self.dataset is None):
            raise ValueError("give exactly one of data.prepared or data.dataset (+ data.raw_dir)")
        if self.dataset is not None and self.raw_dir is None:
            raise ValueError("data.dataset needs data.raw_dir")
        return self


class ModelConfig(StrictModel):
    name: str = "basic"
    params: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the model class


class OptimConfig(StrictModel):
    name: Literal["adam", "adagrad", "sgd", "ftrl"] = "adam"
    lr: float = Field(1e-3, gt=0)  # FTRL: the learning-rate scale alpha
    weight_decay: float = Field(0.0, ge=0)  # not used by FTRL (use l2)
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD only
    beta: float = Field(1.0, ge=0)  # FTRL-Proximal beta
    l1: float = Field(0.0, ge=0)  # FTRL-Proximal lambda_1
    l2: float = Field(0.0, ge=0)  # FTRL-Proximal lambda_2
    eps: float = Field(1e-8, gt=0)  # Adam / Adagrad


class EarlyStoppingConfig(StrictModel):
    patience: int | None = Field(2, ge=1)  # epochs without a better validation AUC; None = off
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(StrictModel):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    lr_decay: float = Field(1.0, gt=0, le=1)  # exponential: lr_e = lr * lr_decay**e
    grad_clip: float | None = Field(None, gt=0)  # max global L2 norm of the gradient
    epochs: float = Field(5, gt=0)  # fractions allowed (a partial last epoch)
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    # also checkpoint every N steps within an epoch (the newest kept): --resume continues mid-epoch
    checkpoint_every_steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None = torch default
    out: str = "runs/train"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    # auto: bf16 where the device runs it natively, else fp32 (resolved when the config is loaded,
    # engine.precision.resolve_precision); bf16: forward under torch.autocast
    precision: Precision = "auto"
    progress: bool = True  # Rich bar (also off when stderr is not a TTY or $CI is set)
    tensorboard: bool = True  # when the tensorboard package is installed
    tracking: TrackingConfig = TrackingConfig()  # extra backends (tensorboard, mlflow), requested explicitly
    # None: the plain strategy with `optim`, `lr_decay`, `grad_clip`; else two_phase, maml, ... with
    # their own settings (metactr.strategies.config)
    strategy: StrategyConfig | None = None

    @model_validator(mode="after")
    def _device(self) -> TrainConfig:
        if self.strategy is not None:
            mixed = sorted({"optim", "lr_decay", "grad_clip"} & self.model_fields_set)
            if mixed:
                raise ValueError(f"{', '.join(mixed)} configure training without a 'strategy:'; strategy "
                                 f"'{self.strategy.name}' takes its rates from strategy.lr / strategy.decay")
            if self.precision == "bf16" and self.strategy.name != "two_phase":
                raise ValueError(f"precision {self.precision} is supported by the plain and two_phase "
                                 "strategies only")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, auto, cuda or cuda:N, got '{self.device}'")
        return self

    @model_validator(mode="after")
    def _resolve_precision(self) -> TrainConfig:
        """``auto`` becomes what the run uses (and records): fp32 for the strategies without bf16."""
        if self.precision == "auto" and self.strategy is not None and self.strategy.name != "two_phase":
            self.__dict__["precision"] = "fp32"  # not an assignment: validate_assignment would re-enter
        elif self.precision != "fp32":
            self.__dict__["precision"] = resolve_precision(self.precision, self.device)
        return self


# keys that may change on --resume without --resume-override: the run's length (to extend it), where
# it is written and how it is watched or run; none of them changes what a step computes
RESUME_FREE_KEYS = ("epochs", "out", "progress", "threads", "device", "tensorboard", "tracking")


def config_changes(saved: Path, cfg: BaseModel, free: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Keys (dotted) whose value in ``cfg`` differs from the config saved at ``saved``, with both
    values; keys in ``free`` (and below them) are left out. The saved file is compared as written
    (``dump_config``: every key), not re-validated."""
    from metactr.config import read_yaml
    from metactr.train.tracking import flatten_params

    old = flatten_params(read_yaml(saved))
    new = flatten_params(cfg.model_dump(mode="json"))
    out = {}
    for k in sorted(set(old) | set(new), key=lambda k: (k not in new, k)):
        if any(k == f or k.startswith(f + ".") for f in free):
            continue
        if old.get(k) != new.get(k):
            out[k] = {"from": old.get(k), "to": new.get(k)}
    return out


def describe_changes(changes: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k} ({v['from']!r} -> {v['to']!r})" for k, v in changes.items())


def check_resume_config(saved: Path, cfg: BaseModel, free: tuple[str, ...], override: bool) -> dict[str, dict[str, Any]]:
    """The settings of a resumed run that differ from its saved config.yaml (``free`` aside): a
    one-line ``ConfigError`` listing them, or with ``override`` the changes to apply and record.
    ``seed`` never changes: the run's random state continues from its checkpoint."""
    changes = config_changes(saved, cfg, free)
    if not changes:
        return {}
    listed = describe_changes(changes)
    if "seed" in changes:
        raise ConfigError(f"seed cannot change on --resume (the run's random state continues from its checkpoint); "
                          f"changed: {listed}", path=saved, field="seed")
    if not override:
        raise ConfigError(f"--resume with changed settings: {listed}. Resume with the run's settings (these may "
                          f"change: {', '.join(free) or 'none'}) or pass --resume-override to apply and record them",
                          path=saved, field=next(iter(changes)))
    return changes


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
