"""The one batch format every model reads, and the feature layout that describes it.

All features are categorical ids (0 = padding, 1 = unknown where the encoder made the codes).
A *field* has a vocabulary and one or more *slots*: a multi-valued field (genres) uses
``max_len`` slots of padded ids, mean-pooled over its non-zero ids inside the embedding layer.
A group (user, item, context) is a row of slots, so a batch is a handful of int tensors:

    user       [B, Su]      user fields of each sample
    item       [B, Si]      target-item fields
    context    [B, Sc]      per-sample fields (weekday, season...); Sc may be 0
    hist       [B, L, Si]   session items, same layout as ``item``
    hist_mask  [B, L] bool  which session positions are real (left-aligned, oldest first)
    hist_label [B, L] float label of each session item (RML's auxiliary loss)
    label      [B] float    click label of the target
    user_id    [B] long     user code, for group metrics (GAUC, per-user reports)

``Batch`` is a NamedTuple so that torch.func (``vmap``, ``grad``) treats it as a pytree: a
meta-batch of T tasks is simply a Batch whose tensors have a leading [T] dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


def take_rows(x: Tensor, idx: Tensor | slice) -> Tensor:
    """``x[idx]`` along the first dimension; integer index tensors of any shape go through
    ``index_select`` (result ``[*idx.shape, *x.shape[1:]]``; no negative ids): on CPU it gathers
    faster than advanced indexing, most of all on a loaded machine (the timings, with their
    command and host, are in ``docs/training.md``)."""
    if isinstance(idx, Tensor) and not idx.dtype.is_floating_point and idx.dtype != torch.bool:
        return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])
    return x[idx]


@dataclass(frozen=True)
class Field:
    name: str
    vocab_size: int
    max_len: int = 1  # > 1: multi-valued, padded with 0, mean-pooled

    @property
    def multi(self) -> bool:
        return self.max_len > 1


@dataclass(frozen=True)
class FeatureSpec:
    """Slot layout of the user, item and context groups (shared by data and models)."""

    user: tuple[Field, ...]
    item: tuple[Field, ...]
    context: tuple[Field, ...] = ()
    max_hist_len: int = 10
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def group(self, name: str) -> tuple[Field, ...]:
        return {"user": self.user, "item": self.item, "context": self.context}[name]

    @staticmethod
    def n_slots(fields: tuple[Field, ...]) -> int:
        return sum(f.max_len for f in fields)

    @property
    def n_fields(self) -> int:
        return len(self.user) + len(self.item) + len(self.context)

    def to_dict(self) -> dict:
        def g(fs: tuple[Field, ...]) -> list[dict]:
            return [{"name": f.name, "vocab_size": f.vocab_size, "max_len": f.max_len} for f in fs]

        return {"user": g(self.user), "item": g(self.item), "context": g(self.context),
                "max_hist_len": self.max_hist_len}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        def g(key: str) -> tuple[Field, ...]:
            return tuple(Field(x["name"], int(x["vocab_size"]), int(x.get("max_len", 1))) for x in d.get(key, []))

        return cls(user=g("user"), item=g("item"), context=g("context"),
                   max_hist_len=int(d.get("max_hist_len", 10)))


class Batch(NamedTuple):
    user: Tensor
    item: Tensor
    context: Tensor
    hist: Tensor
    hist_mask: Tensor
    hist_label: Tensor
    label: Tensor
    user_id: Tensor

    @property
    def size(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    def select(self, idx: Tensor | slice) -> Batch:
        """Rows ``idx`` of every tensor (leading dimension)."""
        return Batch(*(take_rows(t, idx) for t in self))


def move(item, device: torch.device | str):
    """``item`` (a Batch, a tensor, a (named) tuple of them, or anything else) on ``device``."""
    if isinstance(item, Batch):
        return item.to(device)
    if isinstance(item, Tensor):
        return item.to(device, non_blocking=True)
    if isinstance(item, tuple):
        moved = [move(x, device) for x in item]
        return type(item)(*moved) if hasattr(item, "_fields") else tuple(moved)
    return item
