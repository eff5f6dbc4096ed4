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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field as PField
from pydantic import field_validator
from torch import Tensor, nn
from torch.func import functional_call

from metactr.config import StrictModel
from metactr.data.batch import Batch
from metactr.data.prepared import PreparedDataset, Split
from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS
from metactr.data.tasks import UserIndex, task_batch
from metactr.errors import ConfigError, DataError
from metactr.eval.predict import predict_proba
from metactr.engine.functional import MetaSGDRates, adapt_and_predict, inner_adapt, live_params, maml_outer_loss
from metactr.models.metaselector import MetaSelector
from metactr.models.base import CTRModel, build_model, objective
from metactr.strategies.base import Phase, Strategy
from metactr.strategies.plain import FineTune
from metactr.train.trainer import Trainer
from metactr.engine.device import resolve_device

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


# --------------------------------------------------------------------------- configuration
class BaseModelConfig(StrictModel):
    """One base model: a registered model name, its hyper-parameters and how to pre-train it.

    ``beta``/``l1``/``l2`` are FTRL's (McMahan et al. 2013); ``lr`` is its alpha. Our FTRL steps
    on the *mean* gradient of a mini-batch, so McMahan's beta = 1 on per-sample gradients is
    beta = 1 / batch_size here (w = -z / ((beta + sqrt(n)) / alpha) scales with the gradient
    only while sqrt(n) << beta): with beta = 1 and batches of 1000, rare feature values barely
    move and LR stays near the prior (AUC 0.65 on ML-1M instead of the paper's 0.79).
    ``epochs`` None = ``pretrain.epochs``.
    """

    name: str
    hp: dict[str, Any] = PField(default_factory=dict)
    optimizer: Literal["adam", "ftrl", "adagrad", "sgd"] = "adam"
    lr: float = PField(1e-3, gt=0)
    beta: float = PField(1e-3, ge=0)
    l1: float = PField(0.0, ge=0)
    l2: float = PField(0.0, ge=0)
    epochs: int | None = PField(None, ge=0)


class PretrainConfig(StrictModel):
    """Base-model pre-training (Algorithm 1, line 3).

    ``meta_bases`` picks the rows that pre-train the base models MetaSelector starts from:
    ``train`` (the paper: every user's whole training data, support + query) or ``support``
    (ours: the support parts only, so that the query rows of meta-training are *held out* for
    the base models, as the test rows are at meta-test; see docs/metaselector.md). The single
    model baselines are always pre-trained on ``train``.
    """

    enabled: bool = True
    epochs: int = PField(2, ge=0)
    batch_size: int = PField(1000, ge=1)
    meta_bases: Literal["train", "support"] = "train"


class SelectorNetConfig(StrictModel):
    hidden: list[int] = PField(default_factory=lambda: [200, 200, 200])
    embed_dim: int = PField(10, ge=1)
    use_predictions: bool = True
    use_history: bool = True


class MetaTrainConfig(StrictModel):
    """Algorithm 1 with Meta-SGD. ``outer_lr`` None = inner_lr / 10 (the paper's beta)."""

    episodes: int = PField(300, ge=0)
    users_per_episode: int = PField(10, ge=1)
    max_support: int = PField(64, ge=1)
    max_query: int = PField(32, ge=1)
    inner_lr: float = PField(1e-3, gt=0)
    # ours: initial inner rates per base model name and/or 'selector' (the others start at
    # inner_lr), e.g. to meta-train with the same adaptation as meta-test's test_lr
    inner_lr_by_model: dict[str, float] | None = None
    outer_lr: float | None = PField(None, gt=0)
    learn_inner_lr: bool = True  # Meta-SGD; False = plain MAML with a fixed alpha
    inner_steps: int = PField(1, ge=1)
    first_order: bool = False
    vectorize: bool = True
    test_steps: int = PField(1, ge=0)  # adaptation steps at meta-test
    test_max_support: int = PField(1024, ge=1)  # most recent training rows used to adapt at meta-test
    test_chunk: int = PField(64, ge=1)  # users adapted together at meta-test
    simplified_test_adapt: bool = True  # Simplified: adapt the selector at meta-test
    # Fixed fine-tuning rates at meta-test in place of the learned Meta-SGD rates (sec. 5.3: the
    # selector and base models "are firstly fine-tuned before evaluating"): one rate for every
    # adapted parameter, or one per base model name and/or 'selector' (the others keep theirs).
    test_lr: float | dict[str, float] | None = None

    @field_validator("test_lr", "inner_lr_by_model")
    @classmethod
    def _positive_rates(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not x > 0 for x in values):  # also rejects NaN
            raise ValueError(f"rates must be > 0, got {v!r}")
        return v


class SampleSelectorConfig(StrictModel):
    """The paper's sample-level selector (sec. 5.2): a 400-400-400 MLP classifier."""

    enabled: bool = True
    hidden: list[int] = PField(default_factory=lambda: [400, 400, 400])
    embed_dim: int = PField(10, ge=1)
    epochs: int = PField(3, ge=1)
    batch_size: int = PField(1000, ge=1)
    lr: float = PField(1e-3, gt=0)
    refit_bases: bool = True  # base models re-trained on the 75% support part, as the paper


class SelectorExperiment(StrictModel):
    """The whole ``reproduce metaselector`` experiment."""

    base_models: list[BaseModelConfig] = PField(default_factory=lambda: default_base_models())
    pretrain: PretrainConfig = PField(default_factory=PretrainConfig)
    selector: SelectorNetConfig = PField(default_factory=SelectorNetConfig)
    meta: MetaTrainConfig = PField(default_factory=MetaTrainConfig)
    sample_selector: SampleSelectorConfig = PField(default_factory=SampleSelectorConfig)
    simplified: bool = True
    reference_model: str = "deepfm"  # the single model drawn against MetaSelector in the KDE plot
    eval_batch_size: int = PField(4096, ge=1)
    max_users: int | None = PField(None, ge=2)  # keep only the first N users (quick runs)
    disjoint_test_users: bool | None = None  # None: use ms_newuser_* when the dataset has them
    prepare: dict[str, Any] = PField(default_factory=dict)  # extra PrepareConfig keys for the pipeline
    # where base models and selectors train and adapt (the sample-level selector stays on the CPU)
    device: str = PField("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")


def default_base_models() -> list[BaseModelConfig]:
    """LR (FTRL), FM, FFM, DeepFM with latent dimension 10 and a 256-256-256 DeepFM MLP (sec. 5.2).

    The paper's "dropout setting 0.9" is TensorFlow's keep probability, i.e. dropout 0.1.
    """
    return [
        BaseModelConfig(name="lr", optimizer="ftrl", lr=0.1, beta=1e-3),
        BaseModelConfig(name="fm", hp={"embed_dim": 10}),
        BaseModelConfig(name="ffm", hp={"embed_dim": 10}),
        BaseModelConfig(name="deepfm", hp={"embed_dim": 10, "hidden": [256, 256, 256], "dropout": 0.1}),
    ]


# --------------------------------------------------------------------------- data
def concat_splits(a: Split, b: Split, name: str) -> Split:
    ts = None if a.timestamp is None or b.timestamp is None else torch.cat([a.timestamp, b.timestamp])
    return Split(name, torch.cat([a.user_id, b.user_id]), torch.cat([a.hist_ids, b.hist_ids]),
                 torch.cat([a.hist_len, b.hist_len]), torch.cat([a.hist_labels, b.hist_labels]),
                 torch.cat([a.target, b.target]), torch.cat([a.label, b.label]),
                 torch.cat([a.context, b.context]), ts)


@dataclass
class SelectorData:
    """The MetaSelector protocol's splits of one prepared dataset.

    ``train`` = support + query (the user's first 80%, chronological); ``test`` = the last 20%.
    Meta-test users are the same users (their later data) unless the dataset has the optional
    disjoint ``ms_newuser_train`` / ``ms_newuser_test`` splits.
    """

    ds: PreparedDataset
    support: Split
    query: Split
    train: Split
    test: Split
    test_train: Split  # what meta-test users adapt on
    disjoint_test_users: bool

    @classmethod
    def load(cls, root, *, disjoint: bool | None = None, max_users: int | None = None) -> SelectorData:
        data = cls._load(root, disjoint=disjoint)
        return data.keep_users(max_users) if max_users else data

    def keep_users(self, n: int) -> SelectorData:
        """Only the first ``n`` training users (and the first ``n`` meta-test users)."""
        def first(split: Split, k: int) -> Tensor:
            return torch.unique(split.user_id)[:k]

        def only(split: Split, users: Tensor) -> Split:
            return split.subset(torch.nonzero(torch.isin(split.user_id, users)).flatten())

        tr = first(self.train, n)
        te = tr if not self.disjoint_test_users else first(self.test_train, n)
        train = only(self.train, tr)
        return SelectorData(self.ds, only(self.support, tr), only(self.query, tr), train, only(self.test, te),
                            train if not self.disjoint_test_users else only(self.test_train, te),
                            self.disjoint_test_users)

    def validation(self, support_fraction: float | None = None) -> SelectorData:
        """The validation protocol, for choosing settings without reading a test row.

        Each user's support rows play their training rows and their query rows play the test
        rows; for meta-training, the support rows are cut again, chronologically, into the first
        ``support_fraction`` (support, at least one row; None = the pipeline's default) and the
        rest (query), as the pipeline cuts the training rows. Meta-test users are the training
        users (disjoint ones are unread).
        """
        from metactr.data.split import leading_count

        if support_fraction is None:
            from metactr.data.pipeline import MetaSelectorConfig

            support_fraction = MetaSelectorConfig().support_fraction
        if not 0.0 < support_fraction < 1.0:
            raise ConfigError(f"support_fraction must be in (0, 1), got {support_fraction}",
                              field="support_fraction")
        sup, qry = self.support, self.query
        for s in (sup, qry):
            if len(s) == 0:
                raise DataError(f"split '{s.name}' is empty: no validation protocol without it")
        idx = UserIndex.build(sup)
        first = torch.repeat_interleave(idx.starts, idx.counts)  # group start of each grouped row
        rank = torch.arange(len(idx.rows)) - first  # chronological rank within the user's rows
        n_sup = torch.from_numpy(leading_count(idx.counts.numpy(), support_fraction))  # the pipeline's rule
        in_sup = rank < torch.repeat_interleave(n_sup, idx.counts)
        inner_sup = sup.subset(torch.sort(idx.rows[in_sup]).values)
        inner_qry = sup.subset(torch.sort(idx.rows[~in_sup]).values)
        return SelectorData(self.ds, inner_sup, inner_qry, sup, qry, sup, False)

    @classmethod
    def _load(cls, root, *, disjoint: bool | None = None) -> SelectorData:
        ds = PreparedDataset(root)
        have = set(ds.split_names)
        missing = [s for s in (SUPPORT, QUERY, TEST) if s not in have]
        if missing:
            raise DataError(f"not a MetaSelector split: missing {', '.join(missing)} "
                            "(prepare with protocol 'metaselector')", path=root)
        support, query = ds.split(SUPPORT), ds.split(QUERY)
        train = concat_splits(support, query, "ms_train")
        has_new = NEW_TRAIN in have and NEW_TEST in have
        use_new = has_new if disjoint is None else disjoint
        if use_new and not has_new:
            raise DataError("disjoint meta-test users asked for, but the dataset has no "
                            f"{NEW_TRAIN}/{NEW_TEST} splits", path=root)
        if use_new:
            return cls(ds, support, query, train, ds.split(NEW_TEST), ds.split(NEW_TRAIN), True)
        for s in (support, query, ds.split(TEST)):
            if len(s) == 0:
                raise DataError(f"split '{s.name}' is empty", path=root)
        return cls(ds, support, query, train, ds.split(TEST), train, False)


# --------------------------------------------------------------------------- base models
def build_base_models(cfg: SelectorExperiment, ds: PreparedDataset,
                      device: torch.device | None = None) -> list[CTRModel]:
    return [build_model(b.name, ds.spec, **b.hp).to(device or "cpu") for b in cfg.base_models]


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: batches are built on the CPU and moved there."""
    return next(model.parameters()).device


def base_epochs(cfg: SelectorExperiment, b: BaseModelConfig) -> int:
    """Pre-training epochs of base model ``b``: its own, else the experiment's."""
    return cfg.pretrain.epochs if b.epochs is None else b.epochs


def _optimizer(model: nn.Module, b: BaseModelConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if b.optimizer == "adam":
        return torch.optim.Adam(params, lr=b.lr)
    if b.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=b.lr)
    if b.optimizer == "sgd":
        return torch.optim.SGD(params, lr=b.lr)
    from metactr.engine.optim import FTRL

    return FTRL(params, lr=b.lr, beta=b.beta, l1=b.l1, l2=b.l2)


def pretrain(model: CTRModel, b: BaseModelConfig, ds: PreparedDataset, split: Split, *, epochs: int,
             batch_size: int, generator: torch.Generator) -> list[float]:
    """Mini-batch training of one base model on the pooled rows of ``split`` (sec. 5.3), in the
    Trainer with the base model's own optimizer (no clipping, no schedule, no files). Returns the
    mean training loss of each epoch."""
    history: list[float] = []
    if epochs > 0:
        fitted = Trainer(device=_device(model)).fit(model, ds, split, FineTune(_optimizer(model, b), None),
                                                    epochs=epochs, batch_size=batch_size, generator=generator)
        history = [r["train_loss"] for r in fitted.history]
    model.eval()
    return history


# --------------------------------------------------------------------------- the meta engine
def adapt(model: CTRModel, params: Mapping[str, Tensor], rates: Mapping[str, Tensor],
          support: Batch, weight: Tensor, *, steps: int) -> dict[str, Tensor]:
    """``steps`` Meta-SGD steps (eq. 4) of the parameters named in ``rates`` on ONE task
    (the engine's ``inner_adapt``; vmaps over users)."""
    return inner_adapt(model, params, support, names=list(rates), lr=rates, steps=steps, weight=weight)


def meta_loss(model: CTRModel, params: Mapping[str, Tensor], rates: Mapping[str, Tensor],
              support: Batch, query: Batch, sw: Tensor, qw: Tensor, *, steps: int,
              first_order: bool, vectorize: bool) -> Tensor:
    """Mean over the T tasks of the query loss after adaptation on the support ([T, N] batches),
    differentiable (second order unless ``first_order``) in ``params`` and ``rates`` (eq. 6)."""
    return maml_outer_loss(model, params, support, query, names=list(rates), lr=rates, steps=steps,
                           first_order=first_order, support_weight=sw, query_weight=qw,
                           vectorize=vectorize)


# --------------------------------------------------------------------------- meta-training
@dataclass
class MetaResult:
    model: MetaSelector
    rates: MetaSGDRates
    adapt_names: list[str]
    losses: list[float]
    seconds: float


class _Episodes(Phase):
    """``episodes`` steps: ``users_per_episode`` users, a support and a query sample of each."""

    name = "episode"
    train_mode = False  # no dropout in meta-training (see module docstring)

    def __init__(self, s: MetaSelectorStrategy) -> None:
        self.s = s
        self.log_every = max(1, s.cfg.episodes // 5)

    def steps_per_epoch(self) -> int:
        return self.s.cfg.episodes

    def stream(self):
        s, cfg, g = self.s, self.s.cfg, self.s.ctx.generator
        m = min(cfg.users_per_episode, len(s.users))
        for _ in range(cfg.episodes):
            pick = s.users[torch.randperm(len(s.users), generator=g)[:m]]
            s_rows, sw = s.sup_idx.sample(s.sup_idx.lookup(pick), cfg.max_support, g)
            q_rows, qw = s.qry_idx.sample(s.qry_idx.lookup(pick), cfg.max_query, g)
            yield (task_batch(s.data.ds, s.data.support, s_rows), task_batch(s.data.ds, s.data.query, q_rows), sw, qw)

    def rows(self, item) -> int:
        return int(item[2].sum() + item[3].sum())

    def step(self, item) -> Tensor:
        s, cfg = self.s, self.s.cfg
        support, query, sw, qw = item
        loss = meta_loss(s.ctx.model, s.live, s.rates.as_dict(), support, query, sw, qw, steps=cfg.inner_steps,
                         first_order=cfg.first_order, vectorize=cfg.vectorize)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        with torch.no_grad():  # a negative inner rate would turn adaptation into ascent
            for r in s.rates.rates:
                r.clamp_(min=0.0)
        s.losses.append(float(loss.detach()))
        return loss.detach()


class MetaSelectorStrategy(Strategy):
    """Algorithm 1 (with Meta-SGD, eq. 5) on the training users of ``data``: the inner step adapts
    ``adapt_groups``, the outer step updates ``outer_groups`` and (if learned) the inner rates."""

    def __init__(self, cfg: MetaTrainConfig, data: SelectorData, adapt_groups: Sequence[str],
                 outer_groups: Sequence[str]) -> None:
        super().__init__(cfg)
        self.data, self.adapt_groups, self.outer_groups = data, adapt_groups, outer_groups

    def setup(self, ctx) -> list[Phase]:
        self.ctx, cfg, model = ctx, self.cfg, ctx.model
        self.names = model.params_in(*self.adapt_groups)
        outer_names = model.params_in(*self.outer_groups)
        self.live = live_params(model)
        for n, p in self.live.items():
            p.requires_grad_(n in outer_names)
        self.rates = MetaSGDRates(self.live, self.names, cfg.inner_lr)
        if cfg.inner_lr_by_model:
            start = fine_tune_rates(self.rates.as_dict(), cfg.inner_lr_by_model, model.base_names,
                                    field="meta.inner_lr_by_model")
            with torch.no_grad():
                for n, r in zip(self.rates.names, self.rates.rates, strict=True):
                    r.copy_(start[n])
        self.rates.requires_grad_(cfg.learn_inner_lr)
        outer_lr = cfg.outer_lr if cfg.outer_lr is not None else cfg.inner_lr / 10.0
        opt_params = [self.live[n] for n in outer_names] + ([*self.rates.parameters()] if cfg.learn_inner_lr else [])
        # fused: one kernel over each tensor instead of ~10 ops (the step touches every full table and
        # its same-shaped Meta-SGD rates; docs/metaselector.md has the timing)
        self.opt = torch.optim.Adam(opt_params, lr=outer_lr, fused=True)
        self.sup_idx, self.qry_idx = UserIndex.build(self.data.support), UserIndex.build(self.data.query)
        # a task needs both a support and a query row
        self.users = self.sup_idx.users[self.qry_idx.lookup(self.sup_idx.users) >= 0]
        if len(self.users) == 0:
            raise DataError("no user has both support and query rows", path=self.data.ds.root)
        self.losses: list[float] = []
        return [_Episodes(self)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"outer": self.opt} if self.ctx else {}

    def extra_tensors(self) -> dict[str, Tensor]:
        return {f"rates.{k}": v for k, v in self.rates.state_dict(keep_vars=True).items()} if self.ctx else {}

    def finish(self) -> dict[str, Any]:
        for p in self.live.values():
            p.requires_grad_(True)
        return {}


@dataclass
class MetaResult:
    model: MetaSelector
    rates: MetaSGDRates
    adapt_names: list[str]
    losses: list[float]
    seconds: float


def meta_train(model: MetaSelector, data: SelectorData, cfg: MetaTrainConfig, *, adapt_groups: Sequence[str],
               outer_groups: Sequence[str], generator: torch.Generator,
               log: Callable[[str], None] | None = None) -> MetaResult:
    """Meta-train ``model`` in the Trainer (``MetaSelectorStrategy``; ``episodes`` steps, one epoch)."""
    t0 = time.perf_counter()
    strategy = MetaSelectorStrategy(cfg, data, adapt_groups, outer_groups)
    Trainer(device=_device(model), log=log).fit(model, data.ds, data.support, strategy, epochs=1, batch_size=1,
                                                generator=generator)
    return MetaResult(model, strategy.rates, strategy.names, strategy.losses, time.perf_counter() - t0)


# --------------------------------------------------------------------------- meta-test
def fine_tune_rates(rates: Mapping[str, Tensor], test_lr: float | Mapping[str, float] | None,
                    base_names: Sequence[str], *, field: str = "meta.test_lr") -> dict[str, Tensor]:
    """The rates of the meta-test adaptation: the learned Meta-SGD ``rates`` (keyed by parameter,
    ``base.<k>.*`` / ``selector.*``) with ``meta.test_lr`` put in place for the parameters of
    the base models (by name) or the selector it names; a single number replaces every rate."""
    if test_lr is None:
        return dict(rates)
    if isinstance(test_lr, Mapping):
        unknown = sorted(set(test_lr) - set(base_names) - {"selector"})
        if unknown:
            raise ConfigError(f"unknown name(s) {unknown} in {field}; expected base model names "
                              f"{list(base_names)} or 'selector'", field=field)
    out = {}
    for name, rate in rates.items():
        owner = "selector" if name.startswith("selector.") else base_names[int(name.split(".")[1])]
        lr = test_lr.get(owner) if isinstance(test_lr, Mapping) else test_lr
        out[name] = rate if lr is None else torch.full_like(rate, float(lr))
    return out


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
    return SeedResult(seed, metrics, share, user_loss, secs, stats)


# --------------------------------------------------------------------------- a toy dataset
