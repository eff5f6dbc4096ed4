"""GRU4Rec and LSTM4Rec in their CTR form (the sequential baselines of the MIMN paper)."""

from __future__ import annotations

import torch

from metactr.data.batch import Batch, FeatureSpec
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, sequence_inputs
from metactr.models.layers import MLP, FieldEmbedding, HistoryLabels
from metactr.models.rnn import GRU, LSTM


class _SessionRNN(CTRModel):
    """An RNN over the session's item vectors; its last valid hidden state, the user, context
    and target embeddings go through an MLP.

    This is how Pi et al. (MIMN, KDD 2019, sec. 6) and the DIEN/MIMN authors' code use GRU4Rec
    and LSTM4Rec as CTR baselines: not the session-ranking losses of the original papers, but
    the recurrent user encoder under a click logloss. Masked steps keep the state, so padding
    never changes the output; an empty session gives a zero state.
    Groups: ``emb``, ``interaction`` (the RNN), ``mlp``.
    """

    uses_history = True
    param_group_prefixes = {"emb": ("embedding", "label_embedding"), "interaction": ("rnn",), "mlp": ("mlp",)}
    l2_prefixes = ("mlp",)
    rnn_cls: type = GRU

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, rnn_hidden: int | None = None,
                 hidden: tuple[int, ...] = (200, 80), activation: str = "relu", dropout: float = 0.0,
                 emb_init_std: float = 1e-4, label_aware: bool = False, **loss_kw) -> None:
        check_hparams(self.name, embed_dim=embed_dim, hidden=hidden, dropout=dropout, rnn_hidden=rnn_hidden)
        super().__init__(spec, **loss_kw)
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        item_dim = len(spec.item) * embed_dim
        rnn_hidden = rnn_hidden or item_dim
        self.label_embedding = HistoryLabels(item_dim) if label_aware else None  # label-aware session input
        self.rnn = self.rnn_cls(item_dim, rnn_hidden)
        in_dim = embed_dim * (len(spec.user) + len(spec.context)) + item_dim + rnn_hidden
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        other, target, hist = sequence_inputs(self.embedding, batch, self.label_embedding)
        _, state = self.rnn(hist, batch.hist_mask)
        x = torch.cat([other, target, state], dim=-1)
        return ModelOutput(self.mlp(x).squeeze(-1), self.no_aux(batch))


@register("gru4rec")
class GRU4Rec(_SessionRNN):
    __doc__ = "GRU4Rec (Hidasi et al., ICLR 2016), CTR form. " + (_SessionRNN.__doc__ or "")
    paper = "Session-based Recommendations with Recurrent Neural Networks (Hidasi et al., ICLR 2016)"
    rnn_cls = GRU


@register("lstm4rec")
class LSTM4Rec(_SessionRNN):
    __doc__ = "LSTM4Rec (Hochreiter & Schmidhuber 1997 LSTM as a session encoder), CTR form. " + (
        _SessionRNN.__doc__ or "")
    paper = "LSTM session encoder, CTR baseline of MIMN (Pi et al., KDD 2019)"
    rnn_cls = LSTM
