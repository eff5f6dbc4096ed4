"""Model inputs from the shared ``FieldEmbedding``, the FM / FFM interactions, a faster
evaluation of DIN's target attention, and hyper-parameter checks shared by the model zoo.

Flat models (LR, FM, FFM, DeepFM, Wide&Deep) see one vector per *field*: the user, context and
target-item fields and, with ``use_history``, one "history" field per item field, the mean over
the valid session items of that field's vector. The mean is how MetaSelector's multi-valued
"user history movies / genres" features enter (and what DeepCTR does with a pooled sequence
feature); history fields share the item table, as DeepCTR's ``embedding_name`` sharing does, so
that FM's ``<v_target, v_history>`` term is an item-item similarity.

``lookup`` and ``flat_fields`` embed all their groups through ``FieldEmbedding.fields``: one
backward pass over the table instead of one per group (one call of the compiled kernel where it
runs); they compute exactly what ``FieldEmbedding`` does per group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.layers import FieldEmbedding, HistoryLabels, shares_rows


def check_hparams(model: str, *, embed_dim: int | None = None, hidden: tuple[int, ...] | list[int] | None = None,
                  dropout: float | None = None, attention_mode: str | None = None, **positive: int | None) -> None:
    """Raise ``ConfigError`` (field ``model.<name>``) for a hyper-parameter out of range."""
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"model '{model}': {name} {why}", field=f"model.{name}")

    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
        raise bad("embed_dim", f"must be a positive integer, got {embed_dim!r}")
    if hidden is not None and any(not isinstance(h, int) or h < 1 for h in hidden):
        raise bad("hidden", f"must be positive integers, got {list(hidden)!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise bad("dropout", f"must be in [0, 1), got {dropout!r}")
    if attention_mode is not None and attention_mode not in ("softmax", "weights"):
        raise bad("attention_mode", f"must be 'softmax' or 'weights', got {attention_mode!r}")
    for name, value in positive.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise bad(name, f"must be a positive integer, got {value!r}")


def n_flat_fields(spec: FeatureSpec, use_history: bool) -> int:
    """Number of field vectors ``flat_fields`` returns for ``spec``."""
    return len(spec.user) + len(spec.context) + len(spec.item) * (2 if use_history else 1)


def history_fields(embedding: FieldEmbedding, batch: Batch) -> Tensor:
    """Mean over valid session items of each item field's vector: ``[..., Fi, D]``.

    Padded positions get weight 0 and the mean divides by the number of valid items (at least
    1), so neither the ids at padded positions nor extra padding change the result; an empty
    session gives zeros. Computed as one weighted bag of table rows (``FieldEmbedding.bag``):
    no ``[..., L, Fi, D]`` intermediate is built, masked and summed.
    """
    return embedding.bag(batch.hist, "item", history_weights(embedding, batch))


def history_weights(embedding: FieldEmbedding, batch: Batch) -> Tensor:
    """``[..., L]``: each session position's weight in the session mean (mask / #valid, at least 1)."""
    m = batch.hist_mask.to(embedding.weight.dtype)
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


def lookup(embedding: FieldEmbedding, parts: list[tuple[Tensor, str]]) -> Tensor:
    """Field vectors of several ``(ids, group)`` parts, concatenated on the field axis, with one
    backward pass over the table (``FieldEmbedding.fields``)."""
    return embedding.fields([(ids, g, None) for ids, g in parts])


def flat_fields(embedding: FieldEmbedding, batch: Batch, use_history: bool) -> Tensor:
    """``[..., F, D]``: user, context, target-item and (optionally) history field vectors."""
    parts = [(batch.user, "user", None), (batch.context, "context", None), (batch.item, "item", None)]
    if use_history:
        parts.append((batch.hist, "item", history_weights(embedding, batch)))
    return embedding.fields(parts)


def sequence_inputs(embedding: FieldEmbedding, batch: Batch,
                    labels: HistoryLabels | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of the session models: ``(user+context [..., (Fu+Fc)*D], target [..., Fi*D],
    session [..., L, Fi*D])``; an item is the concatenation of its field vectors. The target
    and the session are embedded in one call. ``labels``: the session items are joined with
    their known labels (label-aware input)."""
    ctx = [(batch.user, "user"), (batch.context, "context")]
    if any(g in embedding.n_fields for _, g in ctx):
        other = lookup(embedding, ctx).flatten(-2)
    else:
        other = embedding(batch.user, "user").flatten(-2)  # [..., 0]
    if shares_rows(batch.hist, batch.hist_mask, batch.hist_label):
        # one session for every row (a service scoring candidates): embed it once
        hist = embedding(batch.hist[:1], "item").flatten(-2)
        if labels is not None:
            hist = labels(hist, batch.hist_label[:1], batch.hist_mask[:1])
        return other, embedding(batch.item, "item").flatten(-2), hist.expand(batch.hist.shape[0], -1, -1)
    items = embedding(torch.cat([batch.item.unsqueeze(-2), batch.hist], dim=-2), "item").flatten(-2)
    hist = items[..., 1:, :]
    if labels is not None:
        hist = labels(hist, batch.hist_label, batch.hist_mask)
    return other, items[..., 0, :], hist


def fm_pairwise(v: Tensor) -> Tensor:
    """FM's second-order term ``sum_{i<j} <v_i, v_j>`` for field vectors ``[..., F, D]`` -> ``[...]``.

    Rendle (2010), eq. 5: ``0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2)``, O(F*D) instead of O(F^2*D).
    """
    s = v.sum(dim=-2)
    return 0.5 * (s * s - (v * v).sum(dim=-2)).sum(dim=-1)


class FFMInteraction(nn.Module):
    """FFM's pairwise term (Juan et al., RecSys 2016): ``sum_{i<j} <v_{i,f_j}, v_{j,f_i}>``.

    Input: field-aware vectors ``[..., F, F, k]`` where ``[..., i, j, :]`` is field i's vector
    for interacting with field j. The pairs are gathered with index tensors built once here, so
    ``forward`` is two gathers, a product and a sum (no Python loop over pairs).
    """

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.n_fields = n_fields
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, v: Tensor) -> Tensor:
        left = v[..., self.rows, self.cols, :]  # v_{i, f_j}  [..., P, k]
        right = v[..., self.cols, self.rows, :]  # v_{j, f_i}
        return (left * right).sum(dim=(-2, -1))
