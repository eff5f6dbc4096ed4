"""Figures of ``metactr bench`` (matplotlib, Agg): returned as PNG bytes for a self-contained report.

* ``batch_auc_box`` / ``batch_auc_ridge``: the AUC of each test batch of ``rows`` rows per method
  (the RML paper's Fig. 4: boxplots for Book-Crossing, ridgelines for Avazu);
* ``stage_auc``: AUC with its interval across the fine-tuning stages;
* ``user_loss_kde``: kernel density of the per-user test LogLoss (MetaSelector's Fig. 3).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from metactr.eval.metrics import EPS
from metactr.eval.intervals import weighted_auc

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan"]


def batch_aucs(y: np.ndarray, probs: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """AUC of every complete batch of ``rows`` test rows (a seeded shuffle, the same for every
    method and seed), for each seed of ``probs`` [S, n]; batches of one class are dropped."""
    y = np.asarray(y).astype(np.float64)
    n = len(y)
    k = n // rows
    if k == 0:
        return np.zeros(0)
    perm = np.random.default_rng(seed).permutation(n)[:k * rows].reshape(k, rows)
    out = []
    for p in np.atleast_2d(probs):
        w = np.zeros((k, n))
        w[np.repeat(np.arange(k), rows), perm.ravel()] = 1.0  # one weight row per batch
        out.append(weighted_auc(y, np.asarray(p, dtype=np.float64), w))
    a = np.concatenate(out)
    return a[np.isfinite(a)]


def user_losses(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Mean LogLoss of each user's test rows."""
    _, u = np.unique(users, return_inverse=True)
    pc = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    ll = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
    return np.bincount(u, weights=ll) / np.bincount(u)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def batch_auc_box(aucs: Mapping[str, np.ndarray], title: str) -> bytes:
    plt = _plt()
    names = [m for m, a in aucs.items() if len(a)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.0), dpi=100)
    ax.boxplot([aucs[m] for m in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("AUC per test batch")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def batch_auc_ridge(aucs: Mapping[str, np.ndarray], title: str) -> bytes:
    from scipy.stats import gaussian_kde

    plt = _plt()
    names = [m for m, a in aucs.items() if len(a) >= 2 and np.ptp(a) > 0]
    allv = np.concatenate([aucs[m] for m in names]) if names else np.array([0.4, 0.9])
    xs = np.linspace(allv.min() - 0.05, allv.max() + 0.05, 300)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.6), dpi=100)
    for i, m in enumerate(names):
        d = gaussian_kde(aucs[m])(xs)
        d = 0.9 * d / d.max()
        base = len(names) - 1 - i
        ax.fill_between(xs, base, base + d, color=COLORS[i % len(COLORS)], alpha=0.6, lw=1)
        ax.plot([np.mean(aucs[m])] * 2, [base, base + 0.9], color="k", lw=1)
    ax.set_yticks([len(names) - 1 - i for i in range(len(names))], names, fontsize=8)
    ax.set_xlabel("AUC per test batch (black: mean)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def stage_auc(series: Mapping[str, Mapping[str, tuple[float, float, float]]], stages: Sequence[str],
              labels: Mapping[str, str], title: str) -> bytes:
    """``series[method][stage] = (mean, lo, hi)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    x = np.arange(len(stages))
    for i, (m, by) in enumerate(series.items()):
        pts = [by.get(s) for s in stages]
        mean = np.array([p[0] if p else np.nan for p in pts])
        lo = np.array([p[1] if p else np.nan for p in pts])
        hi = np.array([p[2] if p else np.nan for p in pts])
        off = (i - len(series) / 2) * 0.02
        ax.errorbar(x + off, mean, yerr=[mean - lo, hi - mean], marker="o", ms=3, lw=1, capsize=2,
                    color=COLORS[i % len(COLORS)], label=m)
    ax.set_xticks(x, [labels.get(s, s) for s in stages])
    ax.set_ylabel("test AUC (95% interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    return _png(fig)


def user_loss_kde(losses: Mapping[str, np.ndarray], title: str) -> bytes:
    from scipy.stats import gaussian_kde

    plt = _plt()
    arrays = {k: np.asarray(v, dtype=np.float64)[np.isfinite(v)] for k, v in losses.items()}
    allv = np.concatenate([v for v in arrays.values() if v.size] or [np.zeros(1)])
    lo, hi = float(np.quantile(allv, 0.002)), float(np.quantile(allv, 0.998))
    xs = np.linspace(max(0.0, lo - 0.1 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3), 400)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, (name, v) in enumerate(arrays.items()):
        c = COLORS[i % len(COLORS)]
        if v.size >= 2 and np.ptp(v) > 0:
            ax.plot(xs, gaussian_kde(v)(xs), color=c, lw=2, label=f"{name} (mean {v.mean():.4f}, {v.size} users)")
        if v.size:
            ax.axvline(v.mean(), color=c, ls="--", lw=1)
    ax.set_xlabel("per-user test LogLoss")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
