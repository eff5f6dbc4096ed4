"""MAMO: Memory-Augmented Meta-Optimization (Dong et al., KDD 2020), as a CTR model.

MAMO is MeLU (attribute embeddings, a recommendation MLP, MAML over users) plus two memories
read with one attention over the user's *profile*:

* profile p_u = the user's attribute vectors; attention a_u = softmax(W_a cos(p_u, M_P)) over K
  memory slots (M_P: K profile keys; W_a: the K x K layer of the authors' code);
* feature-specific memory M_U: K copies of a bias for the user-embedding layer's parameters;
  the user's *personalized initialisation* is phi_u - tau * sum_k a_uk M_U[k] (the bias term);
* task-specific memory cube M_R: K matrices of size 2d x 2d; sum_k a_uk M_R[k] initialises the
  "memory layer" (the first layer of the recommendation MLP, applied to [e_u, e_i]), which
  carries the preference commonality of similar users.

Meta-training is MAML over users through the shared engine
(``metactr.strategies.cold_start.train_mamo``): the local update adapts the user/item
embedding layers and the recommendation layers (``user_enc``, ``item_enc``, ``rec``), starting
from the memory-personalised values, and the global update trains everything.

Simplifications, on purpose (so that the model stays a pure, vmap-able function of
(parameters, batch), as the shared engine requires):
* The memories are parameters learned by the outer (global) gradient, not written with the
  paper's moving-average write heads (M_P <- alpha a_u p_u + (1-alpha) M_P, M_U <- ... grads,
  M_R <- ... adapted weights). Both aim at the same thing: memory values that make the
  personalised initialisation good after local adaptation; ours optimises that directly.
* The memory layer's personalised weight is *additive*: W_mem + sum_k a_uk M_R[k] (the authors
  overwrite W_mem with the memory read). Since the local update adapts W_mem, it adapts exactly
  that personalised weight (the gradient of an additive term is the same), so the inner loop is
  the paper's, from a memory-initialised starting point plus a shared offset.
* As in MeLU here: a session input (mean of the session's item-feature vectors) when
  ``use_history`` (default), logloss on clicks, no id fields unless ``use_ids``.

Groups: ``emb`` (attribute table, fixed locally), ``user_enc``, ``item_enc``, ``rec`` (adapted
locally), ``memory`` (M_P, W_a, M_U, M_R; global only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams
from metactr.models.layers import MLP, make_activation
from metactr.models.melu import FeatureInputs


@register("mamo")
class MAMO(CTRModel):
    """MeLU + feature-specific memory (personalised bias) + task-specific memory cube."""

    paper = "MAMO: Memory-Augmented Meta-Optimization for Cold-start Recommendation (Dong et al., KDD 2020)"
    uses_history = True
    param_group_prefixes = {"emb": ("inputs",), "user_enc": ("user_enc",), "item_enc": ("item_enc",),
                            "rec": ("mem_layer", "rec", "act"),
                            "memory": ("profile_memory", "attention", "bias_memory_w", "bias_memory_b",
                                       "task_memory")}
    l2_prefixes = ("rec",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 32, hidden: tuple[int, ...] = (32, 16),
                 activation: str = "relu", n_memory: int = 3, tau: float = 0.01, use_ids: bool = False,
                 use_history: bool = True, emb_init_std: float = 0.01, memory_init_std: float = 0.05,
                 **loss_kw) -> None:
        check_hparams("mamo", embed_dim=embed_dim, hidden=hidden, n_memory=n_memory)
        if not tau >= 0:
            raise ConfigError(f"model 'mamo': tau must be >= 0, got {tau!r}", field="model.tau")
        super().__init__(spec, **loss_kw)
        self.tau = float(tau)
        self.inputs = FeatureInputs(spec, embed_dim, use_ids=use_ids, use_history=use_history,
                                    init_std=emb_init_std)
        profile_dim = embed_dim * (self.inputs.n_user + self.inputs.n_context)
        if profile_dim == 0:
            raise ConfigError("model 'mamo' needs user features for its memories", field="model")
        d = embed_dim
        self.user_enc = nn.Linear(profile_dim, d)
        self.item_enc = nn.Linear(self.inputs.item_dim, d)
        self.act = make_activation(activation, d)
        # memories (K slots); the bias memory mirrors the user-embedding layer's weight and bias
        self.profile_memory = nn.Parameter(torch.randn(n_memory, profile_dim))
        self.attention = nn.Linear(n_memory, n_memory)
        self.bias_memory_w = nn.Parameter(torch.randn(n_memory, d, profile_dim) * memory_init_std)
        self.bias_memory_b = nn.Parameter(torch.randn(n_memory, d) * memory_init_std)
        self.task_memory = nn.Parameter(torch.randn(n_memory, 2 * d, 2 * d) * memory_init_std)
        self.mem_layer = nn.Linear(2 * d, 2 * d)
        self.rec = MLP(2 * d, tuple(hidden), activation=activation, out_dim=1)

    def read_attention(self, profile: Tensor) -> Tensor:
        """a_u = softmax(W_a cos(p_u, M_P)) over the K slots: ``[..., K]``."""
        cos = F.normalize(profile, dim=-1, eps=1e-6) @ F.normalize(self.profile_memory, dim=-1, eps=1e-6).T
        return torch.softmax(self.attention(cos), dim=-1)

    def forward(self, batch: Batch) -> ModelOutput:
        user, item, context = self.inputs(batch)
        profile = torch.cat([user, context], dim=-1)
        a = self.read_attention(profile)  # [..., K]
        # user layer at phi_u - tau * b_u, b_u = a_u . M_U (per sample: a_u depends on the profile)
        bias_out = torch.einsum("...k,kop,...p->...o", a, self.bias_memory_w, profile) + a @ self.bias_memory_b
        e_u = self.act(self.user_enc(profile) - self.tau * bias_out)
        e_i = self.act(self.item_enc(item))
        x = torch.cat([e_u, e_i], dim=-1)  # [..., 2d]
        # memory layer with the personalised weight W_mem + a_u . M_R
        cube = torch.einsum("...k,kij->...ij", a, self.task_memory)
        h = self.mem_layer(x) + (cube @ x.unsqueeze(-1)).squeeze(-1)
        logit = self.rec(h).squeeze(-1)
        return ModelOutput(logit, self.no_aux(batch))
