"""MetaSelector's baselines and bounds (Luo et al., WWW 2020, sec. 3.2 and 5.2-5.4).

* per-user analysis: each user's test logloss under each base model, and the share of users
  for whom each base model is best (paper Table 1);
* the perfect sample-level and user-level selectors (oracles that pick, per test sample or per
  user, the base model with the lowest loss on the *test* data: upper bounds, not methods);
* the sample-level selector: per-sample labels = the base model with the lowest logloss on the
  25% held-out part of the training data, a 400-400-400 MLP classifier on the features plus the
  base models' predictions, final prediction = the average of the base predictions weighted by
  the classifier's probabilities.

Everything here works on probability matrices ``P [N, K]`` (N samples, K base models) and is
vectorized (no per-user Python loops).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metactr.data.prepared import PreparedDataset, Split
from metactr.eval.metrics import EPS
from metactr.models.metaselector import SelectorNet
from metactr.strategies.base import Context, Phase, Strategy
from metactr.train.trainer import Trainer


def sample_losses(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample logloss of each column of ``P`` [N, K] (clipped like ``metrics.logloss``)."""
    P = np.clip(np.asarray(P, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64).reshape(-1, *([1] * (P.ndim - 1)))
    return -(y * np.log(P) + (1 - y) * np.log(1 - P))


def per_user_mean(values: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique users, mean of ``values`` [N] or [N, K] per user)."""
    uniq, inv = np.unique(np.asarray(users), return_inverse=True)
    v = np.asarray(values, dtype=np.float64)
    shape = (uniq.size,) + v.shape[1:]
    sums = np.zeros(shape)
    np.add.at(sums, inv, v)
    counts = np.bincount(inv, minlength=uniq.size).reshape(-1, *([1] * (v.ndim - 1)))
    return uniq, sums / counts


def perfect_sample_selector(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per test sample, the prediction of the base model with the lowest loss on it (an oracle)."""
    best = np.argmin(sample_losses(P, y), axis=1)
    return P[np.arange(P.shape[0]), best]


def perfect_user_selector(P: np.ndarray, y: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Per user, the predictions of the base model with the lowest test logloss for that user."""
    uniq, inv = np.unique(np.asarray(users), return_inverse=True)
    _, user_loss = per_user_mean(sample_losses(P, y), users)
    best = np.argmin(user_loss, axis=1)  # [U]
    return P[np.arange(P.shape[0]), best[inv]]


def best_model_share(P: np.ndarray, y: np.ndarray, users: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Share of users for whom each base model has the lowest test logloss (paper Table 1)."""
    _, user_loss = per_user_mean(sample_losses(P, y), users)
    best = np.argmin(user_loss, axis=1)
    counts = np.bincount(best, minlength=len(names))
    return {n: float(c) / max(len(best), 1) for n, c in zip(names, counts, strict=True)}


def per_user_logloss(p: np.ndarray, y: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Each user's mean test logloss (users in sorted order)."""
    return per_user_mean(sample_losses(np.asarray(p)[:, None], y)[:, 0], users)[1]


def mix(P: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The convex mix ``sum_k w_k p_k`` per sample."""
    return (np.asarray(P) * np.asarray(weights)).sum(axis=1)


# --------------------------------------------------------------------------- sample-level selector
class SampleLevelSelector:
    """The paper's sample-level selector (sec. 5.2): an MLP classifier of the best base model.

    ``fit(ds, split, P, ...)``: labels = argmin_k logloss_k on the rows of ``split`` (the 25%
    held-out training part), inputs = the row's features (own embedding) + ``P``'s row.
    ``predict(ds, split, P)``: the classifier-weighted average of ``P``'s rows.
    """

    def __init__(self, ds: PreparedDataset, n_models: int, *, hidden: Sequence[int] = (400, 400, 400),
                 embed_dim: int = 10) -> None:
        self.ds = ds
        self.net = SelectorNet(ds.spec, n_models, embed_dim=embed_dim, hidden=tuple(hidden))

    def fit(self, split: Split, P: np.ndarray, *, epochs: int, batch_size: int, lr: float,
            generator: torch.Generator) -> list[float]:
        """Train the classifier in the Trainer; the mean training loss of each epoch."""
        if epochs <= 0:
            self.net.eval()
            return []
        fitted = Trainer().fit(self.net, self.ds, split, _BestModelClassifier(self, P, lr), epochs=epochs,
                               batch_size=batch_size, generator=generator)
        self.net.eval()
        return [r["train_loss"] for r in fitted.history]

    @torch.no_grad()
    def weights(self, split: Split, P: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        self.net.eval()
        Pt = torch.from_numpy(np.asarray(P, dtype=np.float32))
        out: list[Tensor] = []
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            out.append(self.net(self.ds.batch(split, idx), Pt[idx]).exp())
        return torch.cat(out).numpy() if out else np.zeros((0, P.shape[1]), dtype=np.float32)

    def predict(self, split: Split, P: np.ndarray) -> np.ndarray:
        return mix(P, self.weights(split, P))


class _ClassifierRows(Phase):
    def __init__(self, s: _BestModelClassifier) -> None:
        self.s = s

    def steps_per_epoch(self) -> int:
        return self.s.ctx.row_steps

    def stream(self):
        ctx = self.s.ctx
        n, bs = len(ctx.split), ctx.batch_size
        order = torch.randperm(n, generator=ctx.generator)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            yield ctx.dataset.batch(ctx.split, idx), self.s.P[idx], self.s.labels[idx]

    def rows(self, item) -> int:
        return int(item[2].numel())

    def step(self, item) -> Tensor:
        batch, p, labels = item
        loss = F.nll_loss(self.s.ctx.model(batch, p), labels)
        self.s.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.s.opt.step()
        return loss.detach()


class _BestModelClassifier(Strategy):
    """Cross-entropy of the best base model of each row (argmin of the per-model logloss), Adam."""

    def __init__(self, sel: SampleLevelSelector, P: np.ndarray, lr: float) -> None:
        super().__init__(None)
        self.sel, self.lr = sel, lr
        self.P = torch.from_numpy(np.asarray(P, dtype=np.float32))
        self.raw_P = P

    def setup(self, ctx: Context) -> list[Phase]:
        self.ctx = ctx
        self.labels = torch.from_numpy(np.argmin(sample_losses(self.raw_P, ctx.split.label.numpy()), axis=1))
        self.opt = torch.optim.Adam(ctx.model.parameters(), lr=self.lr)
        return [_ClassifierRows(self)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"main": self.opt} if self.ctx else {}
