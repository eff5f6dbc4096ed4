"""Training strategies: how a model's parameters are learned from a split. Any registered model.

* ``plain``      supervised training, Adam, batches of rows.
* ``two_phase``  RML (MM'22, sec. 3.3, eq. 9-10): each batch of B rows (= B tasks, one session
                 each) is cut at l_pos = B // 3; the first B - l_pos rows make a *local* step on
                 the ``meta`` group only (learning rate eta_1), then the last l_pos rows make a
                 *global* step on all parameters (eta_2). Two Adam optimizers (as in the authors'
                 code), learning rates decayed by ``decay`` per epoch, gradients clipped to a
                 global norm.
* ``maml``       MAML (Finn et al. 2017), second or first order, on user tasks
                 (``UserTaskSampler``); inner SGD on the groups ``adapt_groups``; Adam outside.
* ``metasgd``    Meta-SGD (Li et al. 2017): MAML with learned per-parameter inner rates.
* ``reptile``    Reptile (Nichol et al. 2018): move towards the mean of the task-adapted weights.

MAML-family strategies run on ``metactr.engine.functional`` (vmap over the tasks of a meta-batch).
``train`` returns a ``TrainResult`` whose ``optimizer`` (the global/outer Adam, its state and
decayed learning rate kept) is what the protocol's fine-tuning continues with, as the authors'
code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field as PField
from torch import Tensor

from metactr.config import StrictModel
from metactr.data.prepared import PreparedDataset
from metactr.data.tasks import UserTaskSampler
from metactr.errors import ConfigError
from metactr.engine.functional import MetaSGDRates, inner_adapt, live_params, maml_outer_loss
from metactr.models.base import CTRModel, objective

STRATEGIES = ("plain", "two_phase", "maml", "metasgd", "reptile", "meta_embedding", "melu", "mamo")


class StrategyConfig(StrictModel):
    name: Literal["plain", "two_phase", "maml", "metasgd", "reptile", "meta_embedding", "melu", "mamo"] = "two_phase"
    epochs: float = PField(10.0, gt=0)  # fractions allowed (quick runs)
    batch_size: int = PField(128, gt=1)
    lr: float = PField(0.01, gt=0)  # eta_2 (global / outer)
    local_lr: float = PField(0.01, gt=0)  # eta_1 (two_phase local step)
    decay: float = PField(0.7, gt=0, le=1)  # learning-rate factor per epoch
    min_lr: float = PField(1e-5, ge=0)
    clip_norm: float | None = PField(5.0, gt=0)
    l_pos_frac: float = PField(1 / 3, gt=0, lt=1)
    local_groups: list[str] = ["meta"]
    # MAML family
    adapt_groups: list[str] | None = None  # None: every group
    inner_lr: float = PField(0.01, gt=0)
    inner_steps: int = PField(1, ge=1)
    first_order: bool = False
    tasks_per_batch: int = PField(32, gt=0)
    support_size: int = PField(20, gt=0)
    query_size: int = PField(10, gt=0)
    query_frac: float = PField(0.5, gt=0, lt=1)
    vectorize: bool = True
    metasgd_init: float = PField(0.01, gt=0)


@dataclass
class TrainResult:
    optimizer: torch.optim.Optimizer  # continues into fine-tuning
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


Logger = Callable[[dict], None]


def _clip(grads: list[Tensor], max_norm: float | None) -> list[Tensor]:
    if max_norm is None:
        return grads
    total = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    return [g * scale for g in grads] if scale < 1.0 else grads


def apply_step(opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, clip_norm: float | None) -> None:
    """Gradients of ``loss`` w.r.t. ``params`` only (others' .grad untouched), clipped, one step."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    for p, g in zip(params, _clip(grads, clip_norm), strict=True):
        p.grad = g
    opt.step()
    for p in params:
        p.grad = None


class LRSchedule:
    """lr0 * decay ** (steps / steps_per_epoch), floored at ``min_lr`` (the authors'
    ``tf.train.exponential_decay`` without staircase)."""

    def __init__(self, opts: list[tuple[torch.optim.Optimizer, float]], decay: float, steps_per_epoch: int,
                 min_lr: float) -> None:
        self.opts, self.decay, self.spe, self.min_lr = opts, decay, max(steps_per_epoch, 1), min_lr
        self.step_count = 0
        self._set()

    def _set(self) -> None:
        f = self.decay ** (self.step_count / self.spe)
        for opt, lr0 in self.opts:
            for g in opt.param_groups:
                g["lr"] = max(lr0 * f, self.min_lr)

    def step(self) -> None:
        self.step_count += 1
        self._set()


def _n_steps(epochs: float, per_epoch: int) -> int:
    return max(1, int(math.ceil(epochs * per_epoch)))


def _row_batches(dataset: PreparedDataset, split: str, cfg: StrategyConfig, gen: torch.Generator, n_steps: int):
    done = 0
    while done < n_steps:
        for batch in dataset.iter_batches(split, cfg.batch_size, shuffle=True, generator=gen):
            yield batch
            done += 1
            if done >= n_steps:
                return


def group_names(model: CTRModel, groups: list[str] | None) -> list[str]:
    names = [n for n, _ in model.named_parameters()] if groups is None else model.params_in(*groups)
    if not names:
        raise ConfigError(f"model '{model.name}' has no parameters in group(s) {groups}", field="strategy")
    return names


# --------------------------------------------------------------------------- plain / two-phase
def train_plain(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
                gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_epoch = -(-len(dataset.split(split)) // cfg.batch_size)
    sched = LRSchedule([(opt, cfg.lr)], cfg.decay, per_epoch, cfg.min_lr)
    model.train()
    total, hist = 0.0, []
    for step, batch in enumerate(_row_batches(dataset, split, cfg, gen, _n_steps(cfg.epochs, per_epoch)), 1):
        loss, _ = objective(model, None, batch)
        apply_step(opt, params, loss, cfg.clip_norm)
        sched.step()
        total += float(loss.detach())
        if step % per_epoch == 0 and log:
            hist.append({"step": step, "loss": total / per_epoch})
            log(hist[-1])
            total = 0.0
    return TrainResult(opt, hist)


def train_two_phase(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
                    gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    local_names = set(group_names(model, cfg.local_groups))
    named = live_params(model)
    local_params = [p for n, p in named.items() if n in local_names]
    all_params = list(named.values())
    local_opt = torch.optim.Adam(local_params, lr=cfg.local_lr)
    global_opt = torch.optim.Adam(all_params, lr=cfg.lr)
    per_epoch = -(-len(dataset.split(split)) // cfg.batch_size)
    sched = LRSchedule([(local_opt, cfg.local_lr), (global_opt, cfg.lr)], cfg.decay, per_epoch, cfg.min_lr)
    model.train()
    total, hist = 0.0, []
    for step, batch in enumerate(_row_batches(dataset, split, cfg, gen, _n_steps(cfg.epochs, per_epoch)), 1):
        two = two_phase_step(model, batch, local_opt, local_params, global_opt, all_params, cfg)
        sched.step()
        total += two
        if step % per_epoch == 0 and log:
            hist.append({"step": step, "loss": total / per_epoch})
            log(hist[-1])
            total = 0.0
    return TrainResult(global_opt, hist, {"local_optimizer": local_opt})


def split_point(batch_size: int, l_pos_frac: float) -> int:
    """Number of query (global-step) tasks l_pos of a batch: ``batch_size * l_pos_frac``
    rounded down, at least 1 and leaving at least 1 support task (batches of 1 go global)."""
    return max(1, min(int(batch_size * l_pos_frac), batch_size - 1)) if batch_size > 1 else 1


def two_phase_step(model: CTRModel, batch, local_opt, local_params, global_opt, all_params,
                   cfg: StrategyConfig) -> float:
    """Eq. 9 (local step, ``meta`` only, first B - l_pos tasks) then eq. 10 (global, last l_pos)."""
    B = batch.size
    pos = split_point(B, cfg.l_pos_frac)
    loss_sum = 0.0
    if B - pos > 0 and B > 1:
        loss, _ = objective(model, None, batch.select(slice(0, B - pos)))
        apply_step(local_opt, local_params, loss, cfg.clip_norm)
        loss_sum += float(loss.detach())
    loss, _ = objective(model, None, batch.select(slice(B - pos, B)))
    apply_step(global_opt, all_params, loss, cfg.clip_norm)
    return loss_sum + float(loss.detach())


# --------------------------------------------------------------------------- MAML family
def _task_batches(dataset: PreparedDataset, split: str, cfg: StrategyConfig, gen: torch.Generator):
    sampler = UserTaskSampler(dataset, split, tasks_per_batch=cfg.tasks_per_batch, support_size=cfg.support_size,
                              query_size=cfg.query_size, query_frac=cfg.query_frac)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    n_steps = _n_steps(cfg.epochs, len(sampler))
    done = 0
    while done < n_steps:
        for tb in sampler.iterate(rng):
            yield tb
            done += 1
            if done >= n_steps:
                return
    return


def train_maml(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
               gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    names = group_names(model, cfg.adapt_groups)
    params = list(model.parameters())
    rates = None
    lr: float | dict = cfg.inner_lr
    if cfg.name == "metasgd":
        rates = MetaSGDRates(live_params(model), names, init=cfg.metasgd_init)
        params = params + list(rates.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_epoch = len(UserTaskSampler(dataset, split, tasks_per_batch=cfg.tasks_per_batch,
                                    support_size=cfg.support_size, query_size=cfg.query_size))
    sched = LRSchedule([(opt, cfg.lr)], cfg.decay, per_epoch, cfg.min_lr)
    model.train()
    hist = []
    for step, tb in enumerate(_task_batches(dataset, split, cfg, gen), 1):
        if rates is not None:
            lr = rates.as_dict()
        loss = maml_outer_loss(model, live_params(model), tb.support, tb.query, names=names, lr=lr,
                               steps=cfg.inner_steps, first_order=cfg.first_order,
                               support_weight=tb.support_weight, query_weight=tb.query_weight,
                               vectorize=cfg.vectorize)
        apply_step(opt, params, loss, cfg.clip_norm)
        sched.step()
        if step % per_epoch == 0 and log:
            hist.append({"step": step, "loss": float(loss)})
            log(hist[-1])
    return TrainResult(opt, hist, {"names": names, "rates": rates})


def train_reptile(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
                  gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    """Reptile: each task adapts on its support+query rows (``inner_steps`` SGD steps, no graph);
    the pseudo-gradient ``theta - mean_t(theta_t)`` goes to Adam (lr = outer rate)."""
    names = group_names(model, cfg.adapt_groups)
    named = live_params(model)
    params = list(named.values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    per_epoch = len(UserTaskSampler(dataset, split, tasks_per_batch=cfg.tasks_per_batch,
                                    support_size=cfg.support_size, query_size=cfg.query_size))
    sched = LRSchedule([(opt, cfg.lr)], cfg.decay, per_epoch, cfg.min_lr)
    model.train()
    from torch.func import vmap

    for tb in _task_batches(dataset, split, cfg, gen):
        both = type(tb.support)(*(torch.cat([s, q], dim=1) for s, q in zip(tb.support, tb.query, strict=True)))
        w = torch.cat([tb.support_weight, tb.query_weight], dim=1)
        base = {n: p.detach() for n, p in named.items()}

        def adapt(b, wt):
            out = inner_adapt(model, base, b, names=names, lr=cfg.inner_lr, steps=cfg.inner_steps,
                              first_order=True, weight=wt)
            return {n: out[n] for n in names}

        adapted = vmap(adapt, randomness="different")(both, w) if cfg.vectorize else \
            {n: torch.stack(v) for n, v in zip(names, zip(*[adapt(both.select(t), w[t]).values()
                                                               for t in range(w.shape[0])]), strict=True)}
        for n, p in named.items():
            p.grad = (p.detach() - adapted[n].mean(0)) if n in adapted else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return TrainResult(opt, [])


_TRAINERS = {"plain": train_plain, "two_phase": train_two_phase, "maml": train_maml,
             "metasgd": train_maml, "reptile": train_reptile}


def train(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig, *,
          seed: int = 0, log: Logger | None = None) -> TrainResult:
    """Train ``model`` on ``split`` with the strategy ``cfg.name``; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.name in _TRAINERS:
        fn = _TRAINERS[cfg.name]
    else:  # the cold-start baselines' own procedures (imported lazily: that module imports this one)
        from metactr.strategies.cold_start import TRAINERS

        fn = TRAINERS[cfg.name]
    return fn(model, dataset, split, cfg, gen, log)
