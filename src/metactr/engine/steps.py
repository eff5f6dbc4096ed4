"""One optimisation step and the learning-rate schedules the strategies share (paper-free).

``apply_step`` is how every meta strategy updates a *subset* of parameters: gradients of the
loss w.r.t. those parameters only (``backward(inputs=...)``: the other parameters' ``.grad`` stay
untouched), summed across ranks under torchrun, clipped to a global L2 norm with torch's
``clip_grad_norm_``, one optimizer step. Measured on ``metactr reproduce rml --quick``: the same
numbers as the earlier hand-written clip on ``autograd.grad`` gradients (docs/architecture.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metactr.engine.distributed import DistInfo, all_reduce_mean_grads


def apply_step(opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, clip_norm: float | None,
               dist: DistInfo | None = None) -> None:
    """``loss.backward()`` into ``params`` only, all-reduced, clipped, one ``opt`` step, grads cleared."""
    for p in params:
        p.grad = None
    loss.backward(inputs=params)
    step_with_grads(opt, params, clip_norm, dist)


def step_with_grads(opt: torch.optim.Optimizer, params: list[Tensor], clip_norm: float | None,
                    dist: DistInfo | None = None) -> None:
    """The rest of ``apply_step`` for gradients already in ``.grad`` (Reptile's pseudo-gradient)."""
    if dist is not None:
        all_reduce_mean_grads(params, dist)
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_norm)
    opt.step()
    for p in params:
        p.grad = None


def continuous_decay(opt: torch.optim.Optimizer, decay: float, steps_per_epoch: int,
                     min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr0 * decay ** (step / steps_per_epoch)``, floored at ``min_lr``, stepped once per step (the
    RML authors' ``tf.train.exponential_decay`` without staircase).

    torch's ``ExponentialLR`` would multiply the rate by ``decay ** (1 / steps_per_epoch)`` at every
    step: the repeated product drifts from the closed form in the last bits and has no floor, so
    the closed form is kept (as a ``LambdaLR``, whose state checkpoints like any scheduler).
    """
    spe = max(steps_per_epoch, 1)
    lr0 = [g["lr"] for g in opt.param_groups]

    def factor_fn(base: float):
        return lambda k: max(decay ** (k / spe), min_lr / base)

    return torch.optim.lr_scheduler.LambdaLR(opt, [factor_fn(b) for b in lr0])


def n_steps(epochs: float, per_epoch: int) -> int:
    """Steps of a run of ``epochs`` (fractions allowed) of ``per_epoch`` steps: at least one."""
    return max(1, int(math.ceil(epochs * per_epoch)))
