"""Factorization Machine (Rendle, ICDM 2010)."""

from __future__ import annotations

import torch
from torch import nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, flat_fields, fm_pairwise
from metactr.models.layers import FieldEmbedding


@register("fm")
class FM(CTRModel):
    """FM: ``logit = b + sum_i w_i + sum_{i<j} <v_i, v_j>`` over the fields (Rendle 2010).

    Pairwise term by the square-of-sum trick (eq. 5). Deviation from the one-hot formulation: a
    multi-valued field (and, with ``use_history``, each history field) enters as the mean of its
    values' vectors, i.e. as one field whose feature values are 1/n each. Groups: ``emb`` =
    ``embedding`` + first-order ``linear`` weights, ``mlp`` = output ``bias``.
    """

    paper = "Factorization Machines (Rendle, ICDM 2010)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "linear"), "mlp": ("bias",)}
    l2_prefixes = ("embedding", "linear")

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, use_history: bool = True,
                 emb_init_std: float = 1e-2, **loss_kw) -> None:
        check_hparams("fm", embed_dim=embed_dim)
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        self.linear = FieldEmbedding(spec, 1, init_std=1e-4)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> ModelOutput:
        v = flat_fields(self.embedding, batch, self.use_history)
        w = flat_fields(self.linear, batch, self.use_history)
        logit = self.bias + w.sum(dim=(-2, -1)) + fm_pairwise(v)
        return ModelOutput(logit, self.no_aux(batch))
