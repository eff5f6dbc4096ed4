"""MeLU: Meta-Learned User preference estimator (Lee et al., KDD 2019), as a CTR model.

MeLU embeds the *features* of the user and of the item (not their ids, so that a new user or
item is described by its attributes), concatenates them and scores the pair with a decision MLP
(two hidden layers of 64 ReLU units and a linear output in the paper). Meta-training is MAML over
users whose local update adapts only the decision layers, the embeddings staying fixed: that is
``metactr.strategies.cold_start.train_melu`` (the shared engine, ``adapt_groups=["decision"]``).

Deviations, on purpose (the RML protocol, MM'22 sec. 4.2):
* a sample is a *session* and its target: with ``use_history`` (default) the session is one more
  input, the mean over its valid items of each item-feature vector (as the Basic model does), so
  that MeLU sees what every other competitor sees; ``use_history=False`` is the paper's input.
* the output is a click logit trained with logloss (MeLU regresses ratings with MSE).
* ``use_ids=False`` (default, the paper) leaves the ``user_id`` / ``item_id`` fields out; their
  table rows then exist but receive no gradient.

Groups: ``emb`` = ``embedding`` (fixed in the local update), ``decision`` = the MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.base import CTRModel, ModelOutput, register
from metactr.models.interactions import check_hparams
from metactr.models.layers import MLP, FieldEmbedding, masked_mean

ID_FIELDS = ("user_id", "item_id")


class FeatureInputs(nn.Module):
    """The attribute inputs of MeLU and MAMO: per group, the field vectors of the chosen fields.

    ``forward(batch) -> (user [..., Fu'*D], item [..., Fi'*D] (target, then the session mean
    when ``use_history``), context [..., Fc*D])``. Id fields are dropped unless ``use_ids``.
    Padding never matters: multi-valued slots are masked in ``FieldEmbedding`` and padded
    session positions get weight 0 in the mean.
    """

    def __init__(self, spec: FeatureSpec, dim: int, *, use_ids: bool, use_history: bool, init_std: float) -> None:
        super().__init__()
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, dim, init_std=init_std)
        keep = {g: [j for j, f in enumerate(spec.group(g)) if use_ids or f.name not in ID_FIELDS]
                for g in ("user", "item", "context")}
        if not keep["user"] and not keep["item"]:
            raise ConfigError("the model needs at least one user or item feature besides the ids "
                              "(or use_ids=true)", field="model.use_ids")
        for g, idx in keep.items():
            self.register_buffer(f"{g}_keep", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.n_user, self.n_item, self.n_context = len(keep["user"]), len(keep["item"]), len(keep["context"])
        self.item_dim = dim * self.n_item * (2 if use_history else 1)

    def _fields(self, ids: Tensor, group: str) -> Tensor:
        v = self.embedding(ids, group)  # [..., F, D]
        keep = getattr(self, f"{group}_keep")
        if v.shape[-2] == 0 or keep.numel() == 0:
            return v[..., :0, :].flatten(-2)
        return v.index_select(-2, keep).flatten(-2)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        user = self._fields(batch.user, "user")
        item = self._fields(batch.item, "item")
        if self.use_history:
            hist = self._fields(batch.hist, "item")  # [..., L, Fi'*D]
            item = torch.cat([item, masked_mean(hist, batch.hist_mask, dim=-2)], dim=-1)
        return user, item, self._fields(batch.context, "context")


@register("melu")
class MeLU(CTRModel):
    """User/item attribute embeddings + decision MLP (Lee et al. 2019); see the module docstring."""

    paper = "MeLU: Meta-Learned User Preference Estimator for Cold-Start Recommendation (Lee et al., KDD 2019)"
    uses_history = True
    param_group_prefixes = {"emb": ("inputs",), "decision": ("decision",)}
    l2_prefixes = ("decision",)

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 32, hidden: tuple[int, ...] = (64, 64),
                 activation: str = "relu", use_ids: bool = False, use_history: bool = True,
                 emb_init_std: float = 0.01, **loss_kw) -> None:
        check_hparams("melu", embed_dim=embed_dim, hidden=hidden)
        super().__init__(spec, **loss_kw)
        self.inputs = FeatureInputs(spec, embed_dim, use_ids=use_ids, use_history=use_history,
                                    init_std=emb_init_std)
        in_dim = embed_dim * (self.inputs.n_user + self.inputs.n_context) + self.inputs.item_dim
        self.decision = MLP(in_dim, tuple(hidden), activation=activation, out_dim=1)

    def forward(self, batch: Batch) -> ModelOutput:
        user, item, context = self.inputs(batch)
        logit = self.decision(torch.cat([user, item, context], dim=-1)).squeeze(-1)
        return ModelOutput(logit, self.no_aux(batch))
