"""Mean-pooling of multi-valued fields as weighted bags of table rows.

A multi-valued field (genres) is the mean of its valid slots' rows, and a session's history
field is, on top of that, a weighted mean over the session's positions. Both are one linear map
of table rows: ``out[..., f, :] = sum_n coef[..., f, n] * W[rows[..., n], :]``, where the
coefficients depend on the ids only (slot validity, field sizes, position weights). Computing it
that way (instead of gathering ``[..., L, S, D]``, masking, pooling slots with an einsum, then
averaging positions) is the same sum in another order, so it is exact up to float rounding, and
it supports ``vmap`` and double backward (meta-learning needs both). Two evaluations:

* ``gather``: ``coef @ W[rows]`` (one lookup, one batched matmul, no copies);
* ``table``: ``A @ W`` with the bag matrix ``A[..., f, r] = sum of coef over slots reading row
  r`` (a ``scatter_add`` of constants): no lookup at all, and the table's gradient is
  ``A^T @ grad`` instead of an index_add. It pays when the table is small against the number of
  pooled slots: a task-local table of a few hundred rows (``metactr.engine.local_tables``) pooled
  over 10 session items x 8 slots per row. Measured on CPU, 1 thread, ML-1M sizes (64 rows,
  L*S = 80, FFM's D = 130, fwd + double backward): under ``vmap`` over 10 tasks with U = 300
  local rows, 10 ms against 73 ms for the gather (vmap's batched ``index_select`` is a slow
  ``gather``); on one task, 1.0 against 2.1 ms at U = 300, break-even near U = 1000.

Not from a paper: the ``embedding_bag`` idea of CTR libraries, written with ops that vmap and
double backward support.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ``table`` when n_fields * table_rows <= TABLE_RATIO * slots pooled per output row (see above:
# break-even ratio ~40 on one task, ~100 under vmap)
TABLE_RATIO = 32


def slot_weights(mask: Tensor, pool: Tensor) -> Tensor:
    """``[..., S]`` slot validity (0/1 floats) -> each slot's weight in its field's mean:
    ``1 / (valid slots of its field, at least 1)`` on valid slots, 0 on padding.
    ``pool [S, F]`` is one-hot: slot -> field."""
    count = (mask @ pool).clamp_min(1.0)  # [..., F]
    return mask / count.index_select(-1, pool.argmax(-1))  # each slot's own field count


def bag_coefficients(slot_w: Tensor, pool: Tensor, position_weight: Tensor | None = None) -> Tensor:
    """``coef [..., F, N]``: the weight of each looked-up slot in each field's output.

    ``slot_w [..., S]`` (``slot_weights``), or ``[..., L, S]`` with ``position_weight [..., L]``
    (then the ``L * S`` slots of a row are flattened position-major, as ``rows.flatten(-2)``).
    Built as ``[..., 1, N] * [F, N]`` (a 4-D broadcast ``[F, 1, S] * [..., 1, L, S]`` was 8x
    slower)."""
    if position_weight is None:
        return slot_w.unsqueeze(-2) * pool.T
    w = (slot_w * position_weight.unsqueeze(-1)).flatten(-2)  # [..., L * S]
    return w.unsqueeze(-2) * pool.T.repeat(1, slot_w.shape[-2])


def use_table(n_rows: int, n_fields: int, n_slots: int) -> bool:
    """Whether ``pooled_rows`` evaluates through the bag matrix (see the module docstring)."""
    return n_fields * n_rows <= TABLE_RATIO * n_slots


def pooled_rows(weight: Tensor, rows: Tensor, coef: Tensor) -> Tensor:
    """``sum_n coef[..., f, n] * weight[rows[..., n]]`` -> ``[..., F, D]``.

    ``weight [V, D]`` (per task under ``vmap``), ``rows [..., N]`` long into ``weight``,
    ``coef [..., F, N]`` (built from ids, so normally constant; it is differentiable too)."""
    n_rows, (n_fields, n_slots) = weight.shape[-2], coef.shape[-2:]
    if use_table(n_rows, n_fields, n_slots):
        index = rows.unsqueeze(-2).expand(*coef.shape)
        bag = torch.zeros((*coef.shape[:-1], n_rows), dtype=coef.dtype, device=coef.device)
        bag = bag.scatter_add(-1, index, coef).flatten(0, -2)  # [M, V], M = rows x fields
        # (bag @ weight) computed as (weight^T @ bag^T)^T: CPU bmm is slow with few output
        # columns (10 tasks, M = 192, V = 559, D = 10: 2.0 ms against 0.45 ms for the backward)
        out = (weight.transpose(-1, -2) @ bag.transpose(-1, -2)).transpose(-1, -2)
        return out.unflatten(0, coef.shape[:-1])
    emb = weight.index_select(-2, rows.reshape(-1)).unflatten(-2, rows.shape)  # [..., N, D]
    if weight.shape[-1] == 1:  # a batched mat-vec is slow in bmm: multiply and sum instead
        return (coef * emb.squeeze(-1).unsqueeze(-2)).sum(-1, keepdim=True)
    return coef @ emb
