"""``metactr tune``: the same hyper-parameter search budget for every method, scored on validation data.

A tune config (YAML, ``TuneConfig``) names methods, each a ``metactr train`` config plus a search
space over its keys (``optim.lr``, ``model.params.embed_dim``, ...). Every method gets ``trials``
trials of Optuna's TPE sampler (seeded); a trial is one ``run_training`` in ``OUT/<method>/trial_<k>``
with the sampled values applied, scored on the train config's validation split. The test split is
switched off in every trial (``data.test_split: null``), so test labels are never read. The studies
live in ``OUT/study.db`` (SQLite, one study per method): rerunning the same command continues each
study up to its budget (trials that were interrupted are marked failed and do not count).

Output: ``OUT/results.json`` and ``OUT/results.md`` (per method: best value, best params, trials,
wall time) and ``OUT/<method>/best.yaml``, the train config with the best values applied, ready for
``metactr train`` or a benchmark.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from metactr.config import StrictModel, apply_overrides, load_config, read_yaml, validate
from metactr.errors import ConfigError, DataError
from metactr.train.config import TrainConfig

METRICS = {"valid_auc": ("auc", "maximize"), "valid_gauc": ("gauc", "maximize"),
           "valid_logloss": ("logloss", "minimize")}
Scalar = bool | int | float | str | None
Int = int  # `Dist.int` shadows the builtin inside the class body


class Dist(StrictModel):
    """One dimension of a search space: exactly one of the four keys."""

    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int: tuple[Int, Int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Dist:
        given = [k for k in ("uniform", "log_uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, int, choice")
        lo_hi = getattr(self, given[0]) if given[0] != "choice" else None
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{given[0]}: the low bound must be below the high bound, got {list(lo_hi)}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform: bounds must be > 0")
        return self


class MethodSpec(StrictModel):
    config: str  # a `metactr train` config (relative paths: from the working directory)
    space: dict[str, Dist] = Field(min_length=1)  # dotted key of the train config -> distribution
    set: list[str] = Field(default_factory=list)  # overrides for this method's trials (after the global ones)


class TuneConfig(StrictModel):
    trials: int = Field(ge=1)  # per method: the same budget for every method
    seed: int = Field(0, ge=0)  # seeds TPE (per method, and per resumption: see sampler_seed)
    metric: Literal["valid_auc", "valid_gauc", "valid_logloss"] = "valid_auc"
    methods: dict[str, MethodSpec] = Field(min_length=1)
    set: list[str] = Field(default_factory=list)  # overrides for every trial of every method
    out: str = "runs/tune"
    progress: bool = True  # Rich bar per method (also off when stderr is not a TTY or $CI is set)


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> TuneConfig:
    cfg = load_config(TuneConfig, path, overrides)
    for name in cfg.methods:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("method names may hold letters, digits, '_' and '-' only", path=path,
                              field=f"methods.{name}")
    return cfg


# --------------------------------------------------------------------------- one method's train config
def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section", field=key)
    node[last] = value


def _init_kwargs(cls: type) -> set[str]:
    """Keyword arguments a model class accepts, following ``**kw`` passed up to its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self", "spec"}


def _has_key(cfg: TrainConfig, key: str) -> bool:
    """``key`` names a field of the train config, or a keyword argument of its model."""
    node: Any = cfg.model_dump()
    parts = key.split(".")
    if parts[:2] == ["model", "params"] and len(parts) == 3:
        from metactr.models.base import registry

        cls = registry().get(cfg.model.name)
        if parts[2] in cfg.model.params or cls is None:
            return parts[2] in cfg.model.params
        return parts[2] in _init_kwargs(cls)
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


class Method:
    """A method of the tune config: its base train config (as data) and its search space."""

    def __init__(self, name: str, spec: MethodSpec, tune: TuneConfig, source: str | Path | None = None) -> None:
        self.name, self.spec, self.space = name, spec, spec.space
        field = f"methods.{name}"
        path = Path(spec.config)
        if not path.is_file():
            raise ConfigError(f"train config '{spec.config}' not found", path=source, field=f"{field}.config")
        self.path = path
        self.base = apply_overrides(read_yaml(path), [*tune.set, *spec.set])
        cfg = validate(TrainConfig, copy.deepcopy(self.base), source=path)
        for key in self.space:
            if not _has_key(cfg, key):
                raise ConfigError(f"train config {path} has no key '{key}'", path=source, field=f"{field}.space")
        valid, test = cfg.data.valid_split, cfg.data.test_split
        if valid is None:
            raise ConfigError(f"train config {path} has no validation split (data.valid_split: null): tuning "
                              "would have to score on test", path=source, field=f"{field}.config")
        if valid == test:
            raise ConfigError(f"train config {path} validates on its test split '{test}'", path=source,
                              field=f"{field}.config")
        self.cfg = cfg

    def trial_config(self, params: dict[str, Any], out: Path, *, for_trial: bool = True) -> TrainConfig:
        data = copy.deepcopy(self.base)
        for key, value in params.items():
            _set_path(data, key, value)
        data["out"] = str(out)
        if for_trial:  # the trial never scores (or reads) the test split; the trial bar is ours
            _set_path(data, "data.test_split", None)
            data["progress"] = False
        return validate(TrainConfig, data, source=f"{self.path} with {json.dumps(params, default=str)}")


def check_data(method: Method, run_out: Path) -> None:
    """Prepare (or find) the method's data once, before any trial, and check its splits."""
    from metactr.train.run import prepared_dir

    root = prepared_dir(method.cfg.data, run_out)
    splits = sorted(p.stem for p in Path(root).glob("*.parquet") if p.stem not in ("users", "items"))
    for role, name in (("train", method.cfg.data.train_split), ("validation", method.cfg.data.valid_split)):
        if name not in splits:
            hint = (" (the rml protocol cuts no validation split from training: point data.valid_split at "
                    "a held-out split such as wc_finetune_a, see docs/tuning.md)" if role == "validation" else "")
            raise DataError(f"{method.name}: no {role} split '{name}' (available: {', '.join(splits)}){hint}",
                            path=root)


# --------------------------------------------------------------------------- Optuna
def distributions(space: dict[str, Dist]) -> dict[str, Any]:
    """Optuna distributions; a choice among non-scalars (lists, mappings) is a choice among their JSON."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.uniform is not None:
            out[key] = FloatDistribution(*d.uniform)
        elif d.log_uniform is not None:
            out[key] = FloatDistribution(*d.log_uniform, log=True)
        elif d.int is not None:
            out[key] = IntDistribution(*d.int)
        else:
            out[key] = CategoricalDistribution([_encode(c) for c in d.choice])
    return out


def _encode(v: Any) -> Scalar:
    return v if isinstance(v, (bool, int, float, str)) or v is None else "json:" + json.dumps(v)


def decode(params: dict[str, Any]) -> dict[str, Any]:
    return {k: json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v for k, v in params.items()}


def sampler_seed(seed: int, index: int, n_existing: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, index, n_existing]).generate_state(1)[0])


def open_study(method: Method, tune: TuneConfig, out: Path, index: int):
    """The method's study in ``out/study.db``, created or resumed (refused when made for another search)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{out.resolve() / 'study.db'}")
    study = optuna.create_study(study_name=method.name, storage=storage, load_if_exists=True,
                                direction=METRICS[tune.metric][1])
    # Seeded from (seed, method, trials already in the study): a fresh study is reproducible, and a
    # resumed one does not replay the draws its first run already made.
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(tune.seed, index, len(study.trials)))
    signature = {"metric": tune.metric, "space": {k: v.model_dump(exclude_none=True) for k, v in method.space.items()}}
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", signature)
    elif stored != json.loads(json.dumps(signature)):
        raise ConfigError(f"the study '{method.name}' in {out / 'study.db'} was made for another metric or space; "
                          "tune into another --out, or delete it", field=f"methods.{method.name}.space")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by an interrupted run
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return study


def counted(study) -> list:
    """The trials that use up the budget: finished ones (complete, or pruned when the run gave no score)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run_trial(method: Method, study, tune: TuneConfig, out: Path) -> dict[str, Any]:
    """Ask for values, train, tell the score; a trial that raises is told failed and the error re-raised."""
    from optuna.trial import TrialState

    from metactr.train.run import run_training

    trial = study.ask(distributions(method.space))
    params = decode(trial.params)
    run_dir = out / method.name / f"trial_{trial.number}"
    t0 = time.perf_counter()
    try:
        cfg = method.trial_config(params, run_dir)
        results = run_training(cfg, log=lambda s: None)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    wall = time.perf_counter() - t0
    value = (results.get("metrics", {}).get(cfg.data.valid_split) or {}).get(METRICS[tune.metric][0])
    trial.set_user_attr("wall_s", wall)
    trial.set_user_attr("run_dir", str(run_dir))
    if value is None or not math.isfinite(float(value)):  # diverged: no score, but the budget is spent
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, float(value))
    return {"number": trial.number, "params": params, "value": value, "wall_s": wall}
