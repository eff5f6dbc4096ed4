"""Wide & Deep (Cheng et al., DLRS 2016)."""

from __future__ import annotations

import torch
from torch import nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, flat_fields, n_flat_fields
from metactr.models.layers import MLP, FieldEmbedding


@register("wide_deep")
class WideDeep(CTRModel):
    """Wide & Deep: a linear model on the sparse fields plus an MLP on their embeddings, trained
    jointly with the logits summed (Cheng et al. 2016).

    Deviation: the paper's wide part also takes hand-made cross-product features; with no
    feature engineering in this project the wide part is the linear model on the raw fields
    (as in DeepCTR's WDL). Groups: ``emb`` = ``embedding`` + wide ``linear`` weights, ``mlp`` =
    deep MLP + output ``bias``.
    """

    paper = "Wide & Deep Learning for Recommender Systems (Cheng et al., DLRS 2016)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "linear"), "mlp": ("mlp", "bias")}
    l2_prefixes = ("mlp", "linear")

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: tuple[int, ...] = (256, 128),
                 activation: str = "relu", dropout: float = 0.0, use_history: bool = True,
                 emb_init_std: float = 1e-4, **loss_kw) -> None:
        check_hparams("wide_deep", embed_dim=embed_dim, hidden=hidden, dropout=dropout)
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        self.linear = FieldEmbedding(spec, 1, init_std=emb_init_std)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(n_flat_fields(spec, use_history) * embed_dim, tuple(hidden), activation=activation,
                       dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        wide = flat_fields(self.linear, batch, self.use_history).sum(dim=(-2, -1))
        deep = self.mlp(flat_fields(self.embedding, batch, self.use_history).flatten(-2)).squeeze(-1)
        return ModelOutput(self.bias + wide + deep, self.no_aux(batch))
