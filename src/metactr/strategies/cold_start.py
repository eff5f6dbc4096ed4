"""Training procedures of the meta-learning cold-start competitors of the RML paper (MM'22,
sec. 2.2 and 4.2, Table 2): Meta-Embedding, MeLU and MAMO.

Each ``train_*`` has the signature and return type of the ``train_*`` functions of
``metactr.strategies.base``: ``(model, dataset, split, cfg: StrategyConfig, gen, log=None) ->
TrainResult``, whose ``optimizer`` (the global Adam, state and decayed rate kept) is what the RML
protocol's FT-A/B/C fine-tuning continues with. ``cfg.name`` is not read (the caller picks the
function from ``TRAINERS``).

* ``train_melu``  MAML over users (``UserTaskSampler``) through the shared engine
  (``strategies.train_maml`` -> ``functional.maml_outer_loss``), the local update adapting only
  the decision layers (``cfg.adapt_groups`` overrides), the global update everything.
* ``train_mamo``  the same engine; the local update adapts the user/item embedding layers and the
  recommendation layers from their memory-personalised values; memories are trained globally.
* ``train_meta_embedding``  (1) pre-train the base model on the split (``train_plain``), (2)
  meta-train the generator only, on item tasks (each item with >= 2 rows of the split: D_a, D_b),
  with ``alpha * l_a + (1 - alpha) * l_b``, warm-up rate ``cfg.inner_lr``, Adam at ``cfg.lr``,
  ``cfg.epochs`` passes over the items, ``cfg.tasks_per_batch`` items per step, |D_a| <=
  ``cfg.support_size``, |D_b| <= ``cfg.query_size``; (3) install the generated embedding of every
  *cold* item (fewer than ``cold_threshold`` target rows in the split) into the id table.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metactr.data.prepared import PreparedDataset
from metactr.data.tasks import group_rows, task_batch
from metactr.errors import ConfigError, DataError
from metactr.strategies.base import Logger, StrategyConfig, TrainResult, apply_step, train_maml, train_plain
from metactr.models.base import CTRModel
from metactr.models.meta_embedding import MetaEmbedding

MELU_LOCAL_GROUPS = ["decision"]
MAMO_LOCAL_GROUPS = ["user_enc", "item_enc", "rec"]


def _maml_with(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig, gen: torch.Generator,
               log: Logger | None, default_groups: list[str]) -> TrainResult:
    groups = cfg.adapt_groups if cfg.adapt_groups is not None else default_groups
    model.params_in(*groups)  # ConfigError when the model lacks a group (e.g. MeLU trainer on DIN)
    maml_cfg = cfg.model_copy(update={"name": "maml", "adapt_groups": list(groups)})
    result = train_maml(model, dataset, split, maml_cfg, gen, log)
    result.extra["local_groups"] = list(groups)
    return result


def train_melu(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
               gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    """MeLU (Lee et al. 2019): MAML over users, local update on the decision layers only."""
    return _maml_with(model, dataset, split, cfg, gen, log, MELU_LOCAL_GROUPS)


def train_mamo(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
               gen: torch.Generator, log: Logger | None = None) -> TrainResult:
    """MAMO (Dong et al. 2020): MAML over users from memory-personalised initial values."""
    return _maml_with(model, dataset, split, cfg, gen, log, MAMO_LOCAL_GROUPS)


# --------------------------------------------------------------------------- Meta-Embedding
def _gather(order: np.ndarray, starts: np.ndarray, lens: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``order[starts[t]: starts[t] + min(lens[t], size)]`` per task, padded with the first
    row (weight 0): ``(idx [T, size], weight [T, size])``."""
    j = np.arange(size)[None, :]
    valid = j < np.minimum(lens, size)[:, None]
    return order[starts[:, None] + np.where(valid, j, 0)], valid.astype(np.float32)


def item_task_batches(dataset: PreparedDataset, split: str, *, tasks_per_batch: int, a_size: int, b_size: int,
                      rng: np.random.Generator):
    """One pass over the items of ``split`` with >= 2 rows, in random order, ``tasks_per_batch``
    distinct items per step: yields ``(items [T], D_a [T, Sa], w_a, D_b [T, Sb], w_b)``. Each item's
    rows are shuffled and halved (D_a the first half, D_b the second; they never overlap)."""
    s = dataset.split(split)
    items, order, starts, counts = group_rows(s.target.numpy(), rng)
    keep = counts >= 2
    if not keep.any():
        raise DataError(f"split '{split}' has no item with 2 rows or more (Meta-Embedding needs D_a and D_b)")
    items, starts, counts = items[keep], starts[keep], counts[keep]
    n_a = counts // 2
    perm = rng.permutation(items.size)
    for b in range(0, perm.size, tasks_per_batch):
        k = perm[b:b + tasks_per_batch]
        a_idx, a_w = _gather(order, starts[k], n_a[k], a_size)
        b_idx, b_w = _gather(order, starts[k] + n_a[k], counts[k] - n_a[k], b_size)
        yield (torch.from_numpy(items[k]), task_batch(dataset, s, torch.from_numpy(a_idx)), torch.from_numpy(a_w),
               task_batch(dataset, s, torch.from_numpy(b_idx)), torch.from_numpy(b_w))


def item_target_counts(dataset: PreparedDataset, split: str) -> np.ndarray:
    """How many rows of ``split`` have each item (0..n_items-1) as their target."""
    return np.bincount(dataset.split(split).target.numpy(), minlength=dataset.n_items)


def meta_embedding_loss(model: MetaEmbedding, dataset: PreparedDataset, items: torch.Tensor, a, a_w, b, b_w,
                        warm_lr: float, alpha: float) -> torch.Tensor:
    """``alpha * l_a + (1 - alpha) * l_b`` for one meta-batch of items (Pan et al. 2019, eq. 6)."""
    l_a, l_b = model.cold_warm_losses(dataset.item_table[items], a, a_w, b, b_w, warm_lr)
    return alpha * l_a + (1 - alpha) * l_b


def train_meta_embedding(model: CTRModel, dataset: PreparedDataset, split: str, cfg: StrategyConfig,
                         gen: torch.Generator, log: Logger | None = None, *, alpha: float = 0.1,
                         cold_threshold: int = 5) -> TrainResult:
    """Pre-train the base, meta-train the generator, install generated embeddings of cold items."""
    if not isinstance(model, MetaEmbedding):
        raise ConfigError(f"strategy 'meta_embedding' needs model 'meta_embedding', got '{model.name}'",
                          field="strategy")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}", field="strategy.alpha")
    # (1) the base model, trained as usual (the generator is unused by forward: zero gradients)
    pre = train_plain(model, dataset, split, cfg.model_copy(update={"name": "plain"}), gen, log)
    counts = item_target_counts(dataset, split)
    ids = torch.arange(dataset.n_items)
    warm, cold = ids[(counts >= cold_threshold) & (ids.numpy() > 0)], ids[(counts < cold_threshold) & (ids.numpy() > 0)]
    scale = model.set_scale_from(dataset.item_table[warm])

    # (2) the generator, base frozen (gradients are taken w.r.t. the generator only)
    gen_params = [p for n, p in model.named_parameters() if n in set(model.params_in("generator"))]
    opt = torch.optim.Adam(gen_params, lr=cfg.lr)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    n_items = int((counts >= 2).sum())
    per_epoch = max(1, -(-n_items // cfg.tasks_per_batch))
    n_steps = max(1, int(math.ceil(cfg.epochs * per_epoch)))
    hist, losses, done = list(pre.history), [], 0
    while done < n_steps:
        for items, a, a_w, b, b_w in item_task_batches(dataset, split, tasks_per_batch=cfg.tasks_per_batch,
                                                       a_size=cfg.support_size, b_size=cfg.query_size, rng=rng):
            loss = meta_embedding_loss(model, dataset, items, a, a_w, b, b_w, cfg.inner_lr, alpha)
            apply_step(opt, gen_params, loss, cfg.clip_norm)
            losses.append(float(loss.detach()))
            done += 1
            if done % per_epoch == 0 or done == n_steps:
                hist.append({"phase": "generator", "step": done, "meta_loss": float(np.mean(losses[-per_epoch:]))})
                if log:
                    log(hist[-1])
            if done >= n_steps:
                break

    # (3) deployment: cold items start from their generated embedding; FT then warms them up
    installed = model.install(dataset.item_table[cold])
    return TrainResult(pre.optimizer, hist, {"gen_scale": scale, "n_cold_items": installed,
                                             "meta_loss_first": losses[0], "meta_loss_last": losses[-1],
                                             "generator_optimizer": opt})


TRAINERS = {"meta_embedding": train_meta_embedding, "melu": train_melu, "mamo": train_mamo}
