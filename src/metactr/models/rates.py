"""Strong simple baselines: smoothed click rates, alone (``popularity``) or in a logistic
regression with the session's labels (``rates_lr``).

Both are pure functions of (parameters, batch) like every model here: the click *counts* are
non-trainable buffers (``item_clicks``, ``item_views``, ``user_clicks``, ``user_views``,
``global_rate``), set once before training and never touched by ``forward``; the few weights
are trainable parameters (group ``mlp``), so the plain trainer, the meta strategies and
``torch.func`` treat them like any other model. A smoothed rate is

    rate = (clicks + m * g) / (views + m),   g = the counted rows' click rate, m = prior_strength

and a feature is its logit. Where the counts come from:

* ``stats_from: <prepared dir>`` (+ ``stats_splits``, default every split whose name ends in
  ``train``: ``train``, or ``wc_train`` + ``cw_train``; name the subset's own, ``[wc_train]``, so
  that the prior ``g`` is the subset's click rate (the counts would not mix: WC and CW share no
  user or item)): the counts are read when the model is built, which is what
  ``metactr train`` needs (``model.params.stats_from``). A checkpoint stores the counts with the
  weights; rebuilding it reads ``stats_from`` again, then the stored counts replace those.
* ``Model.fit_stats(dataset, splits)`` / ``model.use_stats(dataset, splits)`` from a loaded
  ``PreparedDataset`` (what a benchmark driver calls).

The counted rows are the training rows, so in training mode each row's own label is taken out
of its item's and user's counts (leave-one-out, ``leave_one_out``): otherwise the weights would
learn to trust a rate that contains the label it predicts, most of all for items with few rows
(cold items). Evaluation rows are not counted and see the full counts.

Refit through FT-A/B/C (our choice): at each fine-tuning stage the counts are recomputed from
train plus the FT splits seen so far, ``model.use_stats(dataset, ["wc_train", "wc_finetune_a"])``
(an item first seen in FT-A then has a rate at FT-B); the weights may then be fine-tuned on the
FT rows like any model's parameters. Counting is exact and order-free, so this is the
"fine-tuning" of a count model. ``use_stats`` copies into the buffers outside ``forward``.

Session features (``rates_lr``): the mean label of the session (``hist_label`` under
``hist_mask``) and of its last ``recent`` items, each smoothed towards ``g`` with
``session_prior`` pseudo-rows (an empty session gives ``g``). They come from the target's own
history, so from data before the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.errors import ConfigError, DataError
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.utils import expand_path

RATE_FEATURES = ("user", "item", "session", "recent")
_CLIP = 1e-4


def _id_slot(fields: Sequence[Field], name: str) -> tuple[int, int]:
    """(slot index, vocabulary size) of the id field ``name``, else of the group's first field."""
    slot = 0
    for f in fields:
        if f.name == name:
            return slot, f.vocab_size
        slot += f.max_len
    if not fields:
        raise ConfigError(f"the rate baselines need a '{name}' field (data.use_ids: true)", field="data.use_ids")
    return 0, fields[0].vocab_size


def _expand(text: str) -> Path:
    return expand_path(text, field="model.params.stats_from")


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(_CLIP, 1 - _CLIP)
    return torch.log(p) - torch.log1p(-p)


class RateModel(CTRModel):
    """Shared part: the count buffers, how they are set, and the smoothed rates of a batch."""

    param_group_prefixes = {"mlp": ("weight", "bias")}

    def __init__(self, spec: FeatureSpec, *, prior_strength: float = 20.0, stats_from: str | None = None,
                 stats_splits: Sequence[str] | None = None, leave_one_out: bool = True, **loss_kw) -> None:
        if not prior_strength > 0:
            raise ConfigError(f"prior_strength must be > 0, got {prior_strength}", field="model.params.prior_strength")
        super().__init__(spec, **loss_kw)
        self.prior_strength = float(prior_strength)
        self.leave_one_out = bool(leave_one_out)
        self.item_slot, n_items = _id_slot(spec.item, "item_id")
        _, n_users = _id_slot(spec.user, "user_id")
        for name, n in (("item_clicks", n_items), ("item_views", n_items), ("user_clicks", n_users),
                        ("user_views", n_users)):
            self.register_buffer(name, torch.zeros(n))
        self.register_buffer("global_rate", torch.full((1,), 0.5))
        if stats_from is not None:
            from metactr.data.stats import click_counts

            c = click_counts(_expand(stats_from), list(stats_splits) if stats_splits is not None else None)
            self.set_counts(c["user_id"], c["item_id"], c["label"])

    # ---------------------------------------------------------------- setting the counts
    @torch.no_grad()
    def set_counts(self, user_id, item_id, label) -> CTRModel:
        """Replace the counts by those of these rows (arrays or tensors of one length)."""
        u, i = (torch.as_tensor(np.asarray(x), dtype=torch.long).reshape(-1) for x in (user_id, item_id))
        y = torch.as_tensor(np.asarray(label), dtype=torch.float64).reshape(-1)
        if not (len(u) == len(i) == len(y)):
            raise DataError(f"counts need one user, item and label per row ({len(u)}, {len(i)}, {len(y)})")
        for ids, buf, what in ((u, self.user_views, "user"), (i, self.item_views, "item")):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= buf.numel()):
                raise DataError(f"{what} id {int(ids.max())} outside the model's vocabulary ({buf.numel()})",
                                field=f"{what}_id")
        dev = self.item_views.device
        for ids, clicks, views in ((u, self.user_clicks, self.user_views), (i, self.item_clicks, self.item_views)):
            n = views.numel()
            views.copy_(torch.bincount(ids, minlength=n).to(dev, views.dtype))
            clicks.copy_(torch.bincount(ids, weights=y, minlength=n).to(dev, clicks.dtype))
        self.global_rate.fill_(float(y.mean()) if len(y) else 0.5)
        return self

    @staticmethod
    def fit_stats(dataset, splits: Sequence[str]) -> dict[str, Tensor]:
        """The rows to count: ``user_id``, ``item_id``, ``label`` of ``splits`` of a PreparedDataset."""
        parts = [dataset.split(s) for s in splits]
        if not parts:
            raise DataError("no splits to count clicks from", field="stats_splits")
        return {"user_id": torch.cat([p.user_id for p in parts]), "item_id": torch.cat([p.target for p in parts]),
                "label": torch.cat([p.label for p in parts])}

    def use_stats(self, dataset, splits: Sequence[str]) -> CTRModel:
        """Count clicks of ``splits`` of ``dataset`` (train, then train + FT-A ... to refit)."""
        s = self.fit_stats(dataset, splits)
        return self.set_counts(s["user_id"], s["item_id"], s["label"])

    # ---------------------------------------------------------------- features
    def _rate(self, clicks: Tensor, views: Tensor, batch: Batch) -> Tensor:
        if self.training and self.leave_one_out:  # the row is one of the counted rows
            clicks = (clicks - batch.label).clamp_min(0)
            views = (views - 1).clamp_min(0)
        m, g = self.prior_strength, self.global_rate
        return (clicks + m * g) / (views + m)

    def item_rate(self, batch: Batch) -> Tensor:
        item = batch.item[..., self.item_slot]
        return self._rate(self.item_clicks[item], self.item_views[item], batch)

    def user_rate(self, batch: Batch) -> Tensor:
        u = batch.user_id
        return self._rate(self.user_clicks[u], self.user_views[u], batch)


@register("popularity")
class Popularity(RateModel):
    """Popularity: the target item's smoothed click rate, ``logit = a * logit(rate) + b``
    (a = 1, b = 0 at start; training only calibrates, the ranking is the rate's)."""

    paper = "Smoothed item click rate (the popularity baseline)"
    uses_history = False

    def __init__(self, spec: FeatureSpec, **kw) -> None:
        super().__init__(spec, **kw)
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> ModelOutput:
        logit = self.weight * _logit(self.item_rate(batch)) + self.bias
        return ModelOutput(logit, self.no_aux(batch))


@register("rates_lr")
class RatesLR(RateModel):
    """Logistic regression on the logits of four smoothed rates: the user's click rate, the
    target item's, the session's mean label and its last ``recent`` labels' mean (``features``
    picks a subset, in this order). Weights start at 1 / (number of features)."""

    paper = "Logistic regression on smoothed user / item / session / recent click rates"
    uses_history = True

    def __init__(self, spec: FeatureSpec, *, features: Sequence[str] = RATE_FEATURES, recent: int = 5,
                 session_prior: float = 1.0, **kw) -> None:
        features = tuple(features)
        bad = [f for f in features if f not in RATE_FEATURES]
        if bad or not features or len(set(features)) != len(features):
            raise ConfigError(f"features must be distinct names among {list(RATE_FEATURES)}, got {list(features)}",
                              field="model.params.features")
        if recent < 1 or not session_prior > 0:
            raise ConfigError("need recent >= 1 and session_prior > 0", field="model.params.recent")
        super().__init__(spec, **kw)
        self.features, self.recent, self.session_prior = features, int(recent), float(session_prior)
        self.weight = nn.Parameter(torch.full((len(features),), 1.0 / len(features)))
        self.bias = nn.Parameter(torch.zeros(1))

    def session_rates(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Smoothed mean label of the whole session and of its last ``recent`` items."""
        mask = batch.hist_mask.to(batch.hist_label.dtype)
        lab = batch.hist_label * mask
        n = mask.sum(-1)
        pos = torch.arange(mask.shape[-1], device=mask.device)
        last = mask * (pos >= (n[..., None] - self.recent)).to(mask.dtype)  # sessions are left-aligned
        m, g = self.session_prior, self.global_rate
        whole = (lab.sum(-1) + m * g) / (n + m)
        recent = ((lab * last).sum(-1) + m * g) / (last.sum(-1) + m)
        return whole, recent

    def forward(self, batch: Batch) -> ModelOutput:
        cols = {}
        if "user" in self.features:
            cols["user"] = self.user_rate(batch)
        if "item" in self.features:
            cols["item"] = self.item_rate(batch)
        if "session" in self.features or "recent" in self.features:
            cols["session"], cols["recent"] = self.session_rates(batch)
        x = _logit(torch.stack([cols[f] for f in self.features], dim=-1))
        return ModelOutput((x * self.weight).sum(-1) + self.bias, self.no_aux(batch))
