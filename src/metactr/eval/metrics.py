"""Metrics and confidence intervals shared by every experiment.

AUC and LogLoss come from scikit-learn (well kept, exact tie handling). GAUC is the
sample-count-weighted mean of per-user AUCs over users that have both classes, computed with
one vectorized rank pass instead of a Python loop per user.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def auc(y_true, y_prob) -> float:
    """ROC AUC; NaN when only one class is present (instead of raising)."""
    y, p = _np(y_true), _np(y_prob)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def logloss(y_true, y_prob) -> float:
    y, p = _np(y_true), np.clip(_np(y_prob), EPS, 1 - EPS)
    if y.size == 0:
        return float("nan")
    return float(log_loss(y, p, labels=[0, 1]))


def gauc(y_true, y_prob, groups) -> float:
    """User-weighted AUC (DIN's GAUC): sum_u n_u * AUC_u / sum_u n_u over users with both classes."""
    y, p, g = _np(y_true), _np(y_prob), np.asarray(groups).reshape(-1)
    if y.size == 0:
        return float("nan")
    # rank within group (average ranks for ties) via a stable sort on (group, score)
    order = np.lexsort((p, g))
    g_s, p_s, y_s = g[order], p[order], y[order]
    boundaries = np.flatnonzero(np.r_[True, g_s[1:] != g_s[:-1], True])
    starts, ends = boundaries[:-1], boundaries[1:]
    # average ranks for ties of (group, score)
    key_change = np.r_[True, (g_s[1:] != g_s[:-1]) | (p_s[1:] != p_s[:-1]), True]
    tie_b = np.flatnonzero(key_change)
    tie_len = np.diff(tie_b)
    first = np.repeat(tie_b[:-1], tie_len)
    grp_start = np.repeat(starts, ends - starts)
    rank = (first - grp_start) + (np.repeat(tie_len, tie_len) + 1) / 2.0  # 1-based avg rank in group
    n = ends - starts
    n_pos = np.add.reduceat(y_s, starts)
    rank_pos = np.add.reduceat(rank * y_s, starts)
    n_neg = n - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    auc_u = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(auc_u * n[ok]) / np.sum(n[ok]))


def rel_impr(auc_model: float, auc_base: float) -> float:
    """RelImpr (MetaSelector eq. 7, after DeepFM/AutoInt): (AUC_m - 0.5)/(AUC_b - 0.5) - 1."""
    return (auc_model - 0.5) / (auc_base - 0.5) - 1.0


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% Student-t interval across runs (seeds). NaNs are dropped."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def bootstrap_ci95(y_true, y_prob, metric=auc, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap 95% interval (lo, hi) of ``metric`` over samples.

    Resampling indices are drawn as one [n_boot, n] matrix; the metric runs once per resample.
    """
    y, p = _np(y_true), _np(y_prob)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(n_boot, y.size))
    vals = np.array([metric(y[i], p[i]) for i in idx])
    vals = vals[~np.isnan(vals)]
    point = metric(y, p)
    if vals.size == 0:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return point, float(lo), float(hi)


def paired_diff_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width of the per-seed difference a - b (paired across seeds)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return mean_ci95(d)


def classification_metrics(y_true, y_prob, groups=None) -> dict[str, float]:
    out = {"auc": auc(y_true, y_prob), "logloss": logloss(y_true, y_prob), "n": int(_np(y_true).size)}
    if groups is not None:
        out["gauc"] = gauc(y_true, y_prob, groups)
    return out
