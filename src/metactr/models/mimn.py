"""Multi-channel user Interest Memory Network (Pi et al., KDD 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams, sequence_inputs
from metactr.models.layers import MLP, FieldEmbedding, TargetAttention
from metactr.models.rnn import GRU


def _address(key: Tensor, beta: Tensor, memory: Tensor) -> Tensor:
    """NTM content addressing: ``softmax(beta * cos(key, M_i))`` over slots -> ``[B, m]``."""
    cos = torch.einsum("bd,bmd->bm", F.normalize(key, dim=-1, eps=1e-8), F.normalize(memory, dim=-1, eps=1e-8))
    return torch.softmax(beta * cos, dim=-1)


@register("mimn")
class MIMN(CTRModel):
    """MIMN: a neural-Turing-machine memory written by the session, a memory induction unit
    (multi-channel GRU) beside it, both read with the target as key (Pi et al. 2019).

    Per valid session step t (the item vector ``e_t``):
      * controller ``h_t = GRU([e_t, r_{t-1}], h_{t-1})``; from ``h_t`` one linear layer gives the
        read/write keys and strengths, the erase and the add vectors;
      * read ``r_t = w^r_t M_{t-1}`` with ``w^r_t = softmax(beta_r cos(k_r, M_{t-1}))``; write
        ``M_t = M_{t-1} * (1 - w^w e^T) + w^w a^T`` (the paper's UIC);
      * memory induction unit: for the ``miu_topk`` slots with the largest read weights,
        ``S_t(i) = GRU([M_t(i), e_t], S_{t-1}(i))`` (one GRU shared by the channels); others keep
        their state.
    Masked steps keep every state, so padding never changes the output. At the end, the memory is
    read with a projection of the target as key (content addressing), the MIU channels with the
    shared target attention, and ``[user, context, target, memory read, MIU read]`` goes through a
    Dice MLP.

    Simplifications, for sessions of <= 20 items: the whole pass runs inside ``forward`` (no
    separate asynchronous UIC server state between calls); the memory starts from a learned
    ``memory_init`` (4 slots by default) for every sample; no location-based addressing / shift
    (content addressing only); no memory utilization regularization; the MIU channel selection
    is a hard top-K mask (gradients flow through the selected channels only).
    Groups: ``emb``, ``interaction`` (controller, heads, memory init, MIU, target reads), ``mlp``.
    """

    paper = ("Practice on Long Sequential User Behavior Modeling for Click-Through Rate Prediction "
             "(Pi et al., KDD 2019)")
    uses_history = True
    param_group_prefixes = {"emb": ("embedding",),
                            "interaction": ("controller", "heads", "memory_init", "miu", "read_query",
                                            "read_beta", "miu_attention"),
                            "mlp": ("mlp",)}
    l2_prefixes = ("mlp",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, memory_slots: int = 4, miu_topk: int = 2,
                 hidden: tuple[int, ...] = (200, 80), activation: str = "dice",
                 att_hidden: tuple[int, ...] = (80, 40), dropout: float = 0.0, emb_init_std: float = 1e-4,
                 **loss_kw) -> None:
        check_hparams("mimn", embed_dim=embed_dim, hidden=hidden, dropout=dropout, memory_slots=memory_slots,
                      miu_topk=miu_topk)
        if miu_topk > memory_slots:
            raise ConfigError(f"model 'mimn': miu_topk ({miu_topk}) must not exceed memory_slots ({memory_slots})",
                              field="model.miu_topk")
        super().__init__(spec, **loss_kw)
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        d = len(spec.item) * embed_dim  # item, memory slot, controller and MIU state sizes
        self.d, self.topk = d, miu_topk
        self.controller = GRU(2 * d, d)
        self.heads = nn.Linear(d, 4 * d + 2)  # read key, write key, erase, add, 2 strengths
        self.memory_init = nn.Parameter(torch.randn(memory_slots, d) * 0.1)
        self.miu = GRU(2 * d, d)
        self.read_query = nn.Linear(d, d)
        self.read_beta = nn.Parameter(torch.ones(1))
        self.miu_attention = TargetAttention(d, tuple(att_hidden), activation="dice", mode="softmax")
        in_dim = embed_dim * (len(spec.user) + len(spec.context)) + 3 * d
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout)

    def _induce(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the memory and the MIU over ``x [B, L, d]``; returns final memory and MIU states."""
        B, L, d = x.shape
        memory = self.memory_init.unsqueeze(0) + x.new_zeros(B, 1, 1)  # [B, m, d]
        states = x.new_zeros(memory.shape)
        h = x.new_zeros(B, d)
        read = x.new_zeros(B, d)
        c = self.controller
        miu_gx_item = x @ self.miu.w_ih[:, d:].T  # the item half of the MIU input projection, all steps
        for t in range(L):
            e = x[:, t]
            n, z = c.step(torch.cat([e, read], dim=-1) @ c.w_ih.T + c.b_ih, h)
            h_new = (1 - z) * n + z * h
            k_r, k_w, erase, add, betas = self.heads(h_new).split([d, d, d, d, 2], dim=-1)
            betas = F.softplus(betas)
            w_r = _address(k_r, betas[:, :1], memory)
            w_w = _address(k_w, betas[:, 1:], memory)
            read_new = torch.einsum("bm,bmd->bd", w_r, memory)
            mem_new = (memory * (1 - w_w.unsqueeze(-1) * torch.sigmoid(erase).unsqueeze(1))
                       + w_w.unsqueeze(-1) * torch.tanh(add).unsqueeze(1))
            # memory induction unit: one GRU step per channel, kept on the top-K read channels
            gx = mem_new @ self.miu.w_ih[:, :d].T + (miu_gx_item[:, t] + self.miu.b_ih).unsqueeze(1)
            sn, sz = self.miu.step(gx, states)
            thr = w_r.topk(self.topk, dim=-1).values[:, -1:]
            sel = (w_r >= thr).to(x.dtype).unsqueeze(-1)
            states_new = sel * ((1 - sz) * sn + sz * states) + (1 - sel) * states
            m = mask[:, t].to(x.dtype)
            m1, m2 = m.unsqueeze(-1), m.view(B, 1, 1)
            h = m1 * h_new + (1 - m1) * h
            read = m1 * read_new + (1 - m1) * read
            memory = m2 * mem_new + (1 - m2) * memory
            states = m2 * states_new + (1 - m2) * states
        return memory, states

    def forward(self, batch: Batch) -> ModelOutput:
        other, target, hist = sequence_inputs(self.embedding, batch)
        memory, states = self._induce(hist, batch.hist_mask)
        w = _address(self.read_query(target), F.softplus(self.read_beta) * 5.0, memory)
        mem_read = torch.einsum("bm,bmd->bd", w, memory)
        slots = torch.ones(states.shape[:-1], dtype=torch.bool, device=states.device)
        miu_read, _ = self.miu_attention(target, states, slots)
        x = torch.cat([other, target, mem_read, miu_read], dim=-1)
        return ModelOutput(self.mlp(x).squeeze(-1), self.no_aux(batch))
