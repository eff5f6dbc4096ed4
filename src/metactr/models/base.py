"""What every CTR model shares: the output type, parameter groups, the loss, the registry.

A model is a pure function of (parameters, batch): ``forward(batch) -> ModelOutput``. The loss
is computed *outside* the model by ``objective`` so that every strategy (plain training, RML's
two-phase meta-learning, MAML, Meta-SGD, MetaSelector) shares one definition:

    loss = logloss_weight * mean(logloss) + l2_weight * sum ||theta||^2 (over ``l2_prefixes``)
           + aux_weight * mean(aux)

(eq. 8 of the RML paper with alpha, beta, gamma = logloss_weight, l2_weight, aux_weight).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError


class ModelOutput(NamedTuple):
    logit: Tensor  # [B] pre-sigmoid score
    aux: Tensor  # [B] per-sample auxiliary loss (zeros when the model has none)
    log_weights: Tensor | None = None  # [B, K] a mixture's log weights (MetaSelector), else None


class CTRModel(nn.Module):
    """Base class. Subclasses set ``name``, build their layers and implement ``forward``.

    ``param_group_prefixes`` maps a group name (``emb``, ``meta``, ``mlp``...) to the parameter
    name prefixes that belong to it; every parameter must fall in exactly one group, so that
    strategies can adapt a subset by name (RML's local step touches only ``meta``).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # reads the session (batch.hist*) with its default arguments; see ``session_use`` for what is true
    uses_history: ClassVar[bool] = False
    param_group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {"emb": ("embedding",)}
    l2_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: FeatureSpec, *, logloss_weight: float = 1.0, l2_weight: float = 0.0,
                 aux_weight: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        self.logloss_weight = float(logloss_weight)
        self.l2_weight = float(l2_weight)
        self.aux_weight = float(aux_weight)

    @classmethod
    def session_use(cls) -> str:
        """How the model reads the session, in words (``metactr models``): ``always``, ``no``,
        ``optional (use_history=..., default on/off)`` for the models with that switch, or
        ``as its base ...`` for a wrapper (``base=`` argument, e.g. meta_embedding)."""
        params = inspect.signature(cls.__init__).parameters
        flag = params.get("use_history")
        if flag is not None and isinstance(flag.default, bool):
            return f"optional (use_history, default {'on' if flag.default else 'off'})"
        base = params.get("base")
        if base is not None and isinstance(base.default, str) and base.default in _REGISTRY:
            return f"as its base (default {base.default}: {_REGISTRY[base.default].session_use()})"
        return "always" if cls.uses_history else "no"

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def no_aux(self, batch: Batch) -> Tensor:
        return batch.label.new_zeros(batch.label.shape)

    def param_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {g: [] for g in self.param_group_prefixes}
        for pname, _ in self.named_parameters():
            owners = [g for g, pre in self.param_group_prefixes.items()
                      if any(pname == p or pname.startswith(p + ".") for p in pre)]
            if len(owners) != 1:
                raise RuntimeError(f"{type(self).__name__}: parameter {pname!r} is in groups {owners}; "
                                   "fix param_group_prefixes")
            groups[owners[0]].append(pname)
        return groups

    def params_in(self, *groups: str) -> list[str]:
        pg = self.param_groups()
        unknown = [g for g in groups if g not in pg]
        if unknown:
            raise ConfigError(f"model '{self.name}' has no parameter group(s) {unknown}; it has {list(pg)}")
        return [n for g in groups for n in pg[g]]

    def l2_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters()
                if any(n == p or n.startswith(p + ".") for p in self.l2_prefixes)]


# --------------------------------------------------------------------------- loss
def objective(model: CTRModel, params: Mapping[str, Tensor] | None, batch: Batch,
              weight: Tensor | None = None) -> tuple[Tensor, ModelOutput]:
    """The training loss of ``model`` at ``params`` (its own when None) on ``batch``.

    ``weight`` [B] masks/weights samples (padded task rows get 0); the means are weighted.
    Returns (scalar loss, model output).
    """
    if params is None:
        out = model(batch)
    else:
        out = functional_call(model, dict(params), (batch,))
    ll = F.binary_cross_entropy_with_logits(out.logit, batch.label, reduction="none")
    if weight is None:
        loss = ll.mean() * model.logloss_weight
        if model.aux_weight:
            loss = loss + model.aux_weight * out.aux.mean()
    else:
        denom = weight.sum().clamp_min(1e-12)
        loss = model.logloss_weight * (ll * weight).sum() / denom
        if model.aux_weight:
            loss = loss + model.aux_weight * (out.aux * weight).sum() / denom
    if model.l2_weight:  # (named_parameters walks every module: only when there is an L2 term)
        named = dict(model.named_parameters()) if params is None else params
        l2 = sum((named[n] ** 2).sum() for n in model.l2_names() if n in named)
        loss = loss + model.l2_weight * l2
    return loss, out


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[CTRModel]] = {}


def register(name: str) -> Callable[[type[CTRModel]], type[CTRModel]]:
    def deco(cls: type[CTRModel]) -> type[CTRModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"model name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    """Import every module of ``metactr.models`` once, so that each registers its models."""
    import metactr.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"metactr.models.{info.name}")


def registry() -> dict[str, type[CTRModel]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def build_model(name: str, spec: FeatureSpec, **kwargs: Any) -> CTRModel:
    models = registry()
    if name not in models:
        raise ConfigError(f"unknown model '{name}' (available: {', '.join(models)})", field="model.name")
    try:
        model = models[name](spec, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for model '{name}': {e}", field="model") from None
    model.build_kwargs = dict(kwargs)  # what a checkpoint needs to rebuild it (train.checkpoint.model_meta)
    return model
