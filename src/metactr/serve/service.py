"""Per-user fast adaptation at serving time, safe under concurrency by construction.

A ``CTRService`` holds a trained model, the prepared dataset's feature tables and vocabularies
(raw id -> code; unknown ids map to code 1, never crash). ``predict`` scores candidate items for a
user given the user's recent session; ``adapt`` takes a user's latest labelled interactions,
builds sliding-window samples from them exactly like the training sessions, runs a few steps of
``fast_adapt`` on the chosen parameter groups (RML's ``meta`` group by default) and caches the
adapted tensors for that user (LRU). Later ``predict`` calls for the user use them.

Concurrency. Scoring is a pure function of a per-request parameter mapping: ``functional_call``
with the trained tensors, or the user's cached mapping. ``torch.func.functional_call`` does,
however, swap those tensors into the module it is given for the duration of the call, so two
threads must never run it on the same module object. The service therefore never calls the
loaded module itself: every forward/backward runs on a *replica* leased from a pool (``workers``
structural copies that share the trained parameter tensors, no copy of the weights), and a replica
is only ever in one thread's hands (``with self._pool.lease() as model``). The per-user cache
holds read-only mappings (``MappingProxyType``) of tensors that are never written in place; it is
read and updated under a lock. Hence no request can change another user's scores or see a module
mid-swap, whatever the HTTP layer's threading.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metactr.data.batch import Batch
from metactr.data.encode import FIRST_CODE, UNKNOWN, Vocab, load_vocabs
from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError, DataError
from metactr.engine.functional import fast_adapt
from metactr.train.checkpoint import load_model


@dataclass(frozen=True)
class Interaction:
    item: str | int
    label: int


class IdIndex:
    """Raw ids -> codes for one vocabulary, vectorized (a sorted array and ``searchsorted``).

    Ids may be JSON strings or integers: a string vocabulary takes integers as their decimal
    string; an integer vocabulary takes strings holding an integer. Anything else, and any id
    not in the vocabulary, maps to ``UNKNOWN``.
    """

    def __init__(self, vocab: Vocab) -> None:
        self.is_str = vocab.raw.dtype == pl.String
        raw = vocab.raw.to_numpy()
        raw = raw.astype(str) if self.is_str else raw.astype(np.int64)
        order = np.argsort(raw, kind="stable")  # Vocab sorts its values; do not rely on it
        self._sorted = raw[order]
        self._codes = (order + FIRST_CODE).astype(np.int64)

    def codes(self, values: Sequence) -> np.ndarray:
        if len(values) == 0 or len(self._sorted) == 0:
            return np.full(len(values), UNKNOWN, dtype=np.int64)
        arr = np.asarray(values)  # all ints -> int64; any string present -> a unicode array of all
        if self.is_str:
            arr = arr.astype(str)
        elif arr.dtype.kind in "US":
            arr = self._int_strings(arr)
        elif arr.dtype.kind not in "iu":
            return np.full(len(values), UNKNOWN, dtype=np.int64)
        pos = np.searchsorted(self._sorted, arr)
        pos_c = np.minimum(pos, len(self._sorted) - 1)
        hit = self._sorted[pos_c] == arr
        return np.where(hit, self._codes[pos_c], UNKNOWN)


    @staticmethod
    def _int_strings(arr: np.ndarray) -> np.ndarray:
        """Strings holding integers -> int64, anything else -> a value no vocabulary holds. Plain
        digit strings (the usual JSON ids) convert in NumPy: a Polars cast costs ~0.3 ms a request."""
        if np.char.isdigit(arr).all() and (np.char.str_len(arr) <= 18).all():
            return arr.astype(np.int64)
        return pl.Series(arr).cast(pl.Int64, strict=False).fill_null(np.iinfo(np.int64).min).to_numpy()


class _ModelPool:
    """``size`` replicas of ``model`` that share its parameter and buffer tensors; ``lease``
    hands one replica to one thread at a time (blocking while all are in use)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self._free: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(copy.deepcopy(model, memo=dict(shared)))

    @contextmanager
    def lease(self) -> Iterator[nn.Module]:
        model = self._free.get()
        try:
            yield model
        finally:
            self._free.put(model)


class CTRService:
    def __init__(self, checkpoint: str | Path, prepared_dir: str | Path, *, adapt_groups: Sequence[str] | None = None,
                 adapt_lr: float = 0.01, adapt_steps: int = 3, cache_size: int = 10_000, workers: int = 1) -> None:
        if adapt_steps < 0 or not adapt_lr > 0 or cache_size < 1 or workers < 1:
            raise ConfigError("adapt_steps >= 0, adapt_lr > 0, cache_size >= 1 and workers >= 1 are required")
        model, self.meta = load_model(checkpoint)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the trained tensors are constants here; fast_adapt clones what it adapts
        self.data = PreparedDataset(prepared_dir)
        if self.data.spec.to_dict() != model.spec.to_dict():
            raise DataError("the checkpoint was trained on a different feature layout than this prepared "
                            "dataset", path=prepared_dir)
        vocabs = load_vocabs(prepared_dir)
        for key in ("user_id", "item_id"):
            if key not in vocabs:
                raise DataError(f"prepared dataset has no '{key}' vocabulary", path=Path(prepared_dir) / "vocab")
        self._users, self._items = IdIndex(vocabs["user_id"]), IdIndex(vocabs["item_id"])
        groups = model.param_groups()
        if adapt_groups is None:
            adapt_groups = ["meta"] if "meta" in groups else [g for g in groups if g != "emb"]
        self.adapt_names = model.params_in(*adapt_groups)
        self.adapt_groups = list(adapt_groups)
        self.adapt_lr, self.adapt_steps = adapt_lr, adapt_steps
        self.name, self.max_hist_len, self.workers = model.name, self.data.spec.max_hist_len, workers
        self._pool = _ModelPool(model, workers)  # the loaded module itself is never called
        self._params: Mapping[str, Tensor] = MappingProxyType(dict(model.named_parameters()))
        self._cache: OrderedDict[str, Mapping[str, Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._n_user_rows, self._n_item_rows = self.data.user_table.shape[0], self.data.item_table.shape[0]
        self._context = torch.zeros(1, len(self.data.spec.context), dtype=torch.long)

    # ------------------------------------------------------------------ encoding
    def _codes(self, field: str, raw: Sequence) -> np.ndarray:
        """Codes of raw ids given as JSON strings or numbers; anything unseen -> 1 (unknown)."""
        return {"user_id": self._users, "item_id": self._items}[field].codes(raw)

    def _user_code(self, user: str | int) -> int:
        code = int(self._users.codes([user])[0])
        return code if code < self._n_user_rows else UNKNOWN

    def _item_codes(self, items: Sequence) -> Tensor:
        codes = torch.from_numpy(self._items.codes(items))
        return torch.where(codes < self._n_item_rows, codes, UNKNOWN)

    def _batch(self, user_code: int, targets: Tensor, labels: Tensor, hist_codes: Tensor,
               hist_labels: Tensor) -> Batch:
        """targets [B] codes, hist_codes [B, L] codes (0 = padding), or [L]: one session shared by
        every row, kept as stride-0 views so that the models embed and project it once."""
        B = targets.shape[0]
        mask = hist_codes > 0
        hist, hist_label = self.data.item_table[hist_codes], hist_labels.float() * mask
        if hist_codes.dim() == 1:
            mask, hist = mask.expand(B, -1), hist.expand(B, -1, -1)
            hist_label = hist_label.expand(B, -1)
        return Batch(user=self.data.user_table[user_code].expand(B, -1), item=self.data.item_table[targets],
                     context=self._context.expand(B, -1), hist=hist, hist_mask=mask,
                     hist_label=hist_label, label=labels.float(), user_id=torch.full((B,), user_code))

    def _history(self, history: Sequence[Interaction]) -> tuple[Tensor, Tensor]:
        L = self.max_hist_len
        recent = list(history)[-L:]
        codes = torch.zeros(L, dtype=torch.long)
        labels = torch.zeros(L)
        if recent:
            codes[: len(recent)] = self._item_codes([h.item for h in recent])
            labels[: len(recent)] = torch.tensor([float(h.label) for h in recent])
        return codes, labels

    def _adapted(self, user: str) -> Mapping[str, Tensor] | None:
        with self._lock:
            adapted = self._cache.get(user)
            if adapted is not None:
                self._cache.move_to_end(user)
        return adapted

    # ------------------------------------------------------------------ API
    def predict(self, user: str | int, items: Sequence, history: Sequence[Interaction] = ()) -> list[float]:
        if len(items) == 0:
            return []
        adapted = self._adapted(str(user))
        with torch.inference_mode():
            targets = self._item_codes(items)
            hc, hl = self._history(history)
            B = targets.shape[0]
            batch = self._batch(self._user_code(user), targets, torch.zeros(B), hc, hl)
            with self._pool.lease() as model:
                # a replica's own tensors are the trained ones: only a user's adapted tensors are swapped in
                out = model(batch) if adapted is None else functional_call(model, dict(adapted), (batch,))
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
        L = self.max_hist_len
        seq = list(history) + list(interactions)
        with torch.no_grad():
            codes = self._item_codes([x.item for x in seq])
            labels = torch.tensor([float(x.label) for x in seq])
            n_prev, n = len(history), len(seq)
            # sliding windows: sample j has target seq[j] and session seq[j-L:j] (left-aligned)
            j = torch.arange(n_prev, n)
            start = (j - L).clamp_min(0)
            pos = start[:, None] + torch.arange(L)[None, :]
            valid = pos < j[:, None]
            hist_codes = torch.where(valid, codes[pos.clamp_max(n - 1)], torch.zeros_like(pos))
            hist_labels = torch.where(valid, labels[pos.clamp_max(n - 1)], torch.zeros(()))
            support = self._batch(self._user_code(user), codes[j], labels[j], hist_codes, hist_labels)
        with self._pool.lease() as model:
            adapted = fast_adapt(model, support, names=self.adapt_names, lr=self.adapt_lr,
                                 steps=self.adapt_steps, params=self._params)
        # a fresh read-only mapping of this user's own adapted tensors (the rest are the shared ones)
        mapping = MappingProxyType({k: adapted[k].detach() for k in self.adapt_names})
        key = str(user)
        with self._lock:
            self._cache[key] = mapping
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return {"user": key, "samples": int(j.numel()), "groups": self.adapt_groups, "steps": self.adapt_steps}

    def forget(self, user: str | int) -> bool:
        with self._lock:
            return self._cache.pop(str(user), None) is not None

    def info(self) -> dict:
        with self._lock:
            cached = len(self._cache)
        return {"model": self.name, "adapt_groups": self.adapt_groups, "adapt_lr": self.adapt_lr,
                "adapt_steps": self.adapt_steps, "cached_users": cached, "max_hist_len": self.max_hist_len,
                "workers": self.workers}
