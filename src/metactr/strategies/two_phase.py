"""``two_phase``: RML (MM'22, sec. 3.3, eq. 9-10).

Each batch of B rows (= B tasks, one session each) is cut at l_pos = B // 3: the first B - l_pos
rows make a *local* step on the ``local_groups`` (``meta``) only (learning rate eta_1), then the
last l_pos rows make a *global* step on every parameter (eta_2). Two Adam optimizers (as in the
authors' code), learning rates decayed continuously by ``decay`` per epoch, gradients clipped to a
global norm. Under torchrun every rank sees the whole batch and takes its share of each part's
rows; the gradients are summed across ranks (``engine.steps.apply_step``).
"""

from __future__ import annotations

from typing import Any

import torch

from metactr.engine.functional import live_params
from metactr.engine.precision import autocast
from metactr.engine.steps import apply_step, continuous_decay
from metactr.models.base import objective
from metactr.strategies.base import Context, Phase, Strategy, group_names, register_strategy, sharded


def split_point(batch_size: int, l_pos_frac: float) -> int:
    """Number of query (global-step) tasks l_pos of a batch: ``batch_size * l_pos_frac``
    rounded down, at least 1 and leaving at least 1 support task (batches of 1 go global)."""
    return max(1, min(int(batch_size * l_pos_frac), batch_size - 1)) if batch_size > 1 else 1


class _TwoPhaseStep(Phase):
    def __init__(self, s: TwoPhase, ctx: Context) -> None:
        self.s, self.ctx = s, ctx

    def steps_per_epoch(self) -> int:
        return self.ctx.row_steps

    def stream(self):
        return self.ctx.row_batches()

    def _loss(self, batch) -> torch.Tensor:
        idx, weight = sharded(batch.size, self.ctx.dist)
        part = batch if idx is None else batch.select(idx)
        with autocast(batch.label.device, self.ctx.precision):
            loss, _ = objective(self.ctx.model, None, part)
        return loss.float() * weight if weight != 1.0 else loss.float()

    def step(self, batch) -> torch.Tensor:
        s, cfg, dist = self.s, self.s.cfg, self.ctx.dist
        B = batch.size
        pos = split_point(B, cfg.l_pos_frac)
        total = torch.zeros((), device=batch.label.device)
        if B - pos > 0 and B > 1:
            loss = self._loss(batch.select(slice(0, B - pos)))
            apply_step(s.local_opt, s.local_params, loss, cfg.clip_norm, dist)
            total = total + loss.detach()
        loss = self._loss(batch.select(slice(B - pos, B)))
        apply_step(s.global_opt, s.all_params, loss, cfg.clip_norm, dist)
        for sched in s.scheds:
            sched.step()
        return total + loss.detach()

    def rows(self, batch) -> int:
        return batch.size

    def lr(self) -> float:
        return self.s.global_opt.param_groups[0]["lr"]


@register_strategy
class TwoPhase(Strategy):
    names = ("two_phase",)

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx = ctx
        local_names = set(group_names(ctx.model, self.cfg.local_groups))
        named = live_params(ctx.model)
        self.local_params = [p for n, p in named.items() if n in local_names]
        self.all_params = list(named.values())
        self.local_opt = torch.optim.Adam(self.local_params, lr=self.cfg.local_lr)
        self.global_opt = torch.optim.Adam(self.all_params, lr=self.cfg.lr)
        spe = ctx.row_steps
        self.scheds = [continuous_decay(o, self.cfg.decay, spe, self.cfg.min_lr)
                       for o in (self.local_opt, self.global_opt)]
        return [_TwoPhaseStep(self, ctx)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"global": self.global_opt, "local": self.local_opt} if self.ctx else {}

    def schedulers(self) -> dict[str, Any]:
        return {"local": self.scheds[0], "global": self.scheds[1]} if self.ctx else {}
