"""Building blocks shared by every model.

Written as pure functions of their parameters (no buffers updated in ``forward``, no Python state
between calls) so that ``torch.func.functional_call``, ``grad`` (double backward included) and
``vmap`` work on every model built from them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metactr.data.batch import FeatureSpec, Field
from metactr.models import native
from metactr.models.pooling import (
    bag_coefficients,
    pooled_rows,
    slot_weights,
    use_table,
)

GROUPS = ("user", "item", "context")


def gather_rows(weight: Tensor, idx: Tensor) -> Tensor:
    """``weight[idx]`` as ``[*idx.shape, D]``: ``F.embedding`` without its backward.

    ``index_select``'s backward is one ``index_add_`` into a zero table, measured 3.5x faster
    on CPU than ``embedding_dense_backward`` (27k lookups into a 13k x 17 table: 0.47 vs
    1.66 ms), and it supports double backward and ``vmap`` (per-task adapted tables) too.
    """
    return weight.index_select(-2, idx.reshape(-1)).unflatten(-2, idx.shape)


class FieldEmbedding(nn.Module):
    """One embedding table for every field of every group (FuxiCTR's shared embedding layer).

    ``forward(ids, group)`` maps slot ids ``[..., S]`` of a group to field vectors ``[..., F, D]``:
    each slot is looked up at its field's offset, padding ids (0) are masked out, and the slots
    of a multi-valued field are mean-pooled. Session items use the ``item`` group layout, so a
    session ``[B, L, Si]`` embeds to ``[B, L, Fi, D]`` with the same vectors as the target item;
    ``bag(ids, group, weights)`` gives a weighted sum of those over ``L`` directly (session means).
    """

    def __init__(self, spec: FeatureSpec, dim: int, *, init_std: float = 1e-4,
                 groups: tuple[str, ...] = GROUPS) -> None:
        super().__init__()
        self.dim = dim
        self.groups = tuple(g for g in groups if spec.group(g))
        fields: list[Field] = [f for g in self.groups for f in spec.group(g)]
        total = sum(f.vocab_size for f in fields)
        self.weight = nn.Parameter(torch.randn(max(total, 1), dim) * init_std)
        offset = 0
        for g in self.groups:
            slot_offsets, slot_field = [], []
            for j, f in enumerate(spec.group(g)):
                slot_offsets += [offset] * f.max_len
                slot_field += [j] * f.max_len
                offset += f.vocab_size
            n_f = len(spec.group(g))
            pool = torch.zeros(len(slot_field), n_f)
            pool[torch.arange(len(slot_field)), torch.tensor(slot_field)] = 1.0
            self.register_buffer(f"{g}_offsets", torch.tensor(slot_offsets, dtype=torch.long), persistent=False)
            self.register_buffer(f"{g}_pool", pool, persistent=False)
            self.register_buffer(f"{g}_slot_field", torch.tensor(slot_field, dtype=torch.long), persistent=False)
        self.n_fields = {g: len(spec.group(g)) for g in self.groups}

        self.single_valued = {g: all(f.max_len == 1 for f in spec.group(g)) for g in self.groups}
        # Optional task-local table: when non-empty, ``weight`` holds only some rows and
        # ``row_map[global row] -> local row``. Meta-learning swaps both in through
        # ``functional_call`` so that an inner loop adapts [rows used by the task, D]
        # instead of the whole table (same result: unused rows get zero gradient).
        self.register_buffer("row_map", torch.zeros(0, dtype=torch.long), persistent=False)

    def rows(self, ids: Tensor, offsets: Tensor) -> Tensor:
        """Rows of ``weight`` for slot ids (``ids + offsets``, remapped by ``row_map`` if set)."""
        rows = ids + offsets
        if self.row_map.shape[-1] > 0:
            rows = self.row_map.index_select(0, rows.reshape(-1)).view_as(rows)
        return rows

    def forward(self, ids: Tensor, group: str) -> Tensor:
        if group not in self.n_fields:
            return ids.new_zeros((*ids.shape[:-1], 0, self.dim), dtype=self.weight.dtype)
        if native.usable(self.weight):  # the compiled lookup (models.native): the same sums, faster
            return self._native([(ids, group, None)])
        offsets = getattr(self, f"{group}_offsets")
        mask = (ids > 0).to(self.weight.dtype)
        if self.single_valued[group]:  # pooling would be the identity: skipping it is ~2.5x faster fwd+bwd
            return gather_rows(self.weight, self.rows(ids, offsets)) * mask.unsqueeze(-1)
        pool = getattr(self, f"{group}_pool")
        slot_w = slot_weights(mask, pool)  # 1/count on valid slots: the mean folded into one weight
        if self.dim >= 32:  # wide rows (FFM): a batched matmul, no permuted copies (2.5x fwd+bwd)
            return pooled_rows(self.weight, self.rows(ids, offsets), bag_coefficients(slot_w, pool))
        return torch.einsum("...sd,sf->...fd", gather_rows(self.weight, self.rows(ids, offsets))
                            * slot_w.unsqueeze(-1), pool)

    def bag(self, ids: Tensor, group: str, weights: Tensor) -> Tensor:
        """``sum_l weights[..., l] * forward(ids, group)[..., l, :, :]`` for ids ``[..., L, S]``:
        ``[..., F, D]``, e.g. a session's mean field vectors (``weights`` = mask / #valid).

        The same sum computed as one weighted bag of table rows (``metactr.models.pooling``):
        exact up to float rounding, vmap and double backward work, and no ``[..., L, S, D]``
        intermediate is masked, permuted or pooled (FFM's history fields, 64 rows, fwd+bwd:
        3x faster on one task; under vmap with task-local tables, see ``pooling``)."""
        if group not in self.n_fields:
            return ids.new_zeros((*ids.shape[:-2], 0, self.dim), dtype=self.weight.dtype)
        dtype = self.weight.dtype
        if native.usable(self.weight) and not weights.requires_grad:
            return self._native([(ids, group, weights)])
        if self.single_valued[group] and not use_table(self.weight.shape[-2], self.n_fields[group],
                                                       ids.shape[-2] * ids.shape[-1]):
            # one slot per field and a full table: a lookup and a weighted sum are ~3x faster
            # fwd+bwd than the bag's batched matmul (1024 sessions of 10 items, D = 16, 1 thread:
            # 1.05 vs 3.6 ms); the bag pays with multi-valued fields or a small (task-local) table
            return (self.forward(ids, group) * weights.to(dtype)[..., None, None]).sum(dim=-3)
        pool = getattr(self, f"{group}_pool")
        coef = bag_coefficients(slot_weights((ids > 0).to(dtype), pool), pool, weights.to(dtype))
        rows = self.rows(ids, getattr(self, f"{group}_offsets")).flatten(-2)
        return pooled_rows(self.weight, rows, coef)

    def fields(self, parts: list[tuple[Tensor, str, Tensor | None]]) -> Tensor:
        """Field vectors of several ``(ids, group, session weights or None)`` parts (``forward`` of
        the ids, or ``bag`` with the weights), concatenated on the field axis; groups without
        fields are skipped. With the compiled kernel every part goes in one call; without it a
        leading run of single-valued parts without weights is one ``gather_rows`` call. Either way
        the table gets one backward pass instead of one per part."""
        parts = [p for p in parts if p[1] in self.n_fields]
        if not parts:
            raise ValueError("fields needs at least one non-empty group")
        if native.usable(self.weight) and not any(w is not None and w.requires_grad for _, _, w in parts):
            return self._native(parts)
        run = 0
        while run < len(parts) and parts[run][2] is None and self.single_valued[parts[run][1]]:
            run += 1
        out = []
        if run > 1:
            ids = torch.cat([i for i, _, _ in parts[:run]], dim=-1)
            offsets = torch.cat([getattr(self, f"{g}_offsets") for _, g, _ in parts[:run]])
            out.append(gather_rows(self.weight, self.rows(ids, offsets)) * (ids > 0).unsqueeze(-1).to(self.weight.dtype))
            parts = parts[run:]
        out += [self(ids, g) if w is None else self.bag(ids, g, w) for ids, g, w in parts]
        return torch.cat(out, dim=-2) if len(out) > 1 else out[0]

    def _native(self, parts: list[tuple[Tensor, str, Tensor | None]]) -> Tensor:
        """``fields`` in one call of ``models.native.bag``: each part's slots become (table row,
        coefficient) pairs -- the mask for single-valued fields, ``slot_weights`` otherwise, times
        the position weight for a session ``[..., L, S]`` (flattened position-major) -- and the
        field of each slot comes from ``_field_map``."""
        dtype = self.weight.dtype
        rows, coef = [], []
        for ids, group, weights in parts:
            mask = (ids > 0).to(dtype)
            c = mask if self.single_valued[group] else slot_weights(mask, getattr(self, f"{group}_pool"))
            r = self.rows(ids, getattr(self, f"{group}_offsets"))
            if weights is not None:
                c, r = (c * weights.to(dtype).unsqueeze(-1)).flatten(-2), r.flatten(-2)
            rows.append(r)
            coef.append(c)
        fmap = self._field_map(tuple((g, None if w is None else ids.shape[-2]) for ids, g, w in parts))
        n_fields = sum(self.n_fields[g] for _, g, _ in parts)
        if len(parts) > 1:
            rows, coef = [torch.cat(rows, -1)], [torch.cat(coef, -1)]
        return native.bag(self.weight, rows[0], coef[0], fmap, n_fields)

    def _field_map(self, layout: tuple[tuple[str, int | None], ...]) -> Tensor:
        """The output field of each slot for groups laid out as ``layout`` (``(group, positions or
        None)``, fields numbered on in that order), built once per layout: a step asks for the
        same few layouts every time, and building one costs more than the lookup's own bookkeeping."""
        cache = self.__dict__.setdefault("_field_maps", {})
        fmap = cache.get(layout)
        if fmap is None or fmap.device != self.weight.device:
            # a normal tensor even when first asked for under inference mode (predict_proba): the
            # cached map is later saved for backward by training steps
            with torch.inference_mode(False):
                parts, base = [], 0
                for group, positions in layout:
                    f = getattr(self, f"{group}_slot_field") + base
                    parts.append(f.repeat(positions) if positions is not None else f)
                    base += self.n_fields[group]
                fmap = cache[layout] = torch.cat(parts)
        return fmap


class Dice(nn.Module):
    """Dice activation (DIN, Zhou et al. 2018): ``p*x + (1-p)*alpha*x``.

    Deviation, on purpose: DIN's ``p = sigmoid(BN(x))`` uses batch statistics, which makes a
    prediction depend on the other rows of its batch and breaks single-request serving and
    per-task ``vmap``. Here ``p = sigmoid(gamma*x + beta)`` with learned per-unit gamma/beta,
    which is what a BN layer whose moving statistics never trained computes (as in the RML
    authors' code).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # p*x + (1-p)*alpha*x, rearranged to fewer tensor ops (Dice is on every hot path)
        return x * (self.alpha + (1 - self.alpha) * torch.sigmoid(x * self.gamma + self.beta))


def make_activation(name: str, dim: int) -> nn.Module:
    name = name.lower()
    if name == "dice":
        return Dice(dim)
    if name == "prelu":
        return nn.PReLU(dim)
    return {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "none": nn.Identity(),
            "identity": nn.Identity()}[name]


class MLP(nn.Module):
    """Linear -> activation -> dropout, repeated; an optional final linear to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] | list[int], *, activation: str = "relu",
                 dropout: float = 0.0, out_dim: int | None = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), make_activation(activation, h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` is true; 0 where nothing is valid."""
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def _packable(mask: Tensor) -> bool:
    """Whether attention may gather the valid positions of ``mask`` ([B, L]): a 2-D mask,
    outside any torch.func transform (``nonzero`` has a data-dependent shape, which vmap
    cannot batch), large enough and with enough padding (>= 30%) for the gather to pay off:
    measured, DIN at batch 1024 with 1-10 session items gains; RML's two-phase training at
    batch 128 lost ~10% with packing."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    if mask.dim() != 2 or mask.numel() < 8192 or level is None or level() is not None:
        return False
    return int(mask.sum()) <= 0.7 * mask.numel()


class HistoryLabels(nn.Module):
    """Label-aware session input: each session item's vector joined with its known label, as a
    learned vector per label added to it (``e + w[y]``, like a segment embedding; padding stays
    zero). The label of a session item is known before the target is scored (it is what RML's
    auxiliary loss predicts), so this gives the models the signal the simple ``rates_lr`` baseline
    uses, without any meta-learning (issue 15's controls)."""

    def __init__(self, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, dim) * init_std)

    def forward(self, hist: Tensor, hist_label: Tensor, mask: Tensor) -> Tensor:
        y = hist_label.to(hist.dtype).unsqueeze(-1)
        return hist + (self.weight[0] + y * (self.weight[1] - self.weight[0])) * mask.to(hist.dtype).unsqueeze(-1)


def shares_rows(*tensors: Tensor) -> bool:
    """Whether every tensor repeats one row along dim 0 as a stride-0 view (``t[:1].expand(B, ...)``),
    outside any torch.func transform: a service scoring B candidates against one user's session
    builds its batch this way, and the models then embed and project that session once instead
    of B times (the result is the same; the arithmetic per candidate shrinks)."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    if level is None or level() is not None:
        return False
    return all(t.dim() >= 2 and t.shape[0] > 1 and t.stride(0) == 0 for t in tensors)


class TargetAttention(nn.Module):
    """DIN-style attention of a query (target item) over keys (session items).

    Scores come from an MLP on ``[q, k, q-k, q*k]``. ``mode='softmax'`` (RML): masked softmax
    of scores / sqrt(dim); ``mode='weights'`` (DIN paper): raw scores used as weights (padding
    zeroed). Returns the weighted sum ``[B, D]`` and the weights ``[B, L]``. Sessions with no
    valid item give a zero vector (never NaN).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (80, 40), *, activation: str = "dice",
                 mode: str = "softmax") -> None:
        super().__init__()
        if mode not in ("softmax", "weights"):
            raise ValueError(f"attention mode must be 'softmax' or 'weights', got {mode!r}")
        self.mode = mode
        self.scale = 1.0 / math.sqrt(dim)
        self.mlp = MLP(4 * dim, hidden, activation=activation, out_dim=1)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_autocast_enabled(query.device.type):
            # precision bf16: this small MLP's element-wise layers (Dice) cost more in bf16 than its
            # narrow matmuls save (DIN's training step 1.4x slower on CPU, benchmarks/ab_step.py)
            with torch.autocast(query.device.type, enabled=False):
                return self._forward(query.float(), keys.float(), mask)
        return self._forward(query, keys, mask)

    def _forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # The first layer sees [q, k, q-k, q*k]; with its weight split as [W_q, W_k, W_d, W_p] it
        # equals (W_q + W_d) q + [W_k - W_d, W_p] [k, q*k]: the query part is computed once per
        # sample, and the per-position matmul is half as wide (same parameters, same result).
        first, rest = self.mlp.net[0], self.mlp.net[1:]
        w_q, w_k, w_d, w_p = first.weight.chunk(4, dim=-1)
        h_q = query @ (w_q + w_d).T + first.bias
        if shares_rows(keys, mask):
            return self._shared(query, keys, mask, h_q, w_k - w_d, w_p, rest)
        w_kp = torch.cat([w_k - w_d, w_p], dim=-1).T
        if _packable(mask):
            return self._packed(query, keys, mask, h_q, w_kp, rest)
        h_k = torch.cat([keys, query.unsqueeze(-2) * keys], dim=-1) @ w_kp
        scores = rest(h_k + h_q.unsqueeze(-2)).squeeze(-1)
        w = self._weights(scores, mask)
        # multiply-and-sum: ~4x faster on CPU than an einsum's batched [1, L] x [L, D] matmuls
        return (w.unsqueeze(-1) * keys).sum(dim=-2), w

    def _weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        if self.mode == "softmax":
            scores = (scores * self.scale).masked_fill(~mask, -1e9)
            return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)  # all-pad rows -> 0
        return scores * mask.to(scores.dtype)

    def _packed(self, query: Tensor, keys: Tensor, mask: Tensor, h_q: Tensor, w_kp: Tensor,
                rest: nn.Module) -> tuple[Tensor, Tensor]:
        """Score and sum only the valid positions: with sessions of 1-10 items, about half the
        MLP and weighted-sum work is padding. Flat ``index_select``/``index_copy``/``index_add``
        rather than ``keys[b, pos]``: their backwards are a gather or an ``index_add``, where
        advanced indexing's backward is an accumulating ``index_put``, which got 2x slower with
        2 threads than with 1 (0.5 -> 1.0 ms of an 18 ms DIN step, batch 1024)."""
        n, length, dim = keys.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # valid positions of the [B*L] grid
        row = torch.div(flat, length, rounding_mode="floor")
        k = keys.reshape(-1, dim).index_select(0, flat)
        q_row, hq_row = torch.cat([query, h_q], dim=-1).index_select(0, row).split([dim, h_q.shape[-1]], -1)
        s = rest(torch.cat([k, q_row * k], dim=-1) @ w_kp + hq_row).squeeze(-1)
        scores = s.new_zeros(n * length).index_copy(0, flat, s).view(n, length)
        w = self._weights(scores, mask)
        w_valid = s if self.mode == "weights" else w.reshape(-1).index_select(0, flat)
        out = keys.new_zeros(n, dim).index_add(0, row, w_valid.unsqueeze(-1) * k)
        return out, w

    def _shared(self, query: Tensor, keys: Tensor, mask: Tensor, h_q: Tensor, w_kd: Tensor, w_p: Tensor,
                rest: nn.Module) -> tuple[Tensor, Tensor]:
        """One session for every row (``shares_rows``): its valid keys and their projection
        ``k @ W_k`` are computed once; only the ``q*k`` half and the MLP's later layers run per row."""
        valid = mask[0].nonzero().squeeze(1)
        k = keys[0].index_select(0, valid)  # [n, D]
        s = rest(((query.unsqueeze(-2) * k) @ w_p.T + (k @ w_kd.T) + h_q.unsqueeze(-2))).squeeze(-1)  # [B, n]
        scores = s.new_zeros(query.shape[0], keys.shape[1]).index_copy(1, valid, s)
        w = self._weights(scores, mask)
        return w.index_select(1, valid) @ k, w

    def reference(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Scores computed the textbook way (MLP on the concatenation); for tests."""
        q = query.unsqueeze(-2).expand_as(keys)
        return self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
