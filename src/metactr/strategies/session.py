"""``session_maml``: session-level fast adaptation (ours, beside the papers' faithful methods).

RML's paper calls each session a task, but its two-phase schedule (and the authors' code) has
no inner loop: no fast weights, no reset per task, no gradient through an adaptation. Here a task
*is* a session: its support set is the session's own labelled history (``data.tasks.session_tasks``:
row j predicts the session's item j from the items before it), its query the target. The inner
loop takes ``inner_steps`` SGD steps on ``adapt_groups`` (learned per-parameter rates with
``metasgd``), second order unless ``first_order``; the outer Adam step learns the initialisation
(and the rates) from the query loss, all sessions of a batch at once (``vmap``). At FT and test
every session is adapted on its own history before its target is scored: ``test_adaptation``
tells the protocol how (``papers.rml.protocol``).
"""

from __future__ import annotations

from typing import Any

import torch

from metactr.data.tasks import session_tasks
from metactr.engine.functional import MetaSGDRates, live_params, maml_outer_loss
from metactr.engine.steps import apply_step, continuous_decay
from metactr.strategies.base import Context, Phase, Strategy, group_names, register_strategy, sharded


class _SessionPhase(Phase):
    def __init__(self, s: SessionMAML) -> None:
        self.s = s

    def steps_per_epoch(self) -> int:
        return self.s.ctx.row_steps

    def stream(self):
        return self.s.ctx.row_batches()

    def rows(self, batch) -> int:
        return batch.size

    def step(self, batch) -> torch.Tensor:
        s, cfg = self.s, self.s.cfg
        idx, weight = sharded(batch.size, s.ctx.dist)
        if idx is not None:
            batch = batch.select(idx)
        support, sw, query, qw = session_tasks(batch, cfg.history_size)
        loss = maml_outer_loss(s.ctx.model, live_params(s.ctx.model), support, query, names=s.names, lr=s.inner_lr(),
                               steps=cfg.inner_steps, first_order=cfg.first_order, support_weight=sw.to(batch.label.device),
                               query_weight=qw.to(batch.label.device))
        if weight != 1.0:
            loss = loss * weight
        apply_step(s.opt, s.params, loss, cfg.clip_norm, s.ctx.dist)
        s.sched.step()
        return loss.detach()

    def lr(self) -> float:
        return self.s.opt.param_groups[0]["lr"]


@register_strategy
class SessionMAML(Strategy):
    names = ("session_maml",)

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx, cfg = ctx, self.cfg
        self.names = group_names(ctx.model, cfg.adapt_groups if cfg.adapt_groups is not None else ["meta"])
        self.params = list(ctx.model.parameters())
        self.rates: MetaSGDRates | None = None
        if cfg.metasgd:
            self.rates = MetaSGDRates(live_params(ctx.model), self.names, init=cfg.inner_lr)
            self.params += list(self.rates.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.sched = continuous_decay(self.opt, cfg.decay, ctx.row_steps, cfg.min_lr)
        return [_SessionPhase(self)]

    def inner_lr(self):
        return self.rates.as_dict() if self.rates is not None else self.cfg.inner_lr

    def test_adaptation(self) -> dict[str, Any]:
        """How to adapt each session at FT/test: parameter names, rate(s), steps, history size."""
        steps = self.cfg.test_steps if self.cfg.test_steps is not None else self.cfg.inner_steps
        lr = self.cfg.test_lr if self.cfg.test_lr is not None else self.inner_lr()
        if isinstance(lr, dict):
            lr = {k: v.detach().clamp_min(0.0) for k, v in lr.items()}
        return {"names": self.names, "lr": lr, "steps": steps, "history_size": self.cfg.history_size}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"outer": self.opt} if self.ctx else {}

    def schedulers(self) -> dict[str, Any]:
        return {"outer": self.sched} if self.ctx else {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"rates.{k}": v for k, v in self.rates.state_dict(keep_vars=True).items()} if self.rates else {}
