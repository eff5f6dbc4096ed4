"""Strategy settings: one pydantic model per strategy, a union discriminated by ``name``.

The run's length and batch size (``epochs``, ``batch_size``) belong to the Trainer; what is here
is how a batch (or a meta-batch of tasks) becomes a loss and an update. ``strategy_config``
builds the model of one strategy from a flat dict of shared defaults (a reproduction's
``strategy:`` block applies to every method), keeping only the keys that strategy has.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, create_model

from metactr.config import StrictModel
from metactr.errors import ConfigError


class _Optimised(StrictModel):
    lr: float = Field(0.01, gt=0)  # eta_2 (global / outer)
    decay: float = Field(0.7, gt=0, le=1)  # learning-rate factor per epoch, applied continuously per step
    min_lr: float = Field(1e-5, ge=0)
    clip_norm: float | None = Field(5.0, gt=0)


class PlainConfig(_Optimised):
    """Supervised training on batches of rows (Adam)."""

    name: Literal["plain"] = "plain"


class TwoPhaseConfig(_Optimised):
    """RML's local step on ``local_groups`` (first B - l_pos rows), then a global step (last l_pos)."""

    name: Literal["two_phase"] = "two_phase"
    local_lr: float = Field(0.01, gt=0)  # eta_1
    l_pos_frac: float = Field(1 / 3, gt=0, lt=1)
    local_groups: list[str] = ["meta"]


class _Tasks(_Optimised):
    """User tasks: support and query rows of each user (``data.tasks.UserTaskSampler``)."""

    adapt_groups: list[str] | None = None  # None: every group (MeLU/MAMO: their own default)
    inner_lr: float = Field(0.01, gt=0)
    inner_steps: int = Field(1, ge=1)
    first_order: bool = False
    tasks_per_batch: int = Field(32, gt=0)
    support_size: int = Field(20, gt=0)
    query_size: int = Field(10, gt=0)
    query_frac: float = Field(0.5, gt=0, lt=1)
    vectorize: bool = True
    # the user-level variant (issue 15): time-ordered tasks (support = a user's latest rows before the
    # query, query = the next rows) and, at FT/test, each user adapted on their latest rows of the
    # splits seen so far before their test rows are scored (``eval.adapted.user_adapted_proba``)
    task_order: Literal["random", "time"] = "random"
    test_adapt: bool = False


class MAMLConfig(_Tasks):
    """MAML (second order; ``fomaml`` first order) and Meta-SGD (learned per-parameter inner rates)."""

    name: Literal["maml", "fomaml", "metasgd"] = "maml"
    metasgd_init: float = Field(0.01, gt=0)


class ReptileConfig(_Tasks):
    name: Literal["reptile"] = "reptile"


class MeLUConfig(_Tasks):
    name: Literal["melu"] = "melu"


class MAMOConfig(_Tasks):
    name: Literal["mamo"] = "mamo"


class MetaEmbeddingConfig(_Tasks):
    """Pre-train the base, meta-train the generator on item tasks, install cold items' embeddings."""

    name: Literal["meta_embedding"] = "meta_embedding"
    alpha: float = Field(0.1, ge=0, le=1)
    cold_threshold: int = Field(5, ge=1)


class SessionMetaConfig(_Optimised):
    """Session-level MAML (ours, beside the papers' methods): each session is a task, its support
    set the session's own labelled history, its query the target; the inner loop adapts
    ``adapt_groups`` (``inner_steps`` steps, second order unless ``first_order``, learned
    per-parameter rates with ``metasgd``). At FT and test every session is adapted on its own
    history before its target is scored (``test_steps`` / ``test_lr``, default: as in training)."""

    name: Literal["session_maml"] = "session_maml"
    adapt_groups: list[str] | None = None  # None: ["meta"] (RML's meta-interaction module)
    inner_lr: float = Field(0.01, gt=0)
    inner_steps: int = Field(1, ge=1)
    first_order: bool = False
    metasgd: bool = False
    history_size: int = Field(5, gt=0)  # the support set: the session's last history_size items
    test_steps: int | None = Field(None, ge=0)
    test_lr: float | None = Field(None, gt=0)


StrategyConfig = Annotated[Union[PlainConfig, TwoPhaseConfig, MAMLConfig, ReptileConfig, MeLUConfig,  # noqa: UP007
                                 MAMOConfig, MetaEmbeddingConfig, SessionMetaConfig], Field(discriminator="name")]
CONFIGS: dict[str, type[StrictModel]] = {}
for _cls in (PlainConfig, TwoPhaseConfig, MAMLConfig, ReptileConfig, MeLUConfig, MAMOConfig, MetaEmbeddingConfig,
             SessionMetaConfig):
    for _n in _cls.model_fields["name"].annotation.__args__:
        CONFIGS[_n] = _cls
STRATEGIES = tuple(CONFIGS)
_ADAPTER = TypeAdapter(StrategyConfig)


def _defaults_model() -> type[StrictModel]:
    """The flat ``strategy:`` block of a reproduction: the run length + every strategy's settings
    (each field as its strategy declares it, so the defaults and bounds have one source)."""
    fields: dict[str, Any] = {"epochs": (float, Field(10.0, gt=0)),  # fractions allowed (quick runs)
                              "batch_size": (int, Field(128, gt=1))}
    for cls in dict.fromkeys(CONFIGS.values()):
        for n, f in cls.model_fields.items():
            if n != "name":
                fields.setdefault(n, (f.annotation, f))
    return create_model("StrategyDefaults", __base__=StrictModel, **fields)


StrategyDefaults = _defaults_model()


def strategy_config(name: str, values: dict[str, Any] | None = None, *, strict: bool = False) -> Any:
    """The config of strategy ``name`` from ``values``; keys it lacks are an error only if ``strict``."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})", field="strategy.name")
    fields = CONFIGS[name].model_fields
    values = dict(values or {})
    extra = sorted(k for k in values if k not in fields and k not in ("epochs", "batch_size"))
    if strict and extra:
        raise ConfigError(f"strategy '{name}' has no setting(s) {', '.join(extra)}", field="strategy")
    kept = {k: v for k, v in values.items() if k in fields}
    kept["name"] = name
    try:
        return _ADAPTER.validate_python(kept)
    except Exception as e:  # pydantic's ValidationError -> one line with the key
        raise ConfigError(" ".join(str(e).split()), field="strategy") from None
