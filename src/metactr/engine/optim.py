"""Optimizers: Adam, Adagrad, SGD from torch, and FTRL-Proximal written here.

FTRL-Proximal follows Algorithm 1 of McMahan et al., "Ad Click Prediction: a View from the
Trenches" (KDD 2013), per coordinate i with gradient g_i:

    sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha
    z_i    += g_i - sigma_i * w_i
    n_i    += g_i^2
    w_i     = 0                                                        if |z_i| <= lambda_1
            = -(z_i - sign(z_i) * lambda_1) / ((beta + sqrt(n_i)) / alpha + lambda_2)   otherwise

MetaSelector trains its LR base model with it. Deviation, on purpose: the paper starts from
w = 0 (z = 0); here z starts at the value for which the closed form reproduces the parameter's
initial value (``z0 = -(w0 * (beta/alpha + lambda_2) + sign(w0) * lambda_1)``), so that a randomly
initialised embedding is not zeroed on the first step. With a zero initialisation (LR, as in the
paper) this is exactly z0 = 0. Coordinates with a zero gradient keep their weight: z and n do
not move, and w is a function of (z, n) only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from metactr.errors import ConfigError


class FTRL(torch.optim.Optimizer):
    """Per-coordinate FTRL-Proximal (McMahan et al. 2013). ``lr`` is alpha."""

    def __init__(self, params: Iterable, lr: float = 0.05, beta: float = 1.0, l1: float = 0.0,
                 l2: float = 0.0) -> None:
        if lr <= 0 or beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError("FTRL needs lr > 0 and beta, l1, l2 >= 0")
        super().__init__(params, {"lr": lr, "beta": beta, "l1": l1, "l2": l2})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, beta, l1, l2 = group["lr"], group["beta"], group["l1"], group["l2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    g = g.to_dense()
                state = self.state[p]
                if not state:
                    state["n"] = torch.zeros_like(p)
                    state["z"] = -(p * (beta / alpha + l2) + torch.sign(p) * l1)
                n, z = state["n"], state["z"]
                n_new = n + g * g
                sigma = (n_new.sqrt() - n.sqrt()) / alpha
                z.add_(g - sigma * p)
                n.copy_(n_new)
                p.copy_(_ftrl_weight(z, n, alpha, beta, l1, l2))
        return loss


def _ftrl_weight(z: Tensor, n: Tensor, alpha: float, beta: float, l1: float, l2: float) -> Tensor:
    shrunk = z - torch.sign(z) * l1
    w = -shrunk / ((beta + n.sqrt()) / alpha + l2)
    return torch.where(z.abs() <= l1, torch.zeros_like(w), w)


def build_optimizer(params: Iterable, cfg, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (a ``train.config.OptimConfig`` or anything with its fields)
    over ``params``. ``fused=None``: torch's fused kernels where they apply (they update every
    tensor in one pass; docs/training.md has the timing); ``False`` keeps the per-tensor loop,
    whose rounding MetaSelector's published runs were made with."""
    params = list(params)
    can_fuse = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    fused = can_fuse if fused is None else (fused and can_fuse)
    kw = {"fused": True} if fused else {}
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, **kw)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, **kw)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **kw)
    if cfg.name == "ftrl":
        if cfg.weight_decay:
            raise ConfigError("FTRL has no weight_decay; use optim.l2", field="optim.weight_decay")
        return FTRL(params, lr=cfg.lr, beta=cfg.beta, l1=cfg.l1, l2=cfg.l2)
    raise ConfigError(f"unknown optimizer '{cfg.name}'", field="optim.name")
