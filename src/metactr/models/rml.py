"""RML: Recurrent Meta-Learning for the generalized cold start (Liu et al., MM 2022), the model.

Paper sec. 3.2 and the authors' published TensorFlow code:

* embeddings of the user fields, the session items and the target (one shared
  ``FieldEmbedding``; an item vector is the concatenation of its field vectors, eq. 1);
* attention branch (eq. 2): DIN-style scores from ``[q, k, q-k, q*k]`` -> MLP with Dice ->
  masked softmax over the valid session items scaled by 1/sqrt(dim) -> weighted sum, followed
  (as in the authors' code) by a fully connected layer with Dice;
* LSTM branch (eq. 3) over the session, mean-pooled over valid steps;
* concat(user, attention output, LSTM output, target) -> MLP with Dice and dropout -> logit
  (eq. 4-5), plus a per-target-item bias as in the authors' code;
* auxiliary net (eq. 7) on concat(h_{t-1}, e_t) predicting each session item's real label
  (``hist_label``), padding masked out of the per-sample mean.

The loss (eq. 8) is computed by ``metactr.models.base.objective``: ``logloss_weight`` = alpha,
``aux_weight`` = gamma, ``l2_weight`` * sum ||W||^2 over the weight matrices of the attention
net and the MLP. The authors' code computes ``alpha * (logloss + 1e-4/2 * sum ||W||^2) +
(1 - alpha) * aux``, so their beta*L_reg is 0.7 * 5e-5 * sum ||W||^2 on ML-1M: that is our default
``l2_weight=3.5e-5`` (configurable).

Deviations, on purpose: the authors' inference-mode batch-norm layers (a learned affine map
that starts as the identity) are left out; dropout is off at evaluation (the authors' code
also drops units when scoring the test set); Dice is the shared batch-independent Dice.

Parameter groups: ``emb`` (embeddings), ``meta`` (attention, LSTM, aux net: the subset RML's
local step adapts), ``mlp`` (prediction MLP and item bias).
Ablations: ``rml_no_att`` (w/o attention), ``rml_no_lstm`` (w/o LSTM, hence no aux loss);
"w/o Meta" is RML trained with the ``plain`` strategy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.layers import MLP, Dice, FieldEmbedding, HistoryLabels, TargetAttention, masked_mean
from metactr.models.rnn import LSTM


@register("rml")
class RML(CTRModel):
    paper = "Recurrent Meta-Learning against Generalized Cold-Start Problem in CTR Prediction (MM 2022)"
    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "label_embedding"), "meta": ("attention", "att_fc", "lstm", "aux_net"),
                            "mlp": ("mlp", "item_bias")}

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, att_hidden: tuple[int, ...] = (128, 64),
                 lstm_hidden: int = 16, mlp_hidden: tuple[int, ...] = (128, 64),
                 aux_hidden: tuple[int, ...] = (100, 50), dropout: float = 0.3, use_attention: bool = True,
                 use_lstm: bool = True, item_bias: bool = True, emb_init_std: float = 0.02,
                 logloss_weight: float = 0.7, l2_weight: float = 3.5e-5, aux_weight: float = 0.3,
                 label_aware: bool = False) -> None:
        super().__init__(spec, logloss_weight=logloss_weight, l2_weight=l2_weight, aux_weight=aux_weight)
        if not (use_attention or use_lstm):
            raise ValueError("RML needs at least one of the attention and LSTM branches")
        if not spec.item:
            raise ValueError("RML needs item fields")
        self.use_attention, self.use_lstm = use_attention, use_lstm
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        item_dim = embed_dim * len(spec.item)
        # not in the paper: session items joined with their known labels (the auxiliary net still
        # sees the label-blind item vector, whose label it predicts)
        self.label_embedding = HistoryLabels(item_dim) if label_aware else None
        in_dim = embed_dim * (len(spec.user) + len(spec.context)) + 2 * item_dim
        l2: list[str] = []
        if use_attention:
            self.attention = TargetAttention(item_dim, tuple(att_hidden), activation="dice", mode="softmax")
            self.att_fc = nn.Sequential(nn.Linear(item_dim, item_dim), Dice(item_dim))
            l2 += [f"attention.{n}" for n, p in self.attention.named_parameters() if p.dim() == 2]
            l2.append("att_fc.0.weight")
        else:
            in_dim -= item_dim
        if use_lstm:
            self.lstm = LSTM(item_dim, lstm_hidden)
            self.aux_net = MLP(lstm_hidden + item_dim, tuple(aux_hidden), activation="sigmoid")
            in_dim += lstm_hidden
        self.mlp = MLP(in_dim, tuple(mlp_hidden), activation="dice", dropout=dropout)
        l2 += [f"mlp.{n}" for n, p in self.mlp.named_parameters() if p.dim() == 2]
        self.l2_prefixes = tuple(l2)  # exact weight-matrix names (the authors regularize kernels only)
        if item_bias:
            self.item_bias = nn.Parameter(torch.zeros(spec.item[0].vocab_size))

    def forward(self, batch: Batch) -> ModelOutput:
        emb = self.embedding
        target = emb(batch.item, "item").flatten(-2)  # [B, Fi*D]
        hist = emb(batch.hist, "item").flatten(-2)  # [B, L, Fi*D]
        mask = batch.hist_mask
        seen = hist if self.label_embedding is None else self.label_embedding(hist, batch.hist_label, mask)
        parts = [emb(batch.user, "user").flatten(-2), emb(batch.context, "context").flatten(-2)]
        aux = self.no_aux(batch)
        if self.use_attention:
            pooled, _ = self.attention(target, seen, mask)
            parts.append(self.att_fc(pooled))
        if self.use_lstm:
            states, _ = self.lstm(seen, mask)
            parts.append(masked_mean(states, mask, dim=-2))
            aux = self.auxiliary_loss(states, hist, batch.hist_label, mask)
        parts.append(target)
        logit = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        if hasattr(self, "item_bias"):
            logit = logit + self.item_bias[batch.item[..., 0]]
        return ModelOutput(logit, aux)

    def auxiliary_loss(self, states: Tensor, hist: Tensor, hist_label: Tensor, mask: Tensor) -> Tensor:
        """Per-sample mean over valid steps t >= 2 of BCE(aux_net([h_{t-1}, e_t]), y_t) (eq. 7)."""
        x = torch.cat([states[..., :-1, :], hist[..., 1:, :]], dim=-1)
        logits = self.aux_net(x).squeeze(-1)  # [B, L-1]
        valid = mask[..., 1:] & mask[..., :-1]
        bce = F.binary_cross_entropy_with_logits(logits, hist_label[..., 1:].to(logits.dtype), reduction="none")
        v = valid.to(logits.dtype)
        return (bce * v).sum(-1) / v.sum(-1).clamp_min(1.0)


@register("rml_no_att")
class RMLNoAttention(RML):
    """RML without the attention branch (the paper's "w/o Att" ablation)."""

    def __init__(self, spec: FeatureSpec, **kw) -> None:
        kw.setdefault("use_attention", False)
        super().__init__(spec, **kw)


@register("rml_no_lstm")
class RMLNoLSTM(RML):
    """RML without the LSTM branch (the paper's "w/o LSTM" ablation; no auxiliary loss either)."""

    def __init__(self, spec: FeatureSpec, **kw) -> None:
        kw.setdefault("use_lstm", False)
        super().__init__(spec, **kw)
