"""Task-local embedding tables for the meta-learning engine.

A task of MetaSelector (or any model whose embedding tables are adapted in the inner loop) looks
up a few hundred rows of tables that hold thousands (FFM's is ``V x (F*k)``). Adapting the whole
table per task means that under ``vmap`` every task carries ``[T, V, D]`` copies of the table and
of its dense gradient, although every row the task does not touch has a zero gradient and stays
exactly as it was. Here each adapted ``FieldEmbedding`` table is replaced, per task, by the rows
the task's support *and* query batches touch:

* ``rows [T, U]``: the sorted unique global rows of each task (padded to the meta-batch's largest
  ``U`` with filler row 0, which ``row_map`` never points at: it gets a zero gradient and is
  dropped);
* ``row_map [T, V]``: global row -> local row (-1 for rows the task does not touch, so that a
  lookup the plan did not foresee fails loudly instead of reading a wrong row);
* the adapted table is ``W.index_select(0, rows)`` (``[T, U, D]``), a differentiable function of
  ``W``: first- and second-order meta-gradients flow back to the full table exactly, and Meta-SGD
  rate tensors shaped like ``W`` are gathered the same way.

``FieldEmbedding.rows`` (``metactr.models.layers``) applies ``row_map`` to every lookup when the
buffer is non-empty, so ``functional_call`` with ``<prefix>.weight`` = local table and
``<prefix>.row_map`` = map computes exactly what the full table computes.

A table stays dense (exact, only slower) when localising it would not be exact: it is not a
``FieldEmbedding`` ``weight``; the model puts an L2 penalty on it (``objective`` then sums over
*all* rows, so untouched rows move); a module on its path sets ``local_tables = False`` (a model
that reads the table other than through ``FieldEmbedding.rows``); or the module already carries a
``row_map``. Not from a paper: an implementation device, the sparse-update idea of every
large-scale CTR trainer applied to per-task fast weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metactr.data.batch import Batch
from metactr.errors import DataError
from metactr.models.layers import FieldEmbedding

# group of a FieldEmbedding -> the Batch fields whose ids are looked up in it (sessions use the
# item layout)
GROUP_FIELDS: dict[str, tuple[str, ...]] = {"user": ("user",), "context": ("context",), "item": ("item", "hist")}


@dataclass(frozen=True)
class LocalTable:
    """One adapted table, localised for the T tasks of a meta-batch."""

    name: str  # "<prefix>.weight"
    map_name: str  # "<prefix>.row_map"
    rows: Tensor  # [T, U] global rows of each task's local table
    row_map: Tensor  # [T, V] global row -> local row, -1 where the task does not touch it

    def gather(self, full: Tensor) -> Tensor:
        """``[V, ...]`` (the table, or a Meta-SGD rate tensor shaped like it) -> ``[T, U, ...]``."""
        T, U = self.rows.shape
        return full.index_select(0, self.rows.reshape(-1)).view(T, U, *full.shape[1:])


@dataclass(frozen=True)
class LocalPlan:
    """Which adapted tables are localised, and how, for one meta-batch of T tasks."""

    tables: dict[str, LocalTable]  # by parameter name

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    def gather(self, name: str, full: Tensor) -> Tensor:
        return self.tables[name].gather(full)

    def gather_rate(self, name: str, rate: Tensor | float, full_shape: torch.Size) -> Tensor | float:
        """A Meta-SGD rate of a localised table: gathered like it when it has one rate per row,
        unchanged when it broadcasts without a row dimension (a scalar, ``[D]``, ``[1, D]``)."""
        if isinstance(rate, Tensor) and rate.dim() == len(full_shape) and rate.shape[0] == full_shape[0] \
                and full_shape[0] > 1:
            return self.gather(name, rate)
        return rate

    def buffers(self) -> dict[str, Tensor]:
        """``<prefix>.row_map -> [T, V]``, to pass through ``functional_call`` with the tables."""
        return {t.map_name: t.row_map for t in self.tables.values()}

    def select(self, t: int) -> LocalPlan:
        """The plan of task ``t`` alone (a leading task dimension of 1)."""
        return LocalPlan({n: LocalTable(lt.name, lt.map_name, lt.rows[t:t + 1], lt.row_map[t:t + 1])
                          for n, lt in self.tables.items()})

    def scatter_back(self, name: str, full: Tensor, local: Tensor) -> Tensor:
        """A copy of ``full`` with task 0's local rows ``local [U, ...]`` written back (single task)."""
        lt = self.tables[name]
        row_map = lt.row_map[0]
        used = torch.nonzero(row_map >= 0).flatten()  # global rows, in local order (sorted)
        return full.index_copy(0, used, local.index_select(0, row_map[used]))


# --------------------------------------------------------------------------- which tables
def _opted_out(model: nn.Module, prefix: str) -> bool:
    """True when the model or a module on the path to ``prefix`` sets ``local_tables = False``."""
    module: nn.Module = model
    if getattr(module, "local_tables", True) is False:
        return True
    for part in prefix.split(".") if prefix else []:
        module = getattr(module, part)
        if getattr(module, "local_tables", True) is False:
            return True
    return False


def localisable_tables(model: nn.Module, names: Sequence[str]) -> dict[str, FieldEmbedding]:
    """``<prefix>.weight -> FieldEmbedding`` for the adapted ``names`` that can be localised
    exactly (see the module docstring for the rules); every other name stays dense."""
    modules = dict(model.named_modules())
    # ``objective`` adds the L2 term of the top-level model only (a MetaSelector's bases add none)
    penalised = float(getattr(model, "l2_weight", 0.0) or 0.0) != 0.0 and hasattr(model, "l2_names")
    l2 = set(model.l2_names()) if penalised else set()
    out: dict[str, FieldEmbedding] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        module = modules.get(prefix)
        if leaf != "weight" or not isinstance(module, FieldEmbedding):
            continue
        if name in l2 or module.row_map.numel() > 0 or _opted_out(model, prefix):
            continue
        out[name] = module
    return out


# --------------------------------------------------------------------------- which rows
def task_rows(module: FieldEmbedding, batches: Sequence[Batch]) -> Tensor:
    """``[T, M]``: every global row the module looks up for each task of ``batches`` (each with a
    leading task dimension ``[T, N, ...]``), repeats included. Padding ids (0) are included: their
    rows are looked up (then masked), so the local table must hold them."""
    parts = []
    for group in module.groups:
        offsets = getattr(module, f"{group}_offsets")
        if offsets.numel() == 0:
            continue
        for b in batches:
            for field in GROUP_FIELDS[group]:
                ids = getattr(b, field)
                if ids.shape[-1] != offsets.shape[0]:
                    raise DataError(f"batch field '{field}' has {ids.shape[-1]} slots but the table's "
                                    f"'{group}' group has {offsets.shape[0]}", field=field)
                parts.append((ids + offsets).reshape(ids.shape[0], -1))
    if not parts:
        ref = batches[0].label
        return torch.zeros(ref.shape[0], 1, dtype=torch.long, device=ref.device)
    return torch.cat(parts, dim=1)


def unique_rows(rows: Tensor, n_rows: int, *, table: str = "table") -> tuple[Tensor, Tensor]:
    """Per task, the sorted unique rows of ``rows [T, M]``: ``(local_rows [T, U], row_map [T, V])``.

    One sort over all tasks (task t's rows shifted by ``t * V``), no per-task or per-row Python.
    ``local_rows`` is padded with row 0 (never referenced); ``row_map`` is -1 off the task's rows.
    A row outside ``[0, n_rows)`` raises ``DataError`` (an id beyond its field's vocabulary).
    """
    T = rows.shape[0]
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        bad = rows[(rows < 0) | (rows >= n_rows)]
        task = int(torch.nonzero((rows < 0) | (rows >= n_rows))[0, 0])
        raise DataError(f"task {task} looks up row {int(bad[0])} of '{table}', which has {n_rows} rows "
                        "(an id beyond its field's vocabulary?)", field=table)
    task_of = torch.arange(T, device=rows.device).unsqueeze(1)
    keys = torch.unique((rows + task_of * n_rows).reshape(-1), sorted=True)
    task, row = keys // n_rows, keys % n_rows
    counts = torch.bincount(task, minlength=T)
    U = max(int(counts.max()) if T else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(keys.numel(), device=rows.device) - starts[task]
    local_rows = torch.zeros(T, U, dtype=torch.long, device=rows.device)
    local_rows[task, pos] = row
    row_map = torch.full((T, n_rows), -1, dtype=torch.long, device=rows.device)
    row_map[task, row] = pos
    return local_rows, row_map


def plan_local_tables(model: nn.Module, names: Sequence[str], batches: Sequence[Batch],
                      params: Mapping[str, Tensor] | None = None) -> LocalPlan | None:
    """The local-table plan for the adapted ``names`` and the T tasks of ``batches`` (support and
    query, each ``[T, N, ...]``), or None when no adapted table can be localised. Table sizes
    come from ``params`` when given (the tensors that will be adapted), else from the model.

    Tables that share a layout (same groups and offsets: every table of one feature spec) share
    one unique-rows computation."""
    tables = localisable_tables(model, names)
    if not tables:
        return None
    by_layout: dict[tuple, tuple[Tensor, Tensor]] = {}
    out: dict[str, LocalTable] = {}
    for name, module in tables.items():
        n_rows = (params[name] if params is not None else module.weight).shape[0]
        layout = (n_rows, *((g, tuple(getattr(module, f"{g}_offsets").tolist())) for g in module.groups))
        if layout not in by_layout:
            by_layout[layout] = unique_rows(task_rows(module, batches), n_rows, table=name)
        rows, row_map = by_layout[layout]
        prefix = name[: -len(".weight")]
        out[name] = LocalTable(name, f"{prefix}.row_map", rows, row_map)
    return LocalPlan(out)


def with_task_dim(b: Batch) -> Batch:
    """A single task's batch ``[N, ...]`` as a meta-batch of one task ``[1, N, ...]``."""
    return Batch(*(t.unsqueeze(0) for t in b))


def localise(plan: LocalPlan, params: Mapping[str, Tensor], lr: float | Mapping[str, Tensor] | None,
             names: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor | float] | float | None]:
    """For a plan of ONE task: ``params`` with each localised table replaced by its ``[U, D]``
    rows and its ``row_map [V]`` added, and ``lr`` with Meta-SGD rate tensors gathered alike."""
    out = dict(params)
    for name, lt in plan.tables.items():
        out[name] = lt.gather(params[name])[0]
        out[lt.map_name] = lt.row_map[0]
    if isinstance(lr, Mapping):
        rates = dict(lr)
        for n in names:
            if n in plan:
                gathered = plan.gather_rate(n, lr[n], params[n].shape)
                rates[n] = gathered[0] if gathered is not lr[n] else gathered
        lr = rates
    return out, lr
