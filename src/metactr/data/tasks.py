"""Tasks for meta-learning: rows grouped by user (or item), padded to a common size, stacked.

The one place that groups rows into tasks: ``group_rows`` (NumPy, for the samplers that draw
with a NumPy generator: ``UserTaskSampler``, ``item_task_batches``) and ``UserIndex`` (torch, for
MetaSelector's episodes and meta-test, which draw with a torch generator), both built on one
stable sort + offsets.

A *meta-batch* of T tasks is a ``Batch`` whose tensors have a leading task dimension
``[T, S, ...]`` plus a weight ``[T, S]`` (1 for real rows, 0 for padding). Padded rows repeat a
real row of the same task, so every tensor stays valid input for the model and the weight alone
keeps them out of the loss. Grouping is one stable sort + offsets (no per-row Python).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from metactr.data.batch import Batch
from metactr.data.prepared import PreparedDataset, Split
from metactr.errors import DataError


def pad_tasks(index_lists: Sequence, size: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack variable-length row-index lists into ``idx [T, S]`` (long) and ``weight [T, S]`` (float).

    ``size`` defaults to the longest list; longer lists are cut to their first ``size`` rows.
    Padded slots repeat the task's first row with weight 0. Empty lists are an error.
    """
    arrays = [np.asarray(x.cpu() if isinstance(x, Tensor) else x, dtype=np.int64).reshape(-1)
              for x in index_lists]
    if not arrays:
        raise ValueError("pad_tasks needs at least one task")
    lens = np.array([a.size for a in arrays], dtype=np.int64)
    if (lens == 0).any():
        raise ValueError(f"task {int(np.flatnonzero(lens == 0)[0])} has no rows")
    S = int(lens.max()) if size is None else int(size)
    if S <= 0:
        raise ValueError(f"task size must be > 0, got {S}")
    flat = np.concatenate(arrays)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    idx, weight = gather_padded(flat, starts, lens, S)
    return torch.from_numpy(idx), torch.from_numpy(weight)


def gather_padded(order: np.ndarray, starts: np.ndarray, lens: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``order[starts[t] : starts[t] + min(lens[t], size)]`` per task, padded with the first row."""
    j = np.arange(size)[None, :]
    kept = np.minimum(lens, size)[:, None]
    valid = j < kept
    src = starts[:, None] + np.where(valid, j, 0)
    return order[src], valid.astype(np.float32)


def task_batch(dataset: PreparedDataset, split: Split | str, idx: Tensor, weight: Tensor | None = None) -> Batch:
    """The ``Batch`` of rows ``idx [T, S]`` with a leading task dimension (``weight`` is only
    checked for shape: padded rows are real rows, masked by the caller's weight)."""
    if isinstance(split, str):
        split = dataset.split(split)
    if idx.dim() != 2:
        raise ValueError(f"task indices must be [T, S], got shape {tuple(idx.shape)}")
    if weight is not None and weight.shape != idx.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != index shape {tuple(idx.shape)}")
    T, S = idx.shape
    flat = dataset.batch(split, idx.reshape(-1))
    return Batch(*(t.reshape(T, S, *t.shape[1:]) for t in flat))


class TaskBatch(NamedTuple):
    support: Batch  # [T, S, ...]
    support_weight: Tensor  # [T, S]
    query: Batch  # [T, Q, ...]
    query_weight: Tensor  # [T, Q]
    users: Tensor  # [T] user ids


def group_rows_by_time(split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``group_rows`` with each user's rows in time order (timestamp, then file order; file order
    alone when the split has no timestamps)."""
    user_id = split.user_id.numpy()
    if split.timestamp is None:
        return group_rows(user_id)
    order = np.lexsort((split.timestamp.numpy(), user_id))  # stable: ties keep file order
    users, starts, counts = np.unique(user_id[order], return_index=True, return_counts=True)
    return users, order, starts, counts


def group_rows(user_id: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group row indices by user: ``(users, order, starts, counts)`` so that the rows of
    ``users[k]`` are ``order[starts[k]:starts[k]+counts[k]]`` (shuffled within the user when
    ``rng`` is given, else in their original order)."""
    user_id = np.asarray(user_id)
    if rng is None:
        order = np.argsort(user_id, kind="stable")
    else:
        order = np.lexsort((rng.random(user_id.size), user_id))
    users, starts, counts = np.unique(user_id[order], return_index=True, return_counts=True)
    return users, order, starts, counts


class UserTaskSampler:
    """Meta-batches of user tasks from a prepared split.

    One split (``query_split=None``): each user's rows are shuffled and cut into a support part
    and a query part (``query_frac`` of the rows, at least one; users with fewer than 2 rows are
    skipped). Two splits (e.g. ``ms_support`` / ``ms_query``): support rows come from ``split``,
    query rows from ``query_split``, matched by user (users present in both).
    Supports/queries longer than ``support_size``/``query_size`` are cut (random rows).
    ``order="time"`` (one split): no shuffling; each user's rows in time order (timestamp, then
    file order), the support is the latest ``support_size`` rows before the query and the query the
    next ``query_size`` rows: a user's recent past predicts their near future.
    """

    def __init__(self, dataset: PreparedDataset, split: str, *, query_split: str | None = None,
                 tasks_per_batch: int = 32, support_size: int = 20, query_size: int = 10,
                 query_frac: float = 0.5, drop_last: bool = False, order: str = "random") -> None:
        if order not in ("random", "time"):
            raise ValueError(f"order must be 'random' or 'time', got {order!r}")
        if order == "time" and query_split is not None:
            raise ValueError("order='time' cuts one split into support and query; query_split must be None")
        self.order = order
        if tasks_per_batch <= 0 or support_size <= 0 or query_size <= 0:
            raise ValueError("tasks_per_batch, support_size and query_size must be > 0")
        if not 0.0 < query_frac < 1.0:
            raise ValueError(f"query_frac must be in (0, 1), got {query_frac}")
        self.dataset = dataset
        self.split = dataset.split(split)
        self.query_split = dataset.split(query_split) if query_split else None
        self.tasks_per_batch = tasks_per_batch
        self.support_size = support_size
        self.query_size = query_size
        self.query_frac = query_frac
        self.drop_last = drop_last
        s_users = np.unique(self.split.user_id.numpy())
        if self.query_split is None:
            _, _, _, counts = group_rows(self.split.user_id.numpy())
            self.users = s_users[counts >= 2]
        else:
            self.users = np.intersect1d(s_users, np.unique(self.query_split.user_id.numpy()))
        if self.users.size == 0:
            raise DataError(f"split '{split}' has no user with enough rows for a support and a query set")

    def __len__(self) -> int:
        n = self.users.size
        return n // self.tasks_per_batch if self.drop_last else -(-n // self.tasks_per_batch)

    def _plan(self, split: Split, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.order == "time":
            users, order, starts, counts = group_rows_by_time(split)
        else:
            users, order, starts, counts = group_rows(split.user_id.numpy(), rng)
        pos = np.searchsorted(users, self.users)
        return order, starts[pos], counts[pos]

    def __iter__(self) -> Iterator[TaskBatch]:
        return self.iterate(np.random.default_rng())

    def iterate(self, rng: np.random.Generator) -> Iterator[TaskBatch]:
        """One pass over the users in random order (one task per user)."""
        order, s_start, s_count = self._plan(self.split, rng)
        if self.query_split is None:
            n_q = np.maximum(1, np.round(s_count * self.query_frac).astype(np.int64))
            n_q = np.minimum(n_q, s_count - 1)
            n_s = s_count - n_q
            q_order, q_start, q_count = order, s_start + n_s, n_q
            if self.order == "time":  # the latest support rows, right before the query
                s_start = s_start + np.maximum(0, n_s - self.support_size)
                n_s = np.minimum(n_s, self.support_size)
            s_count = n_s
        else:
            q_order, q_start, q_count = self._plan(self.query_split, rng)
        perm = rng.permutation(self.users.size)
        T = self.tasks_per_batch
        stop = (perm.size // T) * T if self.drop_last else perm.size
        q_src = self.split if self.query_split is None else self.query_split
        for b in range(0, stop, T):
            k = perm[b:b + T]
            s_idx, s_w = gather_padded(order, s_start[k], s_count[k], self.support_size)
            q_idx, q_w = gather_padded(q_order, q_start[k], q_count[k], self.query_size)
            s_idx_t, q_idx_t = torch.from_numpy(s_idx), torch.from_numpy(q_idx)
            yield TaskBatch(task_batch(self.dataset, self.split, s_idx_t), torch.from_numpy(s_w),
                            task_batch(self.dataset, q_src, q_idx_t), torch.from_numpy(q_w),
                            torch.from_numpy(self.users[k]))


# --------------------------------------------------------------------------- item tasks (Meta-Embedding)
def item_task_batches(dataset: PreparedDataset, split: str, *, tasks_per_batch: int, a_size: int, b_size: int,
                      rng: np.random.Generator):
    """One pass over the items of ``split`` with >= 2 rows, in random order, ``tasks_per_batch``
    distinct items per step: yields ``(items [T], D_a [T, Sa], w_a, D_b [T, Sb], w_b)``. Each item's
    rows are shuffled and halved (D_a the first half, D_b the second; they never overlap)."""
    s = dataset.split(split)
    items, order, starts, counts = group_rows(s.target.numpy(), rng)
    keep = counts >= 2
    if not keep.any():
        raise DataError(f"split '{split}' has no item with 2 rows or more (Meta-Embedding needs D_a and D_b)")
    items, starts, counts = items[keep], starts[keep], counts[keep]
    n_a = counts // 2
    perm = rng.permutation(items.size)
    for b in range(0, perm.size, tasks_per_batch):
        k = perm[b:b + tasks_per_batch]
        a_idx, a_w = gather_padded(order, starts[k], n_a[k], a_size)
        b_idx, b_w = gather_padded(order, starts[k] + n_a[k], counts[k] - n_a[k], b_size)
        yield (torch.from_numpy(items[k]), task_batch(dataset, s, torch.from_numpy(a_idx)), torch.from_numpy(a_w),
               task_batch(dataset, s, torch.from_numpy(b_idx)), torch.from_numpy(b_w))


def item_target_counts(dataset: PreparedDataset, split: str) -> np.ndarray:
    """How many rows of ``split`` have each item (0..n_items-1) as their target."""
    return np.bincount(dataset.split(split).target.numpy(), minlength=dataset.n_items)


# --------------------------------------------------------------------------- user index (torch)
@dataclass
class UserIndex:
    """Rows of one split grouped by user (CSR): ``rows[starts[i]:starts[i]+counts[i]]`` are the
    rows of ``users[i]``, in their original (chronological) order."""

    users: Tensor
    starts: Tensor
    counts: Tensor
    rows: Tensor

    @classmethod
    def build(cls, split: Split) -> UserIndex:
        uid = split.user_id
        order = torch.sort(uid, stable=True).indices
        users, counts = torch.unique_consecutive(uid[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        return cls(users, starts, counts, order)

    def lookup(self, users: Tensor) -> Tensor:
        """Position of each user in ``self.users`` (-1 where absent)."""
        pos = torch.searchsorted(self.users, users).clamp_max(max(len(self.users) - 1, 0))
        found = self.users[pos] == users if len(self.users) else torch.zeros_like(users, dtype=torch.bool)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def sample(self, pos: Tensor, n_max: int, generator: torch.Generator | None, *,
               latest: bool = False) -> tuple[Tensor, Tensor]:
        """Up to ``n_max`` rows of each user ``pos`` (random, or the most recent when ``latest``):
        a padded [T, N] row-index matrix and its [T, N] 0/1 weight mask. Vectorized."""
        counts = self.counts[pos]
        n = int(min(int(counts.max()) if len(pos) else 1, n_max)) or 1
        width = int(counts.max()) if len(pos) else 1
        ar = torch.arange(width)
        valid = ar[None, :] < counts[:, None]
        if latest:
            # the last min(count, n) rows, in chronological order
            offs = (counts - n).clamp_min(0)[:, None] + torch.arange(n)[None, :]
            take = offs
        else:
            keys = torch.rand(len(pos), width, generator=generator).masked_fill(~valid, 2.0)
            take = torch.argsort(keys, dim=1)[:, :n]
        weight = (torch.arange(n)[None, :] < counts[:, None]).float()
        take = torch.where(weight > 0, take, torch.zeros_like(take))
        rows = self.rows[self.starts[pos][:, None] + take]
        return rows, weight


# --------------------------------------------------------------------------- session tasks
def session_tasks(batch: Batch, support_size: int) -> tuple[Batch, Tensor, Batch, Tensor]:
    """Each row as a task: its support set is the session's own labelled history, its query the target.

    Support row j of a session predicts the session's item j from the items before it (the same
    next-item supervision as RML's auxiliary loss); the last ``support_size`` items of each
    session are used. Returns ``(support [B, S, ...], support_weight [B, S], query [B, 1, ...],
    query_weight [B, 1])``; an empty session has weight 0 everywhere (no adaptation). Vectorized.
    """
    if support_size <= 0:
        raise ValueError(f"support_size must be > 0, got {support_size}")
    B, L = batch.hist_mask.shape
    S = min(support_size, L)
    n = batch.hist_mask.sum(1)  # sessions are left-aligned: items 0..n-1 in time order
    pos = (n - S).clamp_min(0)[:, None] + torch.arange(S)[None, :]  # [B, S] the last S positions
    weight = (pos < n[:, None]).float()
    pos = torch.where(weight > 0, pos, torch.zeros_like(pos))
    rows = torch.arange(B)[:, None]
    earlier = torch.arange(L)[None, None, :] < pos[:, :, None]  # [B, S, L] items before position j
    hist_mask = batch.hist_mask[:, None, :] & earlier

    def rep(t: Tensor) -> Tensor:
        return t[:, None].expand(B, S, *t.shape[1:])

    support = Batch(user=rep(batch.user), item=batch.hist[rows, pos], context=rep(batch.context),
                    hist=rep(batch.hist) * hist_mask[..., None], hist_mask=hist_mask,
                    hist_label=rep(batch.hist_label) * hist_mask, label=batch.hist_label[rows, pos].to(batch.label.dtype),
                    user_id=rep(batch.user_id))
    query = Batch(*(t[:, None] for t in batch))
    return support, weight, query, torch.ones(B, 1, dtype=weight.dtype)
