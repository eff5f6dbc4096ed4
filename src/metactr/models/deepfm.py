"""DeepFM (Guo et al., IJCAI 2017)."""

from __future__ import annotations

import torch
from torch import nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, flat_fields, fm_pairwise, n_flat_fields
from metactr.models.layers import MLP, FieldEmbedding


@register("deepfm")
class DeepFM(CTRModel):
    """DeepFM: an FM and a DNN that share one embedding, their logits summed (Guo et al. 2017).

    ``logit = b + sum_i w_i + sum_{i<j} <v_i, v_j> + DNN([v_1; ...; v_F])``. Fields as in
    ``interactions.flat_fields`` (user, context, target item, and the session as mean-pooled
    history fields when ``use_history``). The first-order weight ``w`` of each feature value is
    stored as one extra column of the embedding table (``[v | w]``, dim ``embed_dim + 1``): one
    lookup and one embedding backward instead of two, about 20% faster per training step on CPU.
    Groups: ``emb`` = ``embedding`` (vectors and first-order weights), ``mlp`` = DNN + output
    ``bias``. The FM part has no parameters of its own, so there is no ``interaction`` group.
    """

    paper = "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction (Guo et al., IJCAI 2017)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding",), "mlp": ("mlp", "bias")}
    l2_prefixes = ("mlp",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: tuple[int, ...] = (256, 128),
                 activation: str = "relu", dropout: float = 0.0, use_history: bool = True,
                 emb_init_std: float = 1e-4, **loss_kw) -> None:
        check_hparams("deepfm", embed_dim=embed_dim, hidden=hidden, dropout=dropout)
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, embed_dim + 1, init_std=emb_init_std)  # [v | w]
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(n_flat_fields(spec, use_history) * embed_dim, tuple(hidden), activation=activation,
                       dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        vw = flat_fields(self.embedding, batch, self.use_history)  # [B, F, D+1]
        v, w = vw.split([vw.shape[-1] - 1, 1], dim=-1)  # split: one cat in backward, not two zero-fills
        w = w.squeeze(-1)
        deep = self.mlp(v.flatten(-2)).squeeze(-1)
        logit = self.bias + w.sum(dim=-1) + fm_pairwise(v) + deep
        return ModelOutput(logit, self.no_aux(batch))
