"""Logistic regression: a bias plus one learned weight per feature value."""

from __future__ import annotations

import torch
from torch import nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import flat_fields
from metactr.models.layers import FieldEmbedding


@register("lr")
class LR(CTRModel):
    """Logistic regression, ``logit = b + sum_fields w_field(value)``.

    The first-order weights are a ``FieldEmbedding`` of dim 1, so a multi-valued field (genres)
    contributes the mean weight of its values and, with ``use_history``, each item field of the
    session contributes the mean weight of the session's values (sharing the item weights). The
    classic sparse LR used by MetaSelector is trained with FTRL; here the optimizer is the
    trainer's choice. Groups: ``emb`` = the weights (``linear``), ``mlp`` = the output ``bias``.
    """

    paper = "Logistic regression (McMahan et al., 'Ad click prediction: a view from the trenches', KDD 2013)"
    uses_history = True
    param_group_prefixes = {"emb": ("linear",), "mlp": ("bias",)}
    l2_prefixes = ("linear",)

    def __init__(self, spec: FeatureSpec, *, use_history: bool = True, emb_init_std: float = 1e-4,
                 **loss_kw) -> None:
        super().__init__(spec, **loss_kw)
        self.use_history = use_history
        self.linear = FieldEmbedding(spec, 1, init_std=emb_init_std)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> ModelOutput:
        w = flat_fields(self.linear, batch, self.use_history)  # [B, F, 1]
        logit = self.bias + w.sum(dim=(-2, -1))
        return ModelOutput(logit, self.no_aux(batch))
