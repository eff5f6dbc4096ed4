"""MetaSelector training: base-model pre-training, episodic meta-training, meta-test adaptation.

Luo et al., WWW 2020, Algorithm 1 and sec. 5.3:

* (optional, on by default) pre-train each base model on the pooled training data of every
  user (LR with FTRL, the others with Adam, mini-batches of 1000);
* meta-train episodically: each episode samples ``users_per_episode`` (10) users, draws a
  support and a query set from each user's training data (``ms_support`` / ``ms_query``, the
  chronological 75/25 cut of the user's first 80%), adapts (base models and selector, or the
  selector only for MetaSelector-Simplified) with one Meta-SGD step on the support loss, and
  updates the initialisation *and* the per-parameter inner rates on the query loss,
  second-order through the adaptation (eq. 5);
* meta-test: adapt on the user's whole training data (support + query), score the user's test
  data (``ms_test``).

The MAML/Meta-SGD mathematics live in the shared engine (``metactr.engine.functional``); this
module only builds the user tasks, drives the episodes and does the bookkeeping.

Deviations, on purpose (each configurable): a task's support/query sets are random subsets of
at most ``max_support`` / ``max_query`` rows of the user's support/query split (Algorithm 1,
line 7 "sample D_S^u and D_Q^u"), so that every task of an episode pads to a small common size;
meta-training runs with dropout off (vmap over tasks then needs no per-task random state).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from metactr.data.batch import Batch
from metactr.data.prepared import PreparedDataset, Split
from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS
from metactr.data.tasks import UserIndex, task_batch
from metactr.errors import ConfigError
from metactr.eval.predict import predict_proba
from metactr.engine.functional import adapt_and_predict
from metactr.models.metaselector import MetaSelector
from metactr.models.base import CTRModel
from metactr.engine.device import resolve_device

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


from metactr.papers.metaselector.config import (BaseModelConfig, MetaTrainConfig, PretrainConfig,  # noqa: F401
                                               SampleSelectorConfig, SelectorExperiment, SelectorNetConfig,
                                               default_base_models)
from metactr.papers.metaselector.data import SelectorData, concat_splits  # noqa: F401
from metactr.papers.metaselector.meta import (MetaResult, MetaSelectorStrategy, adapt, base_epochs,  # noqa: F401
                                             build_base_models, fine_tune_rates, meta_loss, meta_train, pretrain,
                                             _device)

# --------------------------------------------------------------------------- meta-test
def meta_test(model: MetaSelector, rates: Mapping[str, Tensor] | None, data: SelectorData,
              cfg: MetaTrainConfig, *, steps: int | None = None,
              score: Callable[[CTRModel, Mapping[str, Tensor], Batch], Tensor] | None = None) -> Tensor:
    """Adapt on each test user's training rows, score the user's test rows (sec. 4.2).

    Users are processed in chunks of ``test_chunk`` sorted by their number of training rows (so
    padding stays small); each chunk is one vmapped adaptation. A user's adaptation set is their
    most recent ``test_max_support`` training rows. ``rates`` None or ``steps`` 0 = no adaptation.
    Returns the mixture logit of every row of ``data.test``, in order (or, with a ``score``
    that returns ``[rows, C]``, a ``[len(test), C]`` tensor: e.g. the logit and log lambda).
    """
    steps = cfg.test_steps if steps is None else steps
    model.eval()
    ds = data.ds
    test_idx, train_idx = UserIndex.build(data.test), UserIndex.build(data.test_train)
    out: Tensor | None = None

    def put(rows: Tensor, values: Tensor) -> None:
        nonlocal out
        values = values.detach().cpu()
        if out is None:
            out = torch.zeros((len(data.test), *values.shape[1:]), dtype=values.dtype)
        out[rows] = values

    live = {n: p.detach() for n, p in model.named_parameters()}
    dev = _device(model)
    score = score or (lambda m, p, b: functional_call(m, dict(p), (b,)).logit)
    pos_train = train_idx.lookup(test_idx.users)
    no_train = pos_train < 0
    if no_train.any() or not steps or not rates:
        # users without training rows (or no adaptation asked): the initialisation scores them
        rows = test_idx.rows if (not steps or not rates) else torch.cat(
            [test_idx.rows[test_idx.starts[i]:test_idx.starts[i] + test_idx.counts[i]]
             for i in torch.nonzero(no_train).flatten().tolist()])
        with torch.no_grad():
            for start in range(0, len(rows), 4096):
                r = rows[start:start + 4096]
                put(r, score(model, live, ds.batch(data.test, r).to(dev)))
        if not steps or not rates:
            return out
    have = torch.nonzero(~no_train).flatten()
    order = have[torch.argsort(train_idx.counts[pos_train[have]])]
    rates = {n: r.detach() for n, r in rates.items()}

    def one_task(sup: Batch, sw: Tensor, qry: Batch) -> Tensor:
        return score(model, adapt(model, live, rates, sup, sw, steps=steps), qry)

    for start in range(0, len(order), cfg.test_chunk):
        chunk = order[start:start + cfg.test_chunk]
        s_rows, sw = train_idx.sample(pos_train[chunk], cfg.test_max_support, None, latest=True)
        q_rows, qw = test_idx.sample(chunk, 10**9, None, latest=True)
        sup = task_batch(ds, data.test_train, s_rows).to(dev)
        qry = task_batch(ds, data.test, q_rows).to(dev)
        sw = sw.to(dev)
        if cfg.vectorize:
            logits = adapt_and_predict(model, live, sup, qry, names=list(rates), lr=rates, steps=steps,
                                       support_weight=sw, score=score)
        else:
            logits = torch.stack([one_task(Batch(*(t[i] for t in sup)), sw[i], Batch(*(t[i] for t in qry)))
                                  for i in range(len(chunk))])
        valid = qw > 0
        put(q_rows[valid], logits.detach().cpu()[valid])
    return out if out is not None else torch.zeros(len(data.test))


# --------------------------------------------------------------------------- one seed, every method
METHOD_LABELS = {
    "perfect_sample": "Perfect Sample-level Selector",
    "perfect_user": "Perfect User-level Selector",
    "sample_selector": "Sample-level Selector",
    "metaselector": "MetaSelector",
    "metaselector_simplified": "MetaSelector-Simplified",
}


@dataclass
class SeedResult:
    seed: int
    metrics: dict[str, dict[str, float]]  # method -> {auc, logloss}
    best_share: dict[str, float]  # base model -> share of users for whom it is best
    user_loss: dict[str, np.ndarray]  # method -> per-user test logloss (sorted users)
    seconds: dict[str, float]
    selector_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> lambda_stats etc.
    preds: dict[str, np.ndarray] = field(default_factory=dict)  # method -> test probabilities (metactr bench)


def lambda_stats(lam: np.ndarray, users: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """How much a selector actually selects, from its test weights ``lam`` [N, K].

    ``mean_weight``: average lambda per base model; ``entropy``: mean per-row entropy of lambda
    (log K = a uniform mix, 0 = one model); ``user_std``: spread across users of each user's
    mean lambda (0 = every user gets the same mix, i.e. no user-level selection);
    ``user_argmax_share``: share of users whose mean lambda is largest on each model.
    """
    lam = np.asarray(lam, dtype=np.float64)
    from metactr.papers.metaselector.baselines import per_user_mean

    _, per_user = per_user_mean(lam, users)
    top = np.bincount(per_user.argmax(axis=1), minlength=len(names)) / max(len(per_user), 1)
    ent = -(lam * np.log(np.clip(lam, 1e-12, None))).sum(axis=1)
    return {"mean_weight": dict(zip(names, lam.mean(axis=0).round(4).tolist(), strict=True)),
            "entropy": float(ent.mean()), "max_entropy": float(np.log(len(names))),
            "user_std": dict(zip(names, per_user.std(axis=0).round(4).tolist(), strict=True)),
            "user_argmax_share": dict(zip(names, top.round(4).tolist(), strict=True))}


def rate_stats(rates: Mapping[str, Tensor], n_models: int) -> dict[str, float]:
    """Mean learned Meta-SGD rate per parameter group (``base.<k>`` and ``selector``)."""
    out = {}
    for grp in [f"base.{k}" for k in range(n_models)] + ["selector"]:
        v = [r.detach().flatten() for n, r in rates.items() if n.startswith(grp + ".")]
        if v:
            out[grp] = float(torch.cat(v).mean())
    return out


def _score_with_weights(model: CTRModel, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    out = functional_call(model, dict(params), (batch,))
    return torch.cat([out.logit.unsqueeze(-1), out.log_weights], dim=-1)


def _pretrained(cfg: SelectorExperiment, ds: PreparedDataset, split: Split, g: torch.Generator, *,
                min_epochs: int = 1, log: Callable[[str], None] | None = None,
                device: torch.device | None = None) -> list[CTRModel]:
    """Fresh base models pre-trained on ``split`` (at least ``min_epochs`` epochs each), on
    ``device`` (default: the one ``cfg.device`` names)."""
    models = build_base_models(cfg, ds, device or resolve_device(cfg.device))
    for m, b in zip(models, cfg.base_models, strict=True):
        hist = pretrain(m, b, ds, split, epochs=max(base_epochs(cfg, b), min_epochs),
                        batch_size=cfg.pretrain.batch_size, generator=g)
        if log is not None:
            log(f"  pre-trained {b.name}: train loss {hist[-1] if hist else float('nan'):.4f}")
    return models


def _probs(models: Sequence[CTRModel], ds: PreparedDataset, split: Split, bs: int) -> np.ndarray:
    return np.stack([predict_proba(m, ds, split, batch_size=bs) for m in models], axis=1)


def run_seed(cfg: SelectorExperiment, data: SelectorData, seed: int,
             log: Callable[[str], None] = lambda s: None) -> SeedResult:
    """Every method of Table 3 for one seed: single models, oracles, sample-level selector,
    MetaSelector and MetaSelector-Simplified, all scored on the same test rows."""
    from metactr.eval.metrics import auc, logloss
    from metactr.papers.metaselector import baselines as sb
    from metactr.utils import seed_everything

    g = seed_everything(seed)
    ds, bs = data.ds, cfg.eval_batch_size
    names = [b.name for b in cfg.base_models]
    if len(set(names)) != len(names):
        raise ConfigError("base model names must be distinct", field="base_models")
    fine_tune_rates({}, cfg.meta.test_lr, names)  # a bad meta.test_lr fails before any training
    fine_tune_rates({}, cfg.meta.inner_lr_by_model, names, field="meta.inner_lr_by_model")
    y, users = data.test.label.numpy(), data.test.user_id.numpy()
    secs: dict[str, float] = {}

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)  # fails early, with the field, where CUDA is missing
    bases = (_pretrained(cfg, ds, data.train, g, min_epochs=0, log=log, device=device)
             if cfg.pretrain.enabled
             else build_base_models(cfg, ds, device))
    secs["pretrain"] = time.perf_counter() - t0
    P = _probs(bases, ds, data.test, bs)
    preds: dict[str, np.ndarray] = {n: P[:, k] for k, n in enumerate(names)}
    preds["perfect_sample"] = sb.perfect_sample_selector(P, y)
    preds["perfect_user"] = sb.perfect_user_selector(P, y, users)
    share = sb.best_model_share(P, y, users, names)

    sbases: list[CTRModel] | None = None  # base models pre-trained on the support parts only
    if cfg.sample_selector.enabled:
        t0 = time.perf_counter()
        sc = cfg.sample_selector
        if sc.refit_bases:  # as the paper: base models trained on the 75% part only
            sbases = _pretrained(cfg, ds, data.support, g, device=device)
        sel_bases = sbases if sc.refit_bases else bases
        sel = sb.SampleLevelSelector(ds, len(names), hidden=sc.hidden, embed_dim=sc.embed_dim)
        sel.fit(data.query, _probs(sel_bases, ds, data.query, bs), epochs=sc.epochs, batch_size=sc.batch_size,
                lr=sc.lr, generator=g)
        preds["sample_selector"] = sel.predict(data.test, _probs(sel_bases, ds, data.test, bs))
        secs["sample_selector"] = time.perf_counter() - t0

    meta_bases = bases
    if cfg.pretrain.meta_bases == "support":  # query rows held out for the base models
        if sbases is None:
            sbases = _pretrained(cfg, ds, data.support, g, device=device)
        meta_bases = sbases
    stats: dict[str, dict[str, Any]] = {}
    variants = [("metaselector", ("base", "selector"), True)]
    if cfg.simplified:
        variants.append(("metaselector_simplified", ("selector",), cfg.meta.simplified_test_adapt))
    for key, groups, test_adapt in variants:
        t0 = time.perf_counter()
        ms = MetaSelector(ds.spec, [copy.deepcopy(m) for m in meta_bases], base_names=names,
                          embed_dim=cfg.selector.embed_dim, hidden=cfg.selector.hidden,
                          use_predictions=cfg.selector.use_predictions, use_history=cfg.selector.use_history
                          ).to(device)
        res = meta_train(ms, data, cfg.meta, adapt_groups=groups, outer_groups=groups, generator=g,
                         log=log)
        rates = fine_tune_rates(res.rates.as_dict(), cfg.meta.test_lr, names) if test_adapt else None
        out = meta_test(ms, rates, data, cfg.meta, score=_score_with_weights)
        preds[key] = torch.sigmoid(out[:, 0]).numpy()
        secs[key] = time.perf_counter() - t0
        # did meta-training move the base models' initialisation (no per-user adaptation)?
        drift = {n: auc(y, p) for n, p in zip(names, _probs(list(ms.base), ds, data.test, bs).T, strict=True)}
        stats[key] = {**lambda_stats(out[:, 1:].exp().numpy(), users, names),
                      "rates": rate_stats(res.rates.as_dict(), len(names)),
                      "base_auc_after_meta": drift,
                      "query_loss_first_last": [float(np.mean(res.losses[:20])), float(np.mean(res.losses[-20:]))]
                      if res.losses else []}
        st = stats[key]
        log(f"  {key}: meta-trained {cfg.meta.episodes} episodes in {res.seconds:.1f}s; test lambda "
            f"{st['mean_weight']}, entropy {st['entropy']:.3f}/{st['max_entropy']:.3f}, "
            f"user std {st['user_std']}; rates {st['rates']}")

    metrics = {k: {"auc": auc(y, p), "logloss": logloss(y, p)} for k, p in preds.items()}
    ref = cfg.reference_model if cfg.reference_model in names else names[-1]
    user_loss = {k: sb.per_user_logloss(preds[k], y, users) for k in ("metaselector", ref) if k in preds}
    return SeedResult(seed, metrics, share, user_loss, secs, stats, preds)


# --------------------------------------------------------------------------- a toy dataset
