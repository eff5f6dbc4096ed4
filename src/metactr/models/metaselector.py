"""MetaSelector's model: K base CTR models mixed per sample by a selector network.

Luo et al., "MetaSelector: Meta-Learning for Recommendation with User-Level Adaptive Model
Selection", WWW 2020, sec. 4.1. The selector S(x, M(x; theta); phi) maps the sample's features
(embedded with the selector's *own* embedding table) and the base models' predicted
probabilities to a distribution lambda over the K base models (an MLP, 200-200-200 in the paper,
then a softmax); the prediction is the convex mix ``p = sum_k lambda_k * M_k(x)``.

The module is a ``CTRModel`` so that the shared ``objective`` (BCE-with-logits) and
``torch.func.functional_call`` work on it unchanged: ``forward`` returns the *logit of the
mixture*, computed exactly in log space,

    logit(p) = logsumexp_k(log lambda_k + log sigmoid(z_k)) - logsumexp_k(log lambda_k + log sigmoid(-z_k)),

so that BCE-with-logits on it is exactly the mixture's logloss (eq. 2) without clamping
probabilities, and with K = 1 it equals the base model's own logit (up to float rounding).

Parameters are named ``base.<k>.*`` (the K base models) and ``selector.*``; the groups ``base``
and ``selector`` let a strategy adapt both (MetaSelector) or the selector only (Simplified).
It is not registered in the model registry: it wraps other models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metactr.data.batch import Batch, FeatureSpec
from metactr.errors import ConfigError
from metactr.models.base import CTRModel, ModelOutput, build_model, register
from metactr.models.interactions import history_fields
from metactr.models.layers import MLP, FieldEmbedding


class SelectorNet(nn.Module):
    """The selector MLP: [features embedded, base probabilities] -> log lambda over K models.

    Features are the user fields, context fields, target-item fields and the mean of the
    session items (the paper's user_history_movie/genre), embedded by the selector's own
    ``FieldEmbedding``. ``use_predictions=False`` gives the paper's "x only" variant.
    """

    def __init__(self, spec: FeatureSpec, n_models: int, *, embed_dim: int = 10,
                 hidden: Sequence[int] = (200, 200, 200), activation: str = "relu",
                 dropout: float = 0.0, use_predictions: bool = True, use_history: bool = True,
                 emb_init_std: float = 1e-2) -> None:
        super().__init__()
        self.use_predictions = use_predictions
        self.use_history = use_history
        self.embedding = FieldEmbedding(spec, embed_dim, init_std=emb_init_std)
        n_item = len(spec.item)
        in_dim = embed_dim * (len(spec.user) + len(spec.context) + n_item * (2 if use_history else 1))
        in_dim += n_models if use_predictions else 0
        self.mlp = MLP(in_dim, tuple(hidden), activation=activation, dropout=dropout, out_dim=n_models)

    def forward(self, batch: Batch, probs: Tensor) -> Tensor:
        parts = [self.embedding(batch.user, "user").flatten(-2),
                 self.embedding(batch.context, "context").flatten(-2),
                 self.embedding(batch.item, "item").flatten(-2)]
        if self.use_history:  # mean over valid session items (one weighted bag of table rows)
            parts.append(history_fields(self.embedding, batch).flatten(-2))
        if self.use_predictions:
            parts.append(probs)
        return torch.log_softmax(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


@register("metaselector")
class MetaSelector(CTRModel):
    """K base models + a selector; prediction = sum_k lambda_k(x) * p_k(x) (WWW'20 sec. 4.1)."""

    paper = "MetaSelector (Luo et al., WWW 2020), sec. 4.1"
    uses_history = True
    param_group_prefixes = {"base": ("base",), "selector": ("selector",)}
    l2_prefixes = ()

    def __init__(self, spec: FeatureSpec, base_models: Sequence[CTRModel], *,
                 base_names: Sequence[str] | None = None, embed_dim: int = 10,
                 hidden: Sequence[int] = (200, 200, 200), activation: str = "relu",
                 dropout: float = 0.0, use_predictions: bool = True, use_history: bool = True,
                 **loss_kw) -> None:
        super().__init__(spec, **loss_kw)
        if len(base_models) == 0:
            raise ConfigError("MetaSelector needs at least one base model", field="selector.base_models")
        # base models given as modules, or as {"name": registered model, **its hyper-parameters}
        # (so that a checkpoint rebuilds a MetaSelector from its JSON like any other model)
        base_models = [m if isinstance(m, nn.Module) else
                       build_model(m["name"], spec, **{k: v for k, v in m.items() if k != "name"})
                       for m in base_models]
        self.base = nn.ModuleList(base_models)
        self.base_names = list(base_names) if base_names is not None else [
            getattr(m, "name", "") or type(m).__name__.lower() for m in base_models]
        if len(self.base_names) != len(base_models):
            raise ConfigError("base_names and base_models differ in length", field="selector.base_names")
        self.selector = SelectorNet(spec, len(base_models), embed_dim=embed_dim, hidden=hidden,
                                    activation=activation, dropout=dropout,
                                    use_predictions=use_predictions, use_history=use_history)

    @property
    def n_models(self) -> int:
        return len(self.base)

    def base_logits(self, batch: Batch) -> Tensor:
        """[B, K] logits of the base models."""
        return torch.stack([m(batch).logit for m in self.base], dim=-1)

    def mixture(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(mixture logit [B], log lambda [B, K], base logits [B, K])."""
        z = self.base_logits(batch)
        log_lam = self.selector(batch, torch.sigmoid(z))
        log_p = torch.logsumexp(log_lam + F.logsigmoid(z), dim=-1)
        log_q = torch.logsumexp(log_lam + F.logsigmoid(-z), dim=-1)
        return log_p - log_q, log_lam, z

    def forward(self, batch: Batch) -> ModelOutput:
        """The mixture's logit and the selector's log weights ``[B, K]`` (one ``functional_call`` at
        adapted parameters yields both: meta-test logging)."""
        logit, log_lam, _ = self.mixture(batch)
        return ModelOutput(logit, self.no_aux(batch), log_lam)

    def weights(self, batch: Batch) -> Tensor:
        """lambda [B, K]: the selector's distribution over base models (rows sum to 1)."""
        return self.mixture(batch)[1].exp()
