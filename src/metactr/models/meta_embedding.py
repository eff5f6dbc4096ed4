"""Meta-Embedding (Pan et al., SIGIR 2019, "Warm Up Cold-start Advertisements: Improving CTR
Predictions via Learning to Learn ID Embeddings"), on top of any registered base CTR model.

A new item's id embedding is untrained, so the base model scores it badly. Meta-Embedding learns
a *generator* that maps the item's other features (the base model's own, frozen, vectors of its
rate, year, genres, directors...) to an initial id embedding, trained with a two-phase meta loss
on items simulated as new (``cold_warm_losses``):

    phi      = G(item features)                         (cold start: the generated embedding)
    l_a      = loss of the frozen base on minibatch D_a of the item, id embedding = phi
    phi'     = phi - a * d l_a / d phi                  (warm up: one gradient step on phi)
    l_b      = loss on another minibatch D_b of the item, id embedding = phi'
    L_meta   = alpha * l_a + (1 - alpha) * l_b          (only G is updated)

At deployment the generated vector is written into the id table row of each cold item
(``install``) and then trained as usual: in the RML protocol that is the FT-A/B/C fine-tuning.
The training procedure (pre-train base, meta-train G, install) is
``metactr.strategies.cold_start.train_meta_embedding``.

``forward`` is the base model's (a pure function of (params, batch)); ``cold_warm_losses``
computes the meta loss for a meta-batch of T items at once: the generated vectors are appended
to (a frozen copy of) the table and each task's target id points at its own new row, so each
item's loss depends on its own vector only and one gradient gives every item's own warm-up step
(no per-item loop).

Deviations: the generator is one linear layer + ``tanh`` scaled by ``gen_scale`` (a buffer the
trainer sets to the 99th percentile of |trained warm id embeddings|, so that generated vectors
live on the same scale as learned ones); with a DeepFM base the generated row includes DeepFM's
first-order weight (it is a column of the same table). Groups: the base's own (prefixed with
``base.``) + ``generator``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.base import CTRModel, ModelOutput, build_model, objective, register
from metactr.models.layers import FieldEmbedding

LOSS_KEYS = ("logloss_weight", "l2_weight", "aux_weight")


@register("meta_embedding")
class MetaEmbedding(CTRModel):
    """Base CTR model + id-embedding generator (Pan et al. 2019); see the module docstring."""

    paper = ("Warm Up Cold-start Advertisements: Improving CTR Predictions via Learning to Learn ID "
             "Embeddings (Pan et al., SIGIR 2019)")
    uses_history = True  # as the default base (basic); set from the base in __init__

    def __init__(self, spec: FeatureSpec, *, base: str = "basic", item_id_field: str = "item_id",
                 **kw: Any) -> None:
        loss_kw = {k: kw.pop(k) for k in LOSS_KEYS if k in kw}
        super().__init__(spec, **loss_kw)
        if base == "meta_embedding":
            raise ConfigError("meta_embedding cannot wrap itself", field="model.base")
        names = [f.name for f in spec.item]
        if item_id_field not in names:
            raise ConfigError(f"meta_embedding needs an item id field '{item_id_field}' (item fields: {names}); "
                              "load the dataset with use_ids=True", field="model.item_id_field")
        self.base = build_model(base, spec, **kw)
        table = getattr(self.base, "embedding", None)
        if not isinstance(table, FieldEmbedding):
            raise ConfigError(f"base model '{base}' has no shared FieldEmbedding 'embedding'", field="model.base")
        j = names.index(item_id_field)
        self.id_slot = sum(f.max_len for f in spec.item[:j])
        self.id_offset = int(table.item_offsets[self.id_slot])
        others = [i for i in range(len(spec.item)) if i != j]
        if not others:
            raise ConfigError("meta_embedding needs item features besides the id", field="model")
        self.register_buffer("other_fields", torch.tensor(others, dtype=torch.long), persistent=False)
        self.generator = nn.Linear(len(others) * table.dim, table.dim)
        self.register_buffer("gen_scale", torch.ones(()))
        self.uses_history = self.base.uses_history
        # the base's groups and L2 set, under the "base." prefix, + the generator
        self.param_group_prefixes = {g: tuple(f"base.{p}" for p in pre)
                                     for g, pre in self.base.param_group_prefixes.items()}
        self.param_group_prefixes["generator"] = ("generator",)
        self.l2_prefixes = tuple(f"base.{p}" for p in self.base.l2_prefixes)

    @property
    def table(self) -> FieldEmbedding:
        return self.base.embedding

    def forward(self, batch: Batch) -> ModelOutput:
        return self.base(batch)

    # ------------------------------------------------------------------ the generator
    def generate(self, item_slots: Tensor) -> Tensor:
        """Generated id embeddings ``[..., D]`` of items given by their slot rows ``[..., Si]``."""
        feats = self.table(item_slots, "item").index_select(-2, self.other_fields).flatten(-2)
        return torch.tanh(self.generator(feats)) * self.gen_scale

    def id_rows(self, item_slots: Tensor) -> Tensor:
        """Rows of the shared table that hold the id embeddings of these items."""
        return item_slots[..., self.id_slot] + self.id_offset

    def cold_warm_losses(self, item_slots: Tensor, a: Batch, a_weight: Tensor, b: Batch, b_weight: Tensor,
                         warm_lr: float) -> tuple[Tensor, Tensor]:
        """(l_a, l_b) of the meta loss for T items ``item_slots [T, Si]``; ``a``/``b`` are their
        minibatches (rows whose target is the task's item) with a leading task dim ``[T, S]`` and
        weights ``[T, S]`` (0 = padding). Each item's rows are averaged first, then the items.

        The T generated vectors are appended to the frozen table and each task's *target* id is
        pointed at its own appended row, so the vector of item t enters only item t's rows (a
        session item keeps its trained row even when it is another task's item)."""
        T = item_slots.shape[0]
        phi = self.generate(item_slots)  # [T, D]
        frozen = self.table.weight.detach()
        new_ids = frozen.shape[0] - self.id_offset + torch.arange(T, device=item_slots.device)

        def loss_with(vectors: Tensor, batch: Batch, weight: Tensor) -> Tensor:
            w = weight / weight.sum(-1, keepdim=True).clamp_min(1e-12)
            item = batch.item.clone()
            item[..., self.id_slot] = new_ids[:, None]
            flat = Batch(*(t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for t in batch._replace(item=item)))
            params = {"base.embedding.weight": torch.cat([frozen, vectors.to(frozen.dtype)], dim=0)}
            return objective(self, params, flat, w.reshape(-1))[0]

        l_a = loss_with(phi, a, a_weight)
        # T * l_a = sum of per-item mean losses: its gradient w.r.t. phi_t is item t's own gradient
        (g,) = torch.autograd.grad(l_a * T, phi, create_graph=True)
        l_b = loss_with(phi - warm_lr * g, b, b_weight)
        return l_a, l_b

    @torch.no_grad()
    def install(self, item_slots: Tensor) -> int:
        """Write the generated embeddings of these items into their id rows; returns how many."""
        if item_slots.numel() == 0:
            return 0
        self.table.weight[self.id_rows(item_slots)] = self.generate(item_slots).to(self.table.weight.dtype)
        return int(item_slots.shape[0])

    @torch.no_grad()
    def set_scale_from(self, item_slots: Tensor, quantile: float = 0.99) -> float:
        """Set ``gen_scale`` to the ``quantile`` of |id embedding| over these (trained) items."""
        if item_slots.numel():
            vals = self.table.weight[self.id_rows(item_slots)].abs().flatten().float()
            scale = float(torch.quantile(vals[: 2**24], quantile))
            if scale > 0:
                self.gen_scale.fill_(scale)
        return float(self.gen_scale)
