"""The meta-learning cold-start competitors of the RML paper (MM'22, sec. 2.2 and 4.2, Table 2).

* ``melu``  MeLU (Lee et al. 2019): MAML over users through the shared engine, the local update
  adapting only the decision layers (``adapt_groups`` overrides), the global update everything.
* ``mamo``  MAMO (Dong et al. 2020): the same engine; the local update adapts the user/item
  embedding layers and the recommendation layers from their memory-personalised values.
* ``meta_embedding``  Meta-Embedding (Pan et al. 2019), two phases: (1) pre-train the base model
  on the split (``plain``), (2) meta-train the generator only, on item tasks (each item with >= 2
  rows of the split: D_a, D_b), with ``alpha * l_a + (1 - alpha) * l_b``, warm-up rate
  ``inner_lr``, Adam at ``lr``, ``epochs`` passes over the items, ``tasks_per_batch`` items per
  step, |D_a| <= ``support_size``, |D_b| <= ``query_size``; then ``finish`` installs the generated
  embedding of every *cold* item (fewer than ``cold_threshold`` target rows in the split).
"""

from __future__ import annotations

from typing import Any

import torch

from metactr.data.tasks import item_task_batches, item_target_counts
from metactr.engine.steps import apply_step
from metactr.errors import ConfigError
from metactr.models.meta_embedding import MetaEmbedding
from metactr.strategies.base import Context, Phase, Strategy, register_strategy
from metactr.strategies.config import PlainConfig
from metactr.strategies.maml import MAML
from metactr.strategies.plain import Plain

MELU_LOCAL_GROUPS = ["decision"]
MAMO_LOCAL_GROUPS = ["user_enc", "item_enc", "rec"]


@register_strategy
class MeLU(MAML):
    names = ("melu",)
    default_groups = MELU_LOCAL_GROUPS


@register_strategy
class MAMO(MAML):
    names = ("mamo",)
    default_groups = MAMO_LOCAL_GROUPS


def meta_embedding_loss(model: MetaEmbedding, dataset, items: torch.Tensor, a, a_w, b, b_w,
                        warm_lr: float, alpha: float) -> torch.Tensor:
    """``alpha * l_a + (1 - alpha) * l_b`` for one meta-batch of items (Pan et al. 2019, eq. 6)."""
    l_a, l_b = model.cold_warm_losses(dataset.item_table[items.to(dataset.item_table.device)], a, a_w, b, b_w,
                                      warm_lr)
    return alpha * l_a + (1 - alpha) * l_b


class _GeneratorPhase(Phase):
    name = "generator"

    def __init__(self, s: MetaEmbeddingStrategy) -> None:
        self.s = s

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.s.n_task_items // self.s.cfg.tasks_per_batch))

    def start(self) -> None:
        self.s.start_generator()

    def stream(self):
        cfg = self.s.cfg
        return item_task_batches(self.s.ctx.dataset, self.s.ctx.split.name, tasks_per_batch=cfg.tasks_per_batch,
                                 a_size=cfg.support_size, b_size=cfg.query_size, rng=self.s.rng)

    def rows(self, item) -> int:
        return int(item[2].sum() + item[4].sum())

    def step(self, item) -> torch.Tensor:
        s = self.s
        loss = meta_embedding_loss(s.ctx.model, s.ctx.dataset, *item, s.cfg.inner_lr, s.cfg.alpha)
        apply_step(s.gen_opt, s.gen_params, loss, s.cfg.clip_norm, s.ctx.dist)
        s.losses.append(float(loss.detach()))
        return loss.detach()


@register_strategy
class MetaEmbeddingStrategy(Strategy):
    names = ("meta_embedding",)

    def setup(self, ctx: Context) -> list[Phase]:
        if not isinstance(ctx.model, MetaEmbedding):
            raise ConfigError(f"strategy 'meta_embedding' needs model 'meta_embedding', got '{ctx.model.name}'",
                              field="strategy")
        self.ctx = ctx
        c = self.cfg
        # (1) the base model, trained as usual (the generator is unused by forward: no gradients)
        self.pre = Plain(PlainConfig(lr=c.lr, decay=c.decay, min_lr=c.min_lr, clip_norm=c.clip_norm))
        phases = self.pre.setup(ctx)
        self.counts = item_target_counts(ctx.dataset, ctx.split.name)
        self.n_task_items = int((self.counts >= 2).sum())
        self.gen_opt: torch.optim.Optimizer | None = None
        self.losses: list[float] = []
        return [*phases, _GeneratorPhase(self)]

    def start_generator(self) -> None:
        """(2) the generator, base frozen (gradients are taken w.r.t. the generator only)."""
        ds, model = self.ctx.dataset, self.ctx.model
        ids = torch.arange(ds.n_items)
        self.warm = ids[(self.counts >= self.cfg.cold_threshold) & (ids.numpy() > 0)]
        self.cold = ids[(self.counts < self.cfg.cold_threshold) & (ids.numpy() > 0)]
        self.scale = model.set_scale_from(ds.item_table[self.warm])
        names = set(model.params_in("generator"))
        self.gen_params = [p for n, p in model.named_parameters() if n in names]
        self.gen_opt = torch.optim.Adam(self.gen_params, lr=self.cfg.lr)
        self.rng = self.ctx.numpy_rng()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = dict(self.pre.optimizers()) if self.ctx else {}
        if self.ctx and self.gen_opt is not None:
            out["generator"] = self.gen_opt
        return out

    def schedulers(self) -> dict[str, Any]:
        return self.pre.schedulers() if self.ctx else {}

    def extra_state(self) -> dict[str, Any]:
        return {"task_rng": self.rng.bit_generator.state} if self.gen_opt is not None else {}

    def load_extra(self, tensors, state) -> None:
        if "task_rng" in state and self.gen_opt is not None:
            self.rng.bit_generator.state = state["task_rng"]

    def finish(self) -> dict[str, Any]:
        """(3) deployment: cold items start from their generated embedding; FT then warms them up."""
        installed = self.ctx.model.install(self.ctx.dataset.item_table[self.cold])
        return {"gen_scale": self.scale, "n_cold_items": installed,
                "meta_loss_first": self.losses[0] if self.losses else None,
                "meta_loss_last": self.losses[-1] if self.losses else None}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.pre.opt  # fine-tuning continues the base model's optimizer
