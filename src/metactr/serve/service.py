"""Per-user fast adaptation at serving time.

A ``CTRService`` holds a trained model, the prepared dataset's feature tables and vocabularies
(raw id -> code; unknown ids map to code 1, never crash). ``predict`` scores candidate items for a
user given the user's recent session; ``adapt`` takes a user's latest labelled interactions,
builds sliding-window samples from them exactly like the training sessions, runs a few steps of
``fast_adapt`` on the chosen parameter groups (RML's ``meta`` group by default) and caches the
adapted tensors for that user (LRU). Later ``predict`` calls for the user use them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor
from torch.func import functional_call

from metactr.data.batch import Batch
from metactr.data.encode import load_vocabs
from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError, DataError
from metactr.engine.functional import fast_adapt
from metactr.train.checkpoint import load_model


def _as_number(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None  # not a number: cannot be a known id of a numeric vocabulary


@dataclass(frozen=True)
class Interaction:
    item: str | int
    label: int


class CTRService:
    def __init__(self, checkpoint: str | Path, prepared_dir: str | Path, *, adapt_groups: Sequence[str] | None = None,
                 adapt_lr: float = 0.01, adapt_steps: int = 3, cache_size: int = 10_000) -> None:
        if adapt_steps < 0 or adapt_lr <= 0 or cache_size < 1:
            raise ConfigError("adapt_steps >= 0, adapt_lr > 0 and cache_size >= 1 are required")
        self.model, self.meta = load_model(checkpoint)
        self.model.eval()
        self.data = PreparedDataset(prepared_dir)
        if self.data.spec.to_dict() != self.model.spec.to_dict():
            raise DataError("the checkpoint was trained on a different feature layout than this prepared "
                            "dataset", path=prepared_dir)
        self.vocabs = load_vocabs(prepared_dir)
        for key in ("user_id", "item_id"):
            if key not in self.vocabs:
                raise DataError(f"prepared dataset has no '{key}' vocabulary", path=Path(prepared_dir) / "vocab")
        groups = self.model.param_groups()
        if adapt_groups is None:
            adapt_groups = ["meta"] if "meta" in groups else [g for g in groups if g != "emb"]
        self.adapt_names = self.model.params_in(*adapt_groups)
        self.adapt_groups = list(adapt_groups)
        self.adapt_lr, self.adapt_steps = adapt_lr, adapt_steps
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._params = {n: p.detach() for n, p in self.model.named_parameters()}

    # ------------------------------------------------------------------ encoding
    def _codes(self, field: str, raw: Sequence) -> np.ndarray:
        """Codes of raw ids given as JSON strings or numbers; anything unseen -> 1 (unknown)."""
        vocab = self.vocabs[field]
        if vocab.raw.dtype == pl.String:
            values = [str(r) for r in raw]
        else:
            values = [_as_number(r) for r in raw]
        return vocab.lookup(pl.Series("v", values, dtype=None if vocab.raw.dtype == pl.String else pl.Float64))

    def _user_row(self, user: str | int) -> Tensor:
        code = int(self._codes("user_id", [user])[0])
        if code >= self.data.user_table.shape[0]:
            code = 1
        return self.data.user_table[code]

    def _item_rows(self, items: Sequence) -> Tensor:
        codes = torch.from_numpy(self._codes("item_id", items).astype(np.int64))
        codes = torch.where(codes < self.data.item_table.shape[0], codes, torch.ones_like(codes))
        return codes

    def _batch(self, user, targets: Tensor, labels: Tensor, hist_codes: Tensor, hist_labels: Tensor) -> Batch:
        """targets [B] codes, hist_codes [B, L] codes (0 = padding)."""
        B = targets.shape[0]
        mask = hist_codes > 0
        return Batch(user=self._user_row(user).expand(B, -1), item=self.data.item_table[targets],
                     context=torch.zeros(B, len(self.data.spec.context), dtype=torch.long),
                     hist=self.data.item_table[hist_codes], hist_mask=mask,
                     hist_label=hist_labels.float() * mask, label=labels.float(),
                     user_id=torch.full((B,), int(self._codes("user_id", [user])[0])))

    def _history(self, history: Sequence[Interaction]) -> tuple[Tensor, Tensor]:
        L = self.data.spec.max_hist_len
        recent = list(history)[-L:]
        codes = torch.zeros(L, dtype=torch.long)
        labels = torch.zeros(L)
        if recent:
            codes[: len(recent)] = self._item_rows([h.item for h in recent])
            labels[: len(recent)] = torch.tensor([float(h.label) for h in recent])
        return codes, labels

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def predict(self, user: str | int, items: Sequence, history: Sequence[Interaction] = ()) -> list[float]:
        if not items:
            return []
        targets = self._item_rows(items)
        hc, hl = self._history(history)
        B = targets.shape[0]
        batch = self._batch(user, targets, torch.zeros(B), hc.expand(B, -1), hl.expand(B, -1))
        with self._lock:
            adapted = self._cache.get(str(user))
            if adapted is not None:
                self._cache.move_to_end(str(user))
        params = self._params if adapted is None else {**self._params, **adapted}
        out = functional_call(self.model, params, (batch,))
        return torch.sigmoid(out.logit).tolist()

    def adapt(self, user: str | int, interactions: Sequence[Interaction],
              history: Sequence[Interaction] = ()) -> dict:
        """Fast-adapt to the user's latest labelled interactions (oldest first)."""
        if not interactions:
            raise DataError("adapt needs at least one labelled interaction", field="interactions")
        bad = [i for i, x in enumerate(interactions) if x.label not in (0, 1)]
        if bad:
            raise DataError(f"label must be 0 or 1, got {interactions[bad[0]].label!r}",
                            field=f"interactions[{bad[0]}].label")
        L = self.data.spec.max_hist_len
        seq = list(history) + list(interactions)
        codes = self._item_rows([x.item for x in seq])
        labels = torch.tensor([float(x.label) for x in seq])
        n_prev, n = len(history), len(seq)
        # sliding windows: sample j has target seq[j] and session seq[j-L:j] (left-aligned)
        j = torch.arange(n_prev, n)
        offs = torch.arange(L)
        start = (j - L).clamp_min(0)
        pos = start[:, None] + offs[None, :]
        valid = pos < j[:, None]
        hist_codes = torch.where(valid, codes[pos.clamp_max(n - 1)], torch.zeros_like(pos))
        hist_labels = torch.where(valid, labels[pos.clamp_max(n - 1)], torch.zeros(()))
        support = self._batch(user, codes[j], labels[j], hist_codes, hist_labels)
        adapted = fast_adapt(self.model, support, names=self.adapt_names, lr=self.adapt_lr,
                             steps=self.adapt_steps, params=self._params)
        with self._lock:
            self._cache[str(user)] = {n: adapted[n] for n in self.adapt_names}
            self._cache.move_to_end(str(user))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return {"user": str(user), "samples": int(j.numel()), "groups": self.adapt_groups,
                "steps": self.adapt_steps}

    def forget(self, user: str | int) -> bool:
        with self._lock:
            return self._cache.pop(str(user), None) is not None

    def info(self) -> dict:
        return {"model": self.model.name, "adapt_groups": self.adapt_groups, "adapt_lr": self.adapt_lr,
                "adapt_steps": self.adapt_steps, "cached_users": len(self._cache),
                "max_hist_len": self.data.spec.max_hist_len}
