"""The MAML family on user tasks (``data.tasks.UserTaskSampler``), on the torch.func engine.

* ``maml``     MAML (Finn et al. 2017), second order; ``fomaml`` first order; inner SGD on the
               groups ``adapt_groups``; Adam outside.
* ``metasgd``  Meta-SGD (Li et al. 2017): MAML with learned per-parameter inner rates.
* ``reptile``  Reptile (Nichol et al. 2018): move towards the mean of the task-adapted weights.

Tasks are vectorized with ``vmap`` (``engine.functional``). Under torchrun every rank builds the
same meta-batch and takes its share of the tasks; gradients are summed across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import vmap

from metactr.data.tasks import UserTaskSampler
from metactr.engine.functional import MetaSGDRates, inner_adapt, live_params, maml_outer_loss
from metactr.engine.steps import apply_step, continuous_decay, step_with_grads
from metactr.strategies.base import Context, Phase, Strategy, group_names, register_strategy, sharded


class _TaskPhase(Phase):
    def __init__(self, s: _TaskStrategy) -> None:
        self.s = s

    def steps_per_epoch(self) -> int:
        return len(self.s.sampler)

    def stream(self):
        return self.s.sampler.iterate(self.s.rng)

    def rows(self, tb) -> int:
        return int(tb.query_weight.sum() + tb.support_weight.sum())

    def step(self, tb) -> torch.Tensor:
        loss = self.s.task_step(tb)
        self.s.sched.step()
        return loss

    def lr(self) -> float:
        return self.s.opt.param_groups[0]["lr"]


class _TaskStrategy(Strategy):
    default_groups: list[str] | None = None

    @property
    def adapt_groups(self) -> list[str] | None:
        """The groups the inner loop adapts (None: every parameter)."""
        return self.cfg.adapt_groups if self.cfg.adapt_groups is not None else self.default_groups

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx = ctx
        cfg = self.cfg
        self.names = group_names(ctx.model, self.adapt_groups)
        self.sampler = UserTaskSampler(ctx.dataset, ctx.split.name, tasks_per_batch=cfg.tasks_per_batch,
                                       support_size=cfg.support_size, query_size=cfg.query_size,
                                       query_frac=cfg.query_frac, order=cfg.task_order)
        self.named = live_params(ctx.model)
        self.params = list(ctx.model.parameters())
        self.rates: MetaSGDRates | None = None
        self._extra_setup()
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.sched = continuous_decay(self.opt, cfg.decay, len(self.sampler), cfg.min_lr)
        self.rng = ctx.numpy_rng()
        return [_TaskPhase(self)]

    def _extra_setup(self) -> None:
        pass

    def _tasks(self, tb):
        idx, weight = sharded(tb.support_weight.shape[0], self.ctx.dist)
        if idx is None:
            return tb, 1.0
        return type(tb)(tb.support.select(idx), tb.support_weight[idx], tb.query.select(idx),
                        tb.query_weight[idx], tb.users[idx]), weight

    def test_user_adaptation(self) -> dict[str, Any] | None:
        """With ``test_adapt``: how the protocol adapts each user at FT/test (names, rate(s), steps,
        support size; ``eval.adapted.user_adapted_proba``); None otherwise."""
        if not self.cfg.test_adapt:
            return None
        lr = self.rates.as_dict() if self.rates is not None else self.cfg.inner_lr
        if isinstance(lr, dict):
            lr = {k: v.detach().clamp_min(0.0) for k, v in lr.items()}
        return {"names": self.names, "lr": lr, "steps": self.cfg.inner_steps, "support_size": self.cfg.support_size}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"outer": self.opt} if self.ctx else {}

    def schedulers(self) -> dict[str, Any]:
        return {"outer": self.sched} if self.ctx else {}

    def extra_state(self) -> dict[str, Any]:
        return {"task_rng": self.rng.bit_generator.state} if self.ctx else {}

    def load_extra(self, tensors, state) -> None:
        super().load_extra(tensors, state)
        if "task_rng" in state:
            self.rng.bit_generator.state = state["task_rng"]


@register_strategy
class MAML(_TaskStrategy):
    names = ("maml", "fomaml", "metasgd")

    def _extra_setup(self) -> None:
        if self.cfg.name == "metasgd":
            self.rates = MetaSGDRates(self.named, self.names, init=self.cfg.metasgd_init)
            self.params = self.params + list(self.rates.parameters())

    def task_step(self, tb) -> torch.Tensor:
        cfg = self.cfg
        tb, weight = self._tasks(tb)
        lr = self.rates.as_dict() if self.rates is not None else cfg.inner_lr
        loss = maml_outer_loss(self.ctx.model, live_params(self.ctx.model), tb.support, tb.query, names=self.names,
                               lr=lr, steps=cfg.inner_steps, first_order=cfg.first_order or cfg.name == "fomaml",
                               support_weight=tb.support_weight, query_weight=tb.query_weight,
                               vectorize=cfg.vectorize)
        if weight != 1.0:
            loss = loss * weight
        apply_step(self.opt, self.params, loss, cfg.clip_norm, self.ctx.dist)
        return loss.detach()

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"rates.{k}": v for k, v in self.rates.state_dict(keep_vars=True).items()} if self.rates else {}

@register_strategy
class Reptile(_TaskStrategy):
    """Each task adapts on its support+query rows (``inner_steps`` SGD steps, no graph); the
    pseudo-gradient ``theta - mean_t(theta_t)`` goes to Adam (lr = outer rate)."""

    names = ("reptile",)

    def task_step(self, tb) -> torch.Tensor:
        cfg, model = self.cfg, self.ctx.model
        tb, weight = self._tasks(tb)
        both = type(tb.support)(*(torch.cat([s, q], dim=1) for s, q in zip(tb.support, tb.query, strict=True)))
        w = torch.cat([tb.support_weight, tb.query_weight], dim=1)
        base = {n: p.detach() for n, p in self.named.items()}
        names = self.names

        def adapt(b, wt):
            out = inner_adapt(model, base, b, names=names, lr=cfg.inner_lr, steps=cfg.inner_steps,
                              first_order=True, weight=wt)
            return {n: out[n] for n in names}

        adapted = vmap(adapt, randomness="different")(both, w) if cfg.vectorize else \
            {n: torch.stack(v) for n, v in zip(names, zip(*[adapt(both.select(t), w[t]).values()
                                                               for t in range(w.shape[0])]), strict=True)}
        for n, p in self.named.items():
            p.grad = ((p.detach() - adapted[n].mean(0)) * weight) if n in adapted else None
        # Reptile's original update has no clipping: the pseudo-gradient goes to Adam as it is
        step_with_grads(self.opt, list(self.named.values()), None, self.ctx.dist)
        return torch.tensor(float("nan"))  # no loss is computed (the Trainer records null)
