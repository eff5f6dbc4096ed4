"""Deep Interest Evolution Network (Zhou et al., AAAI 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, sequence_inputs
from metactr.models.layers import MLP, FieldEmbedding, TargetAttention, masked_mean
from metactr.models.rnn import AUGRU, GRU


@register("dien")
class DIEN(CTRModel):
    """DIEN: GRU interest extractor + auxiliary loss, target attention on the extracted
    interests, AUGRU interest evolution (Zhou et al. 2019).

    1. Interest extractor: a GRU over the session's item vectors gives states ``h_t``.
    2. Auxiliary loss. The paper supervises ``h_{t-1}`` with the next clicked item ``e_t`` against
       a sampled non-clicked item. Our sessions carry real labels (``hist_label``: the session
       item was liked or not), so instead ``h_{t-1}`` is supervised by the *real* label of item t:
       a small MLP on ``[h_{t-1}, e_t]`` predicts it (logloss). Only pairs where both positions
       are valid count; the per-sample aux loss is the mean over its pairs (0 when it has none)
       and is returned in ``ModelOutput.aux`` (weighted by ``aux_weight``, default 1 as in the paper).
    3. Attention of the target on ``h_t`` (shared ``TargetAttention``, softmax as in the authors'
       code, configurable); 4. AUGRU over ``h_t`` with those weights as the update-gate scale.
    5. ``[user, context, target, mean session item, target * mean item, final AUGRU state]`` -> MLP
       (the authors' input layer, with the masked mean instead of a sum).
    Deviation: Dice with learned gates (no batch statistics). Groups: ``emb``, ``interaction``
    (extractor, auxiliary net, attention, AUGRU, optional query projection), ``mlp``.
    """

    paper = "Deep Interest Evolution Network for Click-Through Rate Prediction (Zhou et al., AAAI 2019)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding",),
                            "interaction": ("extractor", "aux_net", "attention", "evolution", "query_proj"),
                            "mlp": ("mlp",)}
    l2_prefixes = ("mlp",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, gru_hidden: int | None = None,
                 hidden: tuple[int, ...] = (200, 80), activation: str = "dice",
                 att_hidden: tuple[int, ...] = (80, 40), att_activation: str = "sigmoid",
                 attention_mode: str = "softmax", aux_hidden: tuple[int, ...] = (100, 50),
                 dropout: float = 0.0, emb_init_std: float = 1e-4, **loss_kw) -> None:
        check_hparams("dien", embed_dim=embed_dim, hidden=hidden, dropout=dropout, attention_mode=attention_mode,
                      gru_hidden=gru_hidden)
        loss_kw.setdefault("aux_weight", 1.0)
        super().__init__(spec, **loss_kw)
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        item_dim = len(spec.item) * embed_dim
        H = gru_hidden or item_dim
        self.extractor = GRU(item_dim, H)
        self.aux_net = MLP(H + item_dim, tuple(aux_hidden), activation="sigmoid")
        if H != item_dim:  # the target must live in the state space to attend on it
            self.query_proj = nn.Linear(item_dim, H)
        self.attention = TargetAttention(H, tuple(att_hidden), activation=att_activation, mode=attention_mode)
        self.evolution = AUGRU(H, H)
        in_dim = embed_dim * (len(spec.user) + len(spec.context)) + 3 * item_dim + H
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout)

    def aux_loss(self, states: Tensor, items: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """Per-sample mean logloss of predicting item t's label from ``[h_{t-1}, e_t]``."""
        logit = self.aux_net(torch.cat([states[..., :-1, :], items[..., 1:, :]], dim=-1)).squeeze(-1)
        valid = (mask[..., 1:] & mask[..., :-1]).to(logit.dtype)
        ll = F.binary_cross_entropy_with_logits(logit, labels[..., 1:], reduction="none")
        return (ll * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)

    def forward(self, batch: Batch) -> ModelOutput:
        mask = batch.hist_mask
        other, target, hist = sequence_inputs(self.embedding, batch)
        states, _ = self.extractor(hist, mask)
        aux = self.aux_loss(states, hist, batch.hist_label, mask)
        query = self.query_proj(target) if hasattr(self, "query_proj") else target
        _, att = self.attention(query, states, mask)
        _, final = self.evolution(states, mask, att)
        mean_item = masked_mean(hist, mask, dim=-2)
        x = torch.cat([other, target, mean_item, target * mean_item, final], dim=-1)
        return ModelOutput(self.mlp(x).squeeze(-1), aux)
