"""Predictions after per-session fast adaptation: each session adapts on its own labelled history
(``data.tasks.session_tasks``) before its target is scored, a batch of sessions at a time
(``engine.functional.adapt_and_predict``: vectorized, task-local tables). Used at FT/test by the
``session_maml`` strategy; any model and parameter group work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metactr.data.prepared import PreparedDataset, Split
from metactr.data.tasks import session_tasks
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
