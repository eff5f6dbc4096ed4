"""``plain``: supervised training on batches of rows, the simplest strategy.

One optimizer over every parameter (Adam, Adagrad, SGD or FTRL: ``engine.optim``), one
learning-rate schedule: per epoch (``lr * lr_decay ** epoch``, torch's ``ExponentialLR``, as
``metactr train`` configs say) or continuous per step with a floor (``decay`` / ``min_lr``, the
RML authors' schedule, used by the paper protocols), gradient clipping with ``clip_grad_norm_``.
Under torchrun each rank takes a disjoint share of every global batch and the loss module is
wrapped in ``DistributedDataParallel``; the loss of a share is scaled by ``b_rank * world / B`` so
that DDP's gradient *average* equals the gradient of the mean loss over the whole global batch.
``FineTune`` continues an existing optimizer (the RML protocol's FT-A/B/C stages).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metactr.engine.optim import build_optimizer
from metactr.engine.precision import autocast
from metactr.engine.steps import continuous_decay
from metactr.models.base import CTRModel, objective
from metactr.strategies.base import Context, Phase, Strategy, register_strategy


class LossModule(nn.Module):
    """``objective`` as a module, so that DDP's forward (which arms its gradient hooks) runs it."""

    def __init__(self, model: CTRModel, precision: str = "fp32") -> None:
        super().__init__()
        self.model = model
        self.precision = precision

    def forward(self, batch, scale: float):
        with autocast(batch.label.device, self.precision):
            loss, _ = objective(self.model, None, batch)
        loss = loss.float()  # a bf16 model's logit may make the loss bf16: sum and scale it in fp32
        return (loss * scale if scale != 1.0 else loss), loss.detach()


def has_unused_parameters(model: CTRModel, batch) -> bool:
    """Whether some parameter gets no gradient (DDP must then look for them every step).

    Probed once in eval mode, so that dropout consumes no random numbers."""
    was = model.training
    model.eval()
    try:
        loss, _ = objective(model, None, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return any(g is None for g in grads)
    finally:
        model.train(was)


def global_batch_sizes(n: int, batch_size: int, world_size: int, drop_last: bool = False) -> list[int]:
    stop = n - (n % batch_size) if drop_last else n
    sizes = [min(batch_size, stop - s) for s in range(0, stop, batch_size)]
    if world_size > 1 and sizes and sizes[-1] < world_size:
        sizes.pop()  # a rank would get an empty batch: every rank drops that last short batch
    return sizes


class _RowPhase(Phase):
    """Row batches through ``LossModule`` (DDP-wrapped under torchrun), one optimizer step each."""

    sharded_rows = True

    def __init__(self, ctx: Context, optimizer: torch.optim.Optimizer, *, clip: float | None,
                 step_scheduler=None, epoch_scheduler=None) -> None:
        self.ctx, self.opt, self.clip = ctx, optimizer, clip
        self.step_scheduler, self.epoch_scheduler = step_scheduler, epoch_scheduler
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.loss_module = LossModule(ctx.model, ctx.precision)
        self.fn: nn.Module = self.loss_module
        if ctx.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            probe = ctx.dataset.batch(ctx.split, torch.arange(min(2, len(ctx.split)))).to(ctx.device)
            dev = ctx.device
            self.fn = DistributedDataParallel(self.loss_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              find_unused_parameters=has_unused_parameters(ctx.model, probe))
        self.sizes = global_batch_sizes(len(ctx.split), ctx.batch_size, ctx.dist.world_size, ctx.drop_last)

    def steps_per_epoch(self) -> int:
        return len(self.sizes)

    def stream(self):
        world = self.ctx.dist.world_size
        for batch, gb in zip(self.ctx.row_batches(share=True), self.sizes, strict=False):
            yield batch, (batch.size * world / gb if world > 1 else 1.0)

    def rows(self, item) -> int:
        return item[0].size

    def step(self, item) -> torch.Tensor:
        batch, scale = item
        loss, plain = self.fn(batch, scale)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        if self.step_scheduler is not None:
            self.step_scheduler.step()
        return plain

    def epoch_end(self) -> None:
        if self.epoch_scheduler is not None:
            self.epoch_scheduler.step()

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


@register_strategy
class Plain(Strategy):
    """``cfg``: ``PlainConfig`` (Adam at ``lr``, continuous ``decay``, ``clip_norm``), or for
    ``metactr train`` the optimizer config ``optim`` with a per-epoch ``lr_decay`` and ``grad_clip``."""

    names = ("plain",)

    def __init__(self, cfg: Any = None, *, optim: Any = None, lr_decay: float | None = None,
                 grad_clip: float | None = None) -> None:
        super().__init__(cfg)
        self.optim_cfg, self.lr_decay, self.grad_clip = optim, lr_decay, grad_clip
        self.opt: torch.optim.Optimizer | None = None
        self.sched = None

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx = ctx
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if self.optim_cfg is not None:  # metactr train: the config's optimizer, per-epoch decay
            self.opt = build_optimizer(params, self.optim_cfg)
            self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=self.lr_decay or 1.0)
            return [_RowPhase(ctx, self.opt, clip=self.grad_clip, epoch_scheduler=self.sched)]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        self.sched = continuous_decay(self.opt, self.cfg.decay, ctx.row_steps, self.cfg.min_lr)
        return [_RowPhase(ctx, self.opt, clip=self.cfg.clip_norm, step_scheduler=self.sched)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": self.opt} if self.opt is not None else {}

    def schedulers(self) -> dict[str, Any]:
        return {"main": self.sched} if self.sched is not None else {}


class FineTune(Strategy):
    """Every parameter, on an existing optimizer (state and learning rate kept), no schedule."""

    names = ()

    def __init__(self, optimizer: torch.optim.Optimizer, clip_norm: float | None) -> None:
        super().__init__(None)
        self.opt, self.clip = optimizer, clip_norm

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx = ctx
        return [_RowPhase(ctx, self.opt, clip=self.clip)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": self.opt}
