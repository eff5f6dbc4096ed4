"""Basic deep model: embeddings + MLP (the RML paper's "Basic" baseline)."""

from __future__ import annotations

import torch

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.layers import MLP, FieldEmbedding, masked_mean


@register("basic")
class Basic(CTRModel):
    """Embedding + MLP. The session (when ``use_history``) is mean-pooled over valid items and
    concatenated, as in the Basic model of the DIN/RML baselines."""

    paper = "Embedding&MLP baseline (Zhou et al., DIN, KDD 2018, sec. 4.1)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding",), "mlp": ("mlp",)}
    l2_prefixes = ("mlp",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: tuple[int, ...] = (200, 80),
                 activation: str = "relu", dropout: float = 0.0, use_history: bool = True,
                 emb_init_std: float = 1e-4, **loss_kw) -> None:
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        n_item = len(spec.item)
        in_dim = embed_dim * (len(spec.user) + len(spec.context) + n_item * (2 if use_history else 1))
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        parts = [self.embedding(batch.user, "user").flatten(-2),
                 self.embedding(batch.context, "context").flatten(-2),
                 self.embedding(batch.item, "item").flatten(-2)]
        if self.use_history:
            hist = self.embedding(batch.hist, "item").flatten(-2)  # [B, L, Fi*D]
            parts.append(masked_mean(hist, batch.hist_mask, dim=-2))
        logit = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        return ModelOutput(logit, self.no_aux(batch))
