"""Field-aware Factorization Machine (Juan et al., RecSys 2016)."""

from __future__ import annotations

import torch
from torch import nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import FFMInteraction, check_hparams, flat_fields, n_flat_fields
from metactr.models.layers import FieldEmbedding


@register("ffm")
class FFM(CTRModel):
    """FFM: ``logit = b + sum_i w_i + sum_{i<j} <v_{i,f_j}, v_{j,f_i}>`` (Juan et al. 2016).

    Each feature value has one k-dim vector per field it can meet, stored as a ``FieldEmbedding``
    of dim ``n_fields * k`` (``[..., i, j*k:(j+1)*k]`` = field i's vector for field j). The paper
    has no bias/linear term; like libffm-derived CTR libraries we add them (set
    ``linear_term=False`` for the paper's form). Multi-valued and history fields enter as the
    mean of their values' vectors (see ``interactions``). Groups: ``emb`` = ``embedding`` +
    ``linear``, ``mlp`` = output ``bias``.
    """

    paper = "Field-aware Factorization Machines in a Real-world Online Advertising System (Juan et al., RecSys 2016)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "linear"), "mlp": ("bias",)}
    l2_prefixes = ("embedding", "linear")

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 4, use_history: bool = True,
                 linear_term: bool = True, emb_init_std: float = 1e-2, **loss_kw) -> None:
        check_hparams("ffm", embed_dim=embed_dim)
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.linear_term = linear_term
        self.k = embed_dim
        self.n_fields = n_flat_fields(spec, use_history)
        self.embedding = FieldEmbedding(spec, self.n_fields * embed_dim, init_std=emb_init_std)
        if linear_term:  # only built when used, so that every parameter gets a gradient
            self.linear = FieldEmbedding(spec, 1, init_std=1e-4)
        self.bias = nn.Parameter(torch.zeros(1))
        self.interaction = FFMInteraction(self.n_fields)

    def forward(self, batch: Batch) -> ModelOutput:
        v = flat_fields(self.embedding, batch, self.use_history)  # [B, F, F*k]
        v = v.unflatten(-1, (self.n_fields, self.k))  # [B, F, F, k]
        logit = self.bias + self.interaction(v)
        if self.linear_term:
            logit = logit + flat_fields(self.linear, batch, self.use_history).sum(dim=(-2, -1))
        return ModelOutput(logit, self.no_aux(batch))
