"""Figures of the MetaSelector reproduction (matplotlib, Agg backend: no display needed).

``plot_user_loss_kde``: kernel density of the per-user test logloss of several methods
(the paper's Figure 3b draws MetaSelector against DeepFM), Gaussian KDE from scipy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from metactr.utils import atomic_path


def plot_user_loss_kde(losses: Mapping[str, np.ndarray], path: str | Path, *,
                       title: str = "Kernel density of per-user test LogLoss") -> Path:
    """Write a PNG with one KDE curve per method (mean marked by a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in losses.items()}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items()}
    allv = np.concatenate([v for v in arrays.values() if v.size] or [np.zeros(1)])
    lo, hi = (float(np.quantile(allv, 0.002)), float(np.quantile(allv, 0.998))) if allv.size else (0.0, 1.0)
    pad = 0.15 * max(hi - lo, 1e-3)
    xs = np.linspace(max(0.0, lo - pad), hi + pad, 400)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    for (name, v), c in zip(arrays.items(), colors * 4, strict=False):
        if v.size >= 2 and np.ptp(v) > 0:
            ax.plot(xs, gaussian_kde(v)(xs), color=c, lw=2,
                    label=f"{name} (mean {v.mean():.4f}, sd {v.std():.4f}, {v.size} users)")
        if v.size:
            ax.axvline(v.mean(), color=c, ls="--", lw=1)
    ax.set_xlabel("per-user test LogLoss")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
