"""Recurrent layers in plain tensor ops.

cuDNN/ATen fused RNNs support neither double backward (second-order MAML) nor ``vmap``; these
do. Sequences are ``[B, L, D]`` with a validity mask ``[B, L]``: at a padded step the state is
carried over unchanged, so padding never changes any output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _init_uniform(module: nn.Module, hidden: int) -> None:
    bound = 1.0 / math.sqrt(hidden)
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


class LSTM(nn.Module):
    """Single-layer LSTM; returns all hidden states ``[B, L, H]`` and the last valid one ``[B, H]``."""

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_ih = nn.Parameter(torch.empty(4 * hidden, input_dim))
        self.w_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias = nn.Parameter(torch.empty(4 * hidden))
        _init_uniform(self, hidden)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        B, L, _ = x.shape
        gx = x @ self.w_ih.T + self.bias  # input projection for all steps at once
        h = x.new_zeros(B, self.hidden)
        c = x.new_zeros(B, self.hidden)
        outs = []
        for t in range(L):
            g = gx[:, t] + h @ self.w_hh.T
            i, f, gg, o = g.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            m = mask[:, t].unsqueeze(-1).to(x.dtype)
            c = m * c_new + (1 - m) * c
            h = m * h_new + (1 - m) * h
            outs.append(h)
        return torch.stack(outs, dim=1), h


class GRU(nn.Module):
    """Single-layer GRU (same conventions as ``LSTM``)."""

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_ih = nn.Parameter(torch.empty(3 * hidden, input_dim))
        self.w_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.b_ih = nn.Parameter(torch.empty(3 * hidden))
        self.b_hh = nn.Parameter(torch.empty(3 * hidden))
        _init_uniform(self, hidden)

    def step(self, gx_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One GRU step from a precomputed input projection; returns (candidate h, update gate)."""
        gh = h @ self.w_hh.T + self.b_hh
        xr, xz, xn = gx_t.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n, z

    def forward(self, x: Tensor, mask: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, L, _ = x.shape
        gx = x @ self.w_ih.T + self.b_ih
        h = x.new_zeros(B, self.hidden) if h0 is None else h0
        outs = []
        for t in range(L):
            n, z = self.step(gx[:, t], h)
            h_new = (1 - z) * n + z * h
            m = mask[:, t].unsqueeze(-1).to(x.dtype)
            h = m * h_new + (1 - m) * h
            outs.append(h)
        return torch.stack(outs, dim=1), h


class AUGRU(GRU):
    """GRU with attentional update gate (DIEN): ``z' = a_t * z`` where ``a_t`` is a per-step score.

    With the convention ``h = (1-z)*n + z*h_prev`` used here, the attention scales the weight of
    the *new* candidate: ``h = a*(1-z)*n + (1 - a*(1-z))*h_prev``, so a step with zero attention
    leaves the state unchanged, as in DIEN.
    """

    def forward(self, x: Tensor, mask: Tensor, att: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, L, _ = x.shape
        gx = x @ self.w_ih.T + self.b_ih
        h = x.new_zeros(B, self.hidden) if h0 is None else h0
        outs = []
        for t in range(L):
            n, z = self.step(gx[:, t], h)
            u = att[:, t].unsqueeze(-1) * (1 - z)
            h_new = u * n + (1 - u) * h
            m = mask[:, t].unsqueeze(-1).to(x.dtype)
            h = m * h_new + (1 - m) * h
            outs.append(h)
        return torch.stack(outs, dim=1), h
