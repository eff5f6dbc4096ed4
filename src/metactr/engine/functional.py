"""The meta-learning engine: inner loops on dicts of tensors with ``torch.func``.

Every strategy (MAML first/second order, Meta-SGD, Reptile, RML's two-phase schedule,
MetaSelector) adapts a *subset* of a model's parameters, chosen by name, with a few SGD steps on
the shared ``objective`` (``metactr.models.base``). Parameters are plain dicts ``name -> Tensor``
so that the adapted copy is a differentiable function of the originals (second-order MAML) and
so that ``vmap`` can run the inner loops of all tasks of a meta-batch at once.

Tasks in a meta-batch are padded to a common size (``metactr.data.tasks.pad_tasks``); padded
rows carry weight 0, so they influence neither the inner nor the outer loss.

Adapted embedding tables are task-local by default (``metactr.engine.local_tables``): each task
adapts only the rows its support and query batches touch, which gives the same meta-gradient as
adapting the whole table without ``[T, V, D]`` per-task copies. ``local_tables=False`` (or
``with local_tables_default(False):``) forces the dense path.

Written from the papers (Finn et al. 2017, MAML; Li et al. 2017, Meta-SGD; Nichol et al. 2018,
Reptile); no learn2learn/higher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metactr.data.batch import Batch
from metactr.engine.local_tables import LocalPlan, localise, plan_local_tables, with_task_dim
from metactr.models.base import CTRModel, objective

LearningRate = float | Mapping[str, Tensor]

_LOCAL_TABLES: ContextVar[bool] = ContextVar("metactr_local_tables", default=True)


@contextmanager
def local_tables_default(enabled: bool) -> Iterator[None]:
    """Within the block, ``maml_outer_loss``/``fast_adapt`` called with ``local_tables=None``
    (their default) use task-local tables iff ``enabled`` (benchmarks, A/B checks)."""
    token = _LOCAL_TABLES.set(bool(enabled))
    try:
        yield
    finally:
        _LOCAL_TABLES.reset(token)


def _use_local(flag: bool | None) -> bool:
    return _LOCAL_TABLES.get() if flag is None else bool(flag)


def live_params(model: nn.Module) -> dict[str, Tensor]:
    """``name -> nn.Parameter`` of ``model`` (the live objects: gradients flow back to them)."""
    return dict(model.named_parameters())


def _check_names(params: Mapping[str, Tensor], names: Sequence[str]) -> list[str]:
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"cannot adapt unknown parameter(s) {missing[:3]}")
    if not names:
        raise ValueError("inner_adapt needs at least one parameter name to adapt")
    return names


def _rate(lr: LearningRate, name: str) -> Tensor | float:
    return lr[name] if isinstance(lr, Mapping) else lr


def inner_adapt(model: CTRModel, params: Mapping[str, Tensor], support: Batch, *, names: Sequence[str],
                lr: LearningRate, steps: int = 1, first_order: bool = False,
                weight: Tensor | None = None) -> dict[str, Tensor]:
    """``steps`` SGD steps on ``objective(model, ., support)`` for the parameters ``names``.

    Returns a new dict (the others entries are the very same tensors). The result is
    differentiable w.r.t. ``params`` and tensor learning rates (Meta-SGD) unless
    ``first_order``, in which case the inner gradients are treated as constants (FOMAML).
    Works inside ``vmap`` (one task per call) because it uses ``torch.func.grad``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    names = _check_names(params, names)
    current = dict(params)

    def loss_of(sub: dict[str, Tensor], rest: dict[str, Tensor]) -> Tensor:
        return objective(model, {**rest, **sub}, support, weight)[0]

    for _ in range(steps):
        sub = {n: current[n] for n in names}
        rest = {n: t for n, t in current.items() if n not in sub}
        grads = grad(loss_of)(sub, rest)
        for n in names:
            g = grads[n].detach() if first_order else grads[n]
            current[n] = current[n] - _rate(lr, n) * g
    return current


def _ones_weight(b: Batch) -> Tensor:
    return torch.ones(b.label.shape, dtype=torch.get_default_dtype() if not b.label.is_floating_point()
                      else b.label.dtype, device=b.label.device)


def maml_outer_loss(model: CTRModel, params: Mapping[str, Tensor], support: Batch, query: Batch, *,
                    names: Sequence[str], lr: LearningRate, steps: int = 1, first_order: bool = False,
                    support_weight: Tensor | None = None, query_weight: Tensor | None = None,
                    vectorize: bool = True, local_tables: bool | None = None) -> Tensor:
    """Mean over tasks of the query loss after ``inner_adapt`` on each task's support set.

    ``support``/``query`` carry a leading task dimension ``[T, S, ...]`` / ``[T, Q, ...]``;
    the weights ``[T, S]`` / ``[T, Q]`` mask padded rows. ``vectorize=True`` runs all tasks
    in one ``vmap`` (same result as the per-task loop, which ``vectorize=False`` runs).
    ``local_tables`` (default: on, see ``local_tables_default``) adapts per task only the rows
    of the adapted embedding tables that the task touches (same meta-gradient, see
    ``metactr.engine.local_tables``; tables where that would not be exact stay dense).
    Call ``.backward()`` on the result to get the meta-gradient in ``params``' ``.grad``.
    """
    if support.label.dim() != 2 or query.label.dim() != 2:
        raise ValueError("maml_outer_loss expects support/query with a leading task dimension [T, S]")
    if support.label.shape[0] != query.label.shape[0]:
        raise ValueError(f"support has {support.label.shape[0]} tasks but query has {query.label.shape[0]}")
    sw = _ones_weight(support) if support_weight is None else support_weight
    qw = _ones_weight(query) if query_weight is None else query_weight
    params = dict(params)
    names = _check_names(params, names)
    if vectorize:
        plan, frozen = _plans(model, params, names, [support, query], local_tables)
        return _vectorized_outer_loss(model, params, support, query, sw, qw, names=names, lr=lr,
                                      steps=steps, first_order=first_order, plan=plan, frozen=frozen)
    plan = plan_local_tables(model, names, [support, query], params) if _use_local(local_tables) else None

    def task_loss(t: int) -> Tensor:
        p, rates = params, lr
        if plan is not None:  # this task's rows of the adapted tables (see local_tables)
            p, rates = localise(plan.select(t), params, lr, names)
        adapted = inner_adapt(model, p, support.select(t), names=names, lr=rates, steps=steps,
                              first_order=first_order, weight=sw[t])
        return objective(model, adapted, query.select(t), qw[t])[0]

    losses = torch.stack([task_loss(t) for t in range(support.label.shape[0])])
    return losses.mean()


def _vectorized_outer_loss(model: CTRModel, params: dict[str, Tensor], support: Batch, query: Batch,
                           sw: Tensor, qw: Tensor, *, names: list[str], lr: LearningRate, steps: int,
                           first_order: bool, plan: LocalPlan | None = None,
                           frozen: LocalPlan | None = None) -> Tensor:
    """All tasks at once: per-task copies ``[T, ...]`` of the adapted parameters, the forward
    pass vmapped over tasks, and the inner gradients taken with plain autograd.

    Tasks are independent, so the gradient of the *sum* of the per-task support losses w.r.t.
    the stacked copies is exactly the stack of per-task gradients. Using autograd here instead
    of ``torch.func.grad`` inside ``vmap`` avoids functorch's grad-transform wrappers, which
    made the second-order backward ~1.5-2x slower than plain double backward on CPU.

    With a ``plan``, each localised table's copies are the tasks' own rows ``[T, U, D]``
    (``W.index_select``, so the meta-gradient reaches ``W``) and its ``row_map [T, V]`` goes in
    as a per-task buffer; its Meta-SGD rates are gathered the same way. (Passing the copies
    stacked ``[T * U, D]`` and unbatched was tried: vmap's ``index_select`` rule then expands
    the stack to ``[T, T * U, D]`` and gathers from it, T times the work.)
    """
    _check_names(params, names)
    T = support.label.shape[0]
    shared, maps = _task_inputs(params, names, plan, frozen)

    def task_loss(p: dict[str, Tensor], m: dict[str, Tensor], b: Batch, w: Tensor) -> Tensor:
        return objective(model, {**shared, **m, **p}, b, w)[0]

    batched_loss = vmap(task_loss, randomness="different")
    fast, rates = _task_copies(params, names, lr, T, plan)
    # constants (e.g. a finite-difference probe): the inner loop still needs gradients
    fast = {n: f if f.requires_grad else f.clone().requires_grad_(True) for n, f in fast.items()}
    for _ in range(steps):
        loss = batched_loss(fast, maps, support, sw).sum()
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
        fast = {n: fast[n] - rates[n] * (g.detach() if first_order else g)
                for n, g in zip(names, grads, strict=True)}
    return batched_loss(fast, maps, query, qw).mean()


def _plans(model: CTRModel, params: Mapping[str, Tensor], names: list[str], batches: list[Batch],
           local_tables: bool | None) -> tuple[LocalPlan | None, LocalPlan | None]:
    """Local-table plans for the adapted tables and for the tables that are not adapted."""
    if not _use_local(local_tables):
        return None, None
    return (plan_local_tables(model, names, batches, params),
            plan_local_tables(model, [n for n in params if n not in names], batches, params))


def _task_inputs(params: Mapping[str, Tensor], names: list[str], plan: LocalPlan | None,
                 frozen: LocalPlan | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(shared, per_task)``: the parameters every task shares, and the per-task ``[T, ...]``
    inputs besides the adapted copies (row maps; the task's rows of tables *not* adapted).

    Tables that are not adapted go local too: under vmap, a lookup of a shared table with
    per-task ids has a per-task [T, V, D] gradient (zero-filled, then summed); with the task's
    rows gathered once outside vmap it is [T, U, D]."""
    shared = {n: t for n, t in params.items() if n not in names}
    per_task = plan.buffers() if plan is not None else {}
    if frozen is not None:
        for n in frozen.tables:
            per_task[n] = frozen.gather(n, shared.pop(n))
        per_task.update(frozen.buffers())
    return shared, per_task


def _task_copies(params: Mapping[str, Tensor], names: list[str], lr: LearningRate, T: int,
                 plan: LocalPlan | None) -> tuple[dict[str, Tensor], dict[str, Tensor | float]]:
    """Per-task copies ``[T, ...]`` of the adapted parameters (a localised table: the task's own
    rows ``[T, U, D]``) and the matching learning rates."""
    rates = {n: _rate(lr, n) for n in names}
    fast = {}
    for n in names:
        if plan is not None and n in plan:
            fast[n] = plan.gather(n, params[n])
            rates[n] = plan.gather_rate(n, rates[n], params[n].shape)
        else:
            fast[n] = params[n].unsqueeze(0).expand(T, *params[n].shape)
    return fast, rates


def adapt_and_predict(model: CTRModel, params: Mapping[str, Tensor], support: Batch, query: Batch, *,
                      names: Sequence[str], lr: LearningRate, steps: int = 1,
                      support_weight: Tensor | None = None, local_tables: bool | None = None,
                      score: Callable[[CTRModel, Mapping[str, Tensor], Batch], Tensor] | None = None) -> Tensor:
    """Meta-test for a batch of T tasks in one call: adapt ``names`` on each task's support
    (``[T, S, ...]``, weights ``[T, S]``) with ``steps`` SGD steps, no graph kept, and return
    the adapted model's logits on that task's query rows, ``[T, Q]`` (or, with ``score``,
    ``score(model, adapted parameters, query)`` per task: e.g. MetaSelector's mixture weights).

    Same numbers as ``vmap`` over tasks of ``inner_adapt`` + ``functional_call``, but vectorized
    with plain autograd and, by default, task-local embedding tables: a chunk of users adapting
    every table no longer holds ``[T, V, D]`` copies of each table and its gradient.
    """
    if support.label.dim() != 2 or query.label.dim() != 2 or support.label.shape[0] != query.label.shape[0]:
        raise ValueError("adapt_and_predict expects support/query with the same leading task dimension [T, S]")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = {n: t.detach() for n, t in params.items()}
    names = _check_names(params, names)
    lr = {n: r.detach() for n, r in lr.items()} if isinstance(lr, Mapping) else lr
    sw = _ones_weight(support) if support_weight is None else support_weight
    plan, frozen = _plans(model, params, names, [support, query], local_tables)
    shared, maps = _task_inputs(params, names, plan, frozen)

    def task_loss(p: dict[str, Tensor], m: dict[str, Tensor], b: Batch, w: Tensor) -> Tensor:
        return objective(model, {**shared, **m, **p}, b, w)[0]

    def task_logit(p: dict[str, Tensor], m: dict[str, Tensor], b: Batch) -> Tensor:
        if score is not None:
            return score(model, {**shared, **m, **p}, b)
        return functional_call(model, {**shared, **m, **p}, (b,)).logit

    fast, rates = _task_copies(params, names, lr, support.label.shape[0], plan)
    with torch.enable_grad():
        for _ in range(steps):
            fast = {n: f.detach().requires_grad_(True) for n, f in fast.items()}
            loss = vmap(task_loss, randomness="different")(fast, maps, support, sw).sum()
            grads = torch.autograd.grad(loss, [fast[n] for n in names], allow_unused=True)
            fast = {n: fast[n].detach() - (0.0 if g is None else rates[n] * g)
                    for n, g in zip(names, grads, strict=True)}
    with torch.no_grad():
        return vmap(task_logit, randomness="different")({n: f.detach() for n, f in fast.items()}, maps, query)


def fast_adapt(model: CTRModel, support: Batch, *, names: Sequence[str] | None = None, lr: LearningRate,
               steps: int = 1, params: Mapping[str, Tensor] | None = None,
               weight: Tensor | None = None, local_tables: bool | None = None) -> dict[str, Tensor]:
    """Adapt ``names`` (all parameters when None) with ``steps`` plain SGD steps on ``support``;
    no graph is kept. The primitive that fine-tuning, evaluation and serving share.

    Returns detached tensors for every parameter (the non-adapted ones are the originals,
    detached), ready for ``functional_call`` or ``predict_proba(params=...)``. Adapted
    embedding tables are adapted on the rows the support touches and written back into a copy
    of the full table (``local_tables``, default on; the other rows are unchanged either way).
    """
    base = live_params(model) if params is None else dict(params)
    current = {n: t.detach() for n, t in base.items()}
    names = _check_names(current, list(current) if names is None else names)
    plan = plan_local_tables(model, names, [with_task_dim(support)], current) if _use_local(local_tables) else None
    if plan is not None:
        full = current
        current, lr = localise(plan, full, lr, names)
    with torch.enable_grad():
        for _ in range(steps):
            sub = {n: current[n].clone().requires_grad_(True) for n in names}
            loss, _ = objective(model, {**current, **sub}, support, weight)
            grads = torch.autograd.grad(loss, list(sub.values()), allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    current[n] = (current[n] - torch.as_tensor(_rate(lr, n)).detach() * g).detach()
    if plan is not None:
        for n, lt in plan.tables.items():
            current[n] = plan.scatter_back(n, full[n], current[n])
            del current[lt.map_name]
    return current


class MetaSGDRates(nn.Module):
    """Meta-SGD's learned per-parameter inner learning rates (Li et al. 2017, "Meta-SGD").

    One rate tensor per adapted parameter, of the same shape, initialised to ``init``. Pass
    ``rates.as_dict()`` as ``lr=`` to ``inner_adapt``/``maml_outer_loss``; the outer optimizer
    then trains the rates together with the model.
    """

    def __init__(self, params: Mapping[str, Tensor], names: Sequence[str], init: float = 0.01) -> None:
        super().__init__()
        if init <= 0:
            raise ValueError(f"initial inner learning rate must be > 0, got {init}")
        self.names = _check_names(params, names)
        # nn.ParameterDict keys may not contain '.', so keep an index-based list
        self.rates = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n].detach(), float(init))) for n in self.names])

    def as_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.rates, strict=True))
