"""Predictions after fast adaptation, vectorized over tasks (``engine.functional.adapt_and_predict``:
task-local tables); any model and parameter group work.

* ``session_adapted_proba``: each session adapts on its own labelled history
  (``data.tasks.session_tasks``) before its target is scored (the ``session_maml`` strategy).
* ``user_adapted_proba``: each user adapts on their latest labelled rows among the splits seen so
  far (train, then the FT sets) before their test rows are scored (``maml`` with ``test_adapt``:
  the user-level variant). A user with no such rows gets the plain prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metactr.data.prepared import PreparedDataset, Split
from metactr.data.tasks import gather_padded, group_rows, group_rows_by_time, session_tasks, task_batch
from metactr.engine.functional import adapt_and_predict
from metactr.models.base import CTRModel


def session_adapted_proba(model: CTRModel, dataset: PreparedDataset, split: Split | str, *, names: Sequence[str],
                          lr: float | Mapping[str, Tensor], steps: int, history_size: int,
                          batch_size: int = 256) -> np.ndarray:
    """Click probabilities of ``split``'s rows, each after ``steps`` SGD steps of ``names`` on its
    session's last ``history_size`` labelled items (0 steps: the plain prediction)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    out: list[Tensor] = []
    try:
        for b in dataset.iter_batches(split, batch_size):
            b = b.to(dev)
            support, sw, query, _ = session_tasks(b, history_size)
            logit = adapt_and_predict(model, params, support, query, names=names, lr=lr, steps=steps,
                                      support_weight=sw.to(dev))
            out.append(torch.sigmoid(logit[:, 0].float()).cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def user_adapted_proba(model: CTRModel, dataset: PreparedDataset, split: Split | str,
                       support_splits: Sequence[Split | str], *, names: Sequence[str],
                       lr: float | Mapping[str, Tensor], steps: int, support_size: int,
                       tasks_per_batch: int = 32, query_size: int = 256) -> np.ndarray:
    """Click probabilities of ``split``'s rows, each user's after ``steps`` SGD steps of ``names``
    on that user's latest ``support_size`` rows of ``support_splits`` (by timestamp, then file
    order). A user with many test rows is scored in tasks of ``query_size`` rows sharing one support."""
    test = dataset.split(split) if isinstance(split, str) else split
    sup = Split.concat("support", [dataset.split(s) if isinstance(s, str) else s for s in support_splits])
    if len(sup) == 0:  # nothing seen: every user gets the plain prediction
        from metactr.eval.predict import predict_proba

        return predict_proba(model, dataset, test)
    out = np.zeros(len(test), dtype=np.float32)
    if len(test) == 0:
        return out
    s_users, s_order, s_starts, s_counts = group_rows_by_time(sup)
    t_users, t_order, t_starts, t_counts = group_rows(test.user_id.numpy())
    pos = np.searchsorted(s_users, t_users)
    has = pos < len(s_users)
    has[has] = s_users[pos[has]] == t_users[has]
    pos = np.where(has, pos, 0)
    s_len = np.where(has, np.minimum(s_counts[pos], support_size), 0)
    s_start = np.where(has, s_starts[pos] + s_counts[pos] - s_len, 0)
    # one task per (user, piece of at most query_size test rows)
    pieces = -(-t_counts // query_size)
    task_user = np.repeat(np.arange(len(t_users)), pieces)
    piece = np.arange(len(task_user)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    q_start = t_starts[task_user] + piece * query_size
    q_len = np.minimum(query_size, t_counts[task_user] - piece * query_size)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    try:
        for a in range(0, len(task_user), tasks_per_batch):
            k = slice(a, a + tasks_per_batch)
            u = task_user[k]
            s_idx, s_w = gather_padded(s_order, s_start[u], s_len[u], support_size)  # no rows: weight 0
            q_idx, q_w = gather_padded(t_order, q_start[k], q_len[k], int(q_len[k].max()))
            support = task_batch(dataset, sup, torch.from_numpy(s_idx)).to(dev)
            query = task_batch(dataset, test, torch.from_numpy(q_idx)).to(dev)
            logit = adapt_and_predict(model, params, support, query, names=names, lr=lr, steps=steps,
                                      support_weight=torch.from_numpy(s_w).to(dev))
            valid = q_w > 0
            out[q_idx[valid]] = torch.sigmoid(logit.float()).cpu().numpy()[valid]
    finally:
        model.train(was)
    return out


def protocol_proba(model: CTRModel, dataset: PreparedDataset, split: Split | str, strategy,
                   seen: Sequence[Split | str]) -> np.ndarray:
    """The protocol's prediction after ``strategy`` trained ``model``: each session adapted on its
    history first (a strategy with ``test_adaptation``), each user adapted on their latest rows of
    the ``seen`` splits (``test_user_adaptation`` returning settings), else the plain prediction."""
    from metactr.eval.predict import predict_proba

    session = getattr(strategy, "test_adaptation", None)
    if session is not None:
        return session_adapted_proba(model, dataset, split, **session())
    user = getattr(strategy, "test_user_adaptation", None)
    settings = user() if user is not None else None
    if settings is not None:
        return user_adapted_proba(model, dataset, split, seen, **settings)
    return predict_proba(model, dataset, split)
