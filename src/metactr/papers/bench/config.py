"""The bench config (YAML, strict): datasets, methods, seeds, split seeds and the protocol settings.

A dataset is a prepared directory (``prepared``), or a raw dataset (``dataset`` reader +
``raw`` path) with a prepare config (``prepare``: a YAML path or an inline mapping, ``set``:
overrides such as ``rml.holdout=future``), or a generated synthetic log (``synth``). With
``split_seeds`` every raw/synthetic dataset is prepared once per split seed (``prepare.seed``:
the warm/cold user and item draw), and training seed ``k`` runs on every split.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field as PField
from pydantic import model_validator

from metactr.config import StrictModel, load_config
from metactr.errors import ConfigError
from metactr.papers.rml.protocol import ProtocolConfig
from metactr.papers.rml.reproduce import (
    ABLATIONS,
    META_BASELINES,
    MethodConfig,
    ReproduceConfig,
    job_settings,
    method_protocol,
)
from metactr.papers.rml.strategy_select import check_selection
from metactr.strategies.config import StrategyDefaults

SIMPLE = ("popularity", "rates_lr")
RML_METHODS = (*ABLATIONS, "basic", "wide_deep", "deepfm", "din", "dien", "gru4rec", "lstm4rec", "mimn",
               *META_BASELINES, *SIMPLE)
BASE_MODELS = ("lr", "fm", "ffm", "deepfm")
SELECTOR_METHODS = ("perfect_sample", "perfect_user", "sample_selector", "metaselector", "metaselector_simplified")
ORACLES = ("perfect_sample", "perfect_user")
# the simple baselines learn a handful of weights: a larger step than the deep models' default
SIMPLE_KW = {"lr": 0.05}


class SynthSpec(StrictModel):
    """``data.synth.generate`` settings (the true click probability is kept: a Bayes ceiling)."""

    n_users: int = PField(1200, ge=10)
    n_items: int = PField(600, ge=10)
    n_rows: int = PField(120_000, ge=1000)
    seed: int = 7
    rho: float = PField(0.95, ge=0, le=1)
    exposure_temp: float = PField(2.0, ge=0)
    # a click propensity per user that drifts over the log (0: none; docs/synthetic.md)
    propensity_sigma: float = PField(0.0, ge=0)
    propensity_rho: float = PField(0.9, ge=0, le=1)
    propensity_periods: int = PField(60, ge=1)


class DatasetSpec(StrictModel):
    name: str = PField(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    prepared: str | None = None  # a prepared directory (used as is; split_seeds do not apply)
    dataset: str | None = None  # reader name (ml-1m, ml-100k, synthetic, ...) for raw data
    raw: str | None = None  # raw data dir (${METACTR_DATA} expands)
    prepare: str | dict[str, Any] = PField(default_factory=dict)  # prepare YAML path or mapping
    set: list[str] = PField(default_factory=list)  # overrides of the prepare config
    synth: SynthSpec | None = None  # generate a synthetic log under OUT/data/<name>/raw

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        n = sum(x is not None for x in (self.prepared, self.raw, self.synth))
        if n != 1:
            raise ValueError("give exactly one of prepared, raw (+ dataset) or synth")
        if self.raw is not None and self.dataset is None:
            raise ValueError("raw needs dataset (the reader name)")
        return self


class RMLSettings(StrictModel):
    subsets: list[Literal["wc", "cw"]] = ["wc", "cw"]
    strategy: StrategyDefaults = StrategyDefaults(epochs=2.0)
    protocol: ProtocolConfig = ProtocolConfig(mode="full", bootstrap=0)
    method: dict[str, MethodConfig] = {}  # per-method overrides / extra methods
    max_hist_len: int | None = PField(None, ge=1)


class BenchConfig(StrictModel):
    protocol: Literal["rml", "metaselector"] = "rml"
    datasets: list[DatasetSpec] = PField(min_length=1)
    methods: list[str] | None = None  # None: every method of the protocol
    seeds: int = PField(3, ge=1)
    first_seed: int = 0
    split_seeds: list[int] | None = PField(None, min_length=1)
    reference: str | None = None  # None: the strongest of ``baselines``
    baselines: list[str] | None = None  # None: the simple baselines (rml) / the base models (metaselector)
    n_boot: int = PField(1000, ge=10)
    # extra paired differences "method:reference" after the last stage (e.g. a meta variant against
    # its own non-meta control), on the same resamples as the leaderboard's
    contrasts: list[str] = []
    batch_rows: int = PField(128, ge=8)  # rows per test batch of the per-batch AUC figures
    rml: RMLSettings = RMLSettings()
    metaselector: dict[str, Any] = PField(default_factory=dict)  # SelectorExperiment keys
    device: str = "cpu"

    @model_validator(mode="after")
    def _names(self) -> BenchConfig:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct: {names}")
        return self


def method_list(cfg: BenchConfig) -> list[str]:
    if cfg.methods is not None:
        return list(cfg.methods)
    if cfg.protocol == "rml":
        return list(RML_METHODS)
    bases = [b["name"] for b in cfg.metaselector.get("base_models", [])] or list(BASE_MODELS)
    return bases + list(SELECTOR_METHODS)


def baseline_list(cfg: BenchConfig, methods: list[str]) -> list[str]:
    if cfg.baselines is not None:
        pool = list(cfg.baselines)
    elif cfg.protocol == "rml":
        pool = [m for m in SIMPLE if m in methods] or [m for m in ("basic", "rml_wo_meta") if m in methods]
    else:
        pool = [m for m in methods if m not in SELECTOR_METHODS]
    pool = [m for m in pool if m in methods]
    return pool or [methods[0]]


def check_methods(cfg: BenchConfig) -> list[str]:
    """The method list, each one known to the protocol (ConfigError naming the field otherwise)."""
    methods = method_list(cfg)
    if not methods:
        raise ConfigError("no methods", field="methods")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods repeat: {methods}", field="methods")
    if cfg.protocol == "rml":
        for m in methods:
            strat = rml_settings(cfg, m)[2]
            # a bad per-method protocol setting or selection candidate: ConfigError before any work
            check_selection(strat, rml_protocol(cfg, m), m)
    else:
        bases = [b["name"] for b in cfg.metaselector.get("base_models", [])] or list(BASE_MODELS)
        bad = [m for m in methods if m not in bases and m not in SELECTOR_METHODS]
        if bad:
            raise ConfigError(f"unknown metaselector method(s) {bad} (base models {bases}; "
                              f"selectors {list(SELECTOR_METHODS)})", field="methods")
    for c in cfg.contrasts:
        pair = c.split(":")
        if len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
            raise ConfigError(f"contrast '{c}' is not 'method:reference' with two different methods", field="contrasts")
        bad = [m for m in pair if m not in methods]
        if bad:
            raise ConfigError(f"contrast '{c}': {', '.join(bad)} not among the methods", field="contrasts")
    for key in ([cfg.reference] if cfg.reference else []) + list(cfg.baselines or []):
        if key not in methods:
            raise ConfigError(f"'{key}' is not among the methods", field="reference" if key == cfg.reference
                              else "baselines")
    return methods


def rml_settings(cfg: BenchConfig, method: str) -> tuple[str, dict, Any, float, int]:
    """(model, keyword arguments, strategy config, epochs, batch size) of an rml-protocol method."""
    extra = dict(cfg.rml.method)
    if method in SIMPLE and method not in extra:
        extra[method] = MethodConfig(model=method, strategy="plain", strategy_kw=SIMPLE_KW)
    rc = ReproduceConfig(methods=[method], strategy=cfg.rml.strategy, protocol=cfg.rml.protocol, method=extra,
                         max_hist_len=cfg.rml.max_hist_len)
    return job_settings(rc, method)


def rml_protocol(cfg: BenchConfig, method: str) -> ProtocolConfig:
    """The protocol settings of an rml-protocol method (``rml.protocol`` with the method's overrides)."""
    return method_protocol(cfg.rml.protocol, method, cfg.rml.method.get(method))


def load_bench_config(path, overrides: list[str] | None = None) -> BenchConfig:
    return load_config(BenchConfig, path, overrides)
