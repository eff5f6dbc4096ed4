"""Deep Interest Network (Zhou et al., KDD 2018)."""

from __future__ import annotations

import torch

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, sequence_inputs
from metactr.models.layers import MLP, FieldEmbedding, HistoryLabels, TargetAttention


@register("din")
class DIN(CTRModel):
    """DIN: the target item attends over the session (local activation unit), the weighted sum
    of session items joins the user, context and target embeddings in a Dice MLP (Zhou et al. 2018).

    An item is the concatenation of its field vectors (id, genres, ... as DIN concatenates
    goods/shop/category). Attention: the shared ``TargetAttention`` on ``[q, k, q-k, q*k]``
    (the paper's out-product is replaced by ``q*k``, as in the authors' code); ``attention_mode
    ='weights'`` keeps DIN's unnormalized weights, ``'softmax'`` normalizes them (the query half of
    its first layer is computed once per sample, see ``TargetAttention.forward``). Deviations:
    Dice uses learned gates instead of batch statistics (see ``layers.Dice``); the
    mini-batch-aware regularizer is replaced by the shared L2 on ``l2_prefixes`` (set
    ``l2_weight``). ``label_aware``: session items joined with their known labels
    (``layers.HistoryLabels``; a control of issue 15, not in the paper). Groups: ``emb``, ``interaction`` (attention MLP), ``mlp`` (output MLP).
    """

    paper = "Deep Interest Network for Click-Through Rate Prediction (Zhou et al., KDD 2018)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "label_embedding"), "interaction": ("attention",), "mlp": ("mlp",)}
    l2_prefixes = ("mlp", "attention")

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: tuple[int, ...] = (200, 80),
                 activation: str = "dice", att_hidden: tuple[int, ...] = (80, 40),
                 att_activation: str = "dice", attention_mode: str = "weights", dropout: float = 0.0,
                 emb_init_std: float = 1e-4, label_aware: bool = False, **loss_kw) -> None:
        check_hparams("din", embed_dim=embed_dim, hidden=hidden, dropout=dropout, attention_mode=attention_mode)
        super().__init__(spec, **loss_kw)
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        item_dim = len(spec.item) * embed_dim
        self.label_embedding = HistoryLabels(item_dim) if label_aware else None
        self.attention = TargetAttention(item_dim, tuple(att_hidden), activation=att_activation,
                                         mode=attention_mode)
        in_dim = embed_dim * (len(spec.user) + len(spec.context)) + 2 * item_dim
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        other, target, hist = sequence_inputs(self.embedding, batch, self.label_embedding)
        interest, _ = self.attention(target, hist, batch.hist_mask)
        x = torch.cat([other, target, interest], dim=-1)
        return ModelOutput(self.mlp(x).squeeze(-1), self.no_aux(batch))
