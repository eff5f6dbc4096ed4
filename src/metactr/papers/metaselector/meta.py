"""MetaSelector's base-model pre-training and episodic meta-training (Algorithm 1 + Meta-SGD), in the Trainer."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metactr.data.batch import Batch
from metactr.data.prepared import PreparedDataset, Split
from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS
from metactr.data.tasks import UserIndex, task_batch
from metactr.engine.optim import build_optimizer
from metactr.train.config import OptimConfig
from metactr.errors import ConfigError, DataError
from metactr.engine.functional import MetaSGDRates, inner_adapt, live_params, maml_outer_loss
from metactr.models.metaselector import MetaSelector
from metactr.models.base import CTRModel, build_model
from metactr.strategies.base import Phase, Strategy
from metactr.strategies.plain import FineTune
from metactr.train.trainer import Trainer

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


from metactr.papers.metaselector.config import BaseModelConfig, MetaTrainConfig, SelectorExperiment
from metactr.papers.metaselector.data import SelectorData

# --------------------------------------------------------------------------- base models
def build_base_models(cfg: SelectorExperiment, ds: PreparedDataset,
                      device: torch.device | None = None) -> list[CTRModel]:
    return [build_model(b.name, ds.spec, **b.hp).to(device or "cpu") for b in cfg.base_models]


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: batches are built on the CPU and moved there."""
    return next(model.parameters()).device


def base_epochs(cfg: SelectorExperiment, b: BaseModelConfig) -> int:
    """Pre-training epochs of base model ``b``: its own, else the experiment's."""
    return cfg.pretrain.epochs if b.epochs is None else b.epochs


def base_optimizer(model: nn.Module, b: BaseModelConfig) -> torch.optim.Optimizer:
    """Base model ``b``'s pre-training optimizer (the engine's factory, unfused as it always was)."""
    eps = 1e-10 if b.optimizer == "adagrad" else 1e-8  # torch's defaults, as before the factories were one
    cfg = OptimConfig(name=b.optimizer, lr=b.lr, beta=b.beta, l1=b.l1, l2=b.l2, eps=eps)
    return build_optimizer(model.parameters(), cfg, fused=False)


def pretrain(model: CTRModel, b: BaseModelConfig, ds: PreparedDataset, split: Split, *, epochs: int,
             batch_size: int, generator: torch.Generator) -> list[float]:
    """Mini-batch training of one base model on the pooled rows of ``split`` (sec. 5.3), in the
    Trainer with the base model's own optimizer (no clipping, no schedule, no files). Returns the
    mean training loss of each epoch."""
    history: list[float] = []
    if epochs > 0:
        fitted = Trainer(device=_device(model)).fit(model, ds, split, FineTune(base_optimizer(model, b), None),
                                                    epochs=epochs, batch_size=batch_size, generator=generator)
        history = [r["train_loss"] for r in fitted.history]
    model.eval()
    return history


# --------------------------------------------------------------------------- the meta engine
def adapt(model: CTRModel, params: Mapping[str, Tensor], rates: Mapping[str, Tensor],
          support: Batch, weight: Tensor, *, steps: int) -> dict[str, Tensor]:
    """``steps`` Meta-SGD steps (eq. 4) of the parameters named in ``rates`` on ONE task
    (the engine's ``inner_adapt``; vmaps over users)."""
    return inner_adapt(model, params, support, names=list(rates), lr=rates, steps=steps, weight=weight)


def meta_loss(model: CTRModel, params: Mapping[str, Tensor], rates: Mapping[str, Tensor],
              support: Batch, query: Batch, sw: Tensor, qw: Tensor, *, steps: int,
              first_order: bool, vectorize: bool) -> Tensor:
    """Mean over the T tasks of the query loss after adaptation on the support ([T, N] batches),
    differentiable (second order unless ``first_order``) in ``params`` and ``rates`` (eq. 6)."""
    return maml_outer_loss(model, params, support, query, names=list(rates), lr=rates, steps=steps,
                           first_order=first_order, support_weight=sw, query_weight=qw,
                           vectorize=vectorize)


# --------------------------------------------------------------------------- meta-training
class _Episodes(Phase):
    """``episodes`` steps: ``users_per_episode`` users, a support and a query sample of each."""

    name = "episode"
    train_mode = False  # no dropout in meta-training (see module docstring)

    def __init__(self, s: MetaSelectorStrategy) -> None:
        self.s = s
        self.log_every = max(1, s.cfg.episodes // 5)

    def steps_per_epoch(self) -> int:
        return self.s.cfg.episodes

    def stream(self):
        s, cfg, g = self.s, self.s.cfg, self.s.ctx.generator
        m = min(cfg.users_per_episode, len(s.users))
        for _ in range(cfg.episodes):
            pick = s.users[torch.randperm(len(s.users), generator=g)[:m]]
            s_rows, sw = s.sup_idx.sample(s.sup_idx.lookup(pick), cfg.max_support, g)
            q_rows, qw = s.qry_idx.sample(s.qry_idx.lookup(pick), cfg.max_query, g)
            yield (task_batch(s.data.ds, s.data.support, s_rows), task_batch(s.data.ds, s.data.query, q_rows), sw, qw)

    def rows(self, item) -> int:
        return int(item[2].sum() + item[3].sum())

    def step(self, item) -> Tensor:
        s, cfg = self.s, self.s.cfg
        support, query, sw, qw = item
        loss = meta_loss(s.ctx.model, s.live, s.rates.as_dict(), support, query, sw, qw, steps=cfg.inner_steps,
                         first_order=cfg.first_order, vectorize=cfg.vectorize)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        with torch.no_grad():  # a negative inner rate would turn adaptation into ascent
            for r in s.rates.rates:
                r.clamp_(min=0.0)
        s.losses.append(float(loss.detach()))
        return loss.detach()


class MetaSelectorStrategy(Strategy):
    """Algorithm 1 (with Meta-SGD, eq. 5) on the training users of ``data``: the inner step adapts
    ``adapt_groups``, the outer step updates ``outer_groups`` and (if learned) the inner rates."""

    def __init__(self, cfg: MetaTrainConfig, data: SelectorData, adapt_groups: Sequence[str],
                 outer_groups: Sequence[str]) -> None:
        super().__init__(cfg)
        self.data, self.adapt_groups, self.outer_groups = data, adapt_groups, outer_groups

    def setup(self, ctx) -> list[Phase]:
        self.ctx, cfg, model = ctx, self.cfg, ctx.model
        self.names = model.params_in(*self.adapt_groups)
        outer_names = model.params_in(*self.outer_groups)
        self.live = live_params(model)
        for n, p in self.live.items():
            p.requires_grad_(n in outer_names)
        self.rates = MetaSGDRates(self.live, self.names, cfg.inner_lr)
        if cfg.inner_lr_by_model:
            start = fine_tune_rates(self.rates.as_dict(), cfg.inner_lr_by_model, model.base_names,
                                    field="meta.inner_lr_by_model")
            with torch.no_grad():
                for n, r in zip(self.rates.names, self.rates.rates, strict=True):
                    r.copy_(start[n])
        self.rates.requires_grad_(cfg.learn_inner_lr)
        outer_lr = cfg.outer_lr if cfg.outer_lr is not None else cfg.inner_lr / 10.0
        opt_params = [self.live[n] for n in outer_names] + ([*self.rates.parameters()] if cfg.learn_inner_lr else [])
        # fused: one kernel over each tensor instead of ~10 ops (the step touches every full table and
        # its same-shaped Meta-SGD rates; docs/metaselector.md has the timing)
        self.opt = torch.optim.Adam(opt_params, lr=outer_lr, fused=True)
        self.sup_idx, self.qry_idx = UserIndex.build(self.data.support), UserIndex.build(self.data.query)
        # a task needs both a support and a query row
        self.users = self.sup_idx.users[self.qry_idx.lookup(self.sup_idx.users) >= 0]
        if len(self.users) == 0:
            raise DataError("no user has both support and query rows", path=self.data.ds.root)
        self.losses: list[float] = []
        return [_Episodes(self)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"outer": self.opt} if self.ctx else {}

    def extra_tensors(self) -> dict[str, Tensor]:
        return {f"rates.{k}": v for k, v in self.rates.state_dict(keep_vars=True).items()} if self.ctx else {}

    def finish(self) -> dict[str, Any]:
        for p in self.live.values():
            p.requires_grad_(True)
        return {}


@dataclass
class MetaResult:
    model: MetaSelector
    rates: MetaSGDRates
    adapt_names: list[str]
    losses: list[float]
    seconds: float


def meta_train(model: MetaSelector, data: SelectorData, cfg: MetaTrainConfig, *, adapt_groups: Sequence[str],
               outer_groups: Sequence[str], generator: torch.Generator,
               log: Callable[[str], None] | None = None) -> MetaResult:
    """Meta-train ``model`` in the Trainer (``MetaSelectorStrategy``; ``episodes`` steps, one epoch)."""
    t0 = time.perf_counter()
    strategy = MetaSelectorStrategy(cfg, data, adapt_groups, outer_groups)
    Trainer(device=_device(model), log=log).fit(model, data.ds, data.support, strategy, epochs=1, batch_size=1,
                                                generator=generator)
    return MetaResult(model, strategy.rates, strategy.names, strategy.losses, time.perf_counter() - t0)


def fine_tune_rates(rates: Mapping[str, Tensor], test_lr: float | Mapping[str, float] | None,
                    base_names: Sequence[str], *, field: str = "meta.test_lr") -> dict[str, Tensor]:
    """The rates of the meta-test adaptation: the learned Meta-SGD ``rates`` (keyed by parameter,
    ``base.<k>.*`` / ``selector.*``) with ``meta.test_lr`` put in place for the parameters of
    the base models (by name) or the selector it names; a single number replaces every rate."""
    if test_lr is None:
        return dict(rates)
    if isinstance(test_lr, Mapping):
        unknown = sorted(set(test_lr) - set(base_names) - {"selector"})
        if unknown:
            raise ConfigError(f"unknown name(s) {unknown} in {field}; expected base model names "
                              f"{list(base_names)} or 'selector'", field=field)
    out = {}
    for name, rate in rates.items():
        owner = "selector" if name.startswith("selector.") else base_names[int(name.split(".")[1])]
        lr = test_lr.get(owner) if isinstance(test_lr, Mapping) else test_lr
        out[name] = rate if lr is None else torch.full_like(rate, float(lr))
    return out
