import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from metactr.eval.metrics import auc, gauc, logloss, mean_ci95, rel_impr


def test_gauc_matches_per_user_loop():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 20, 500)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500), 2)  # ties on purpose
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if len(np.unique(y[m])) == 2:
            num += m.sum() * roc_auc_score(y[m], p[m])
            den += m.sum()
    assert gauc(y, p, g) == pytest.approx(num / den, abs=1e-12)


def test_degenerate_inputs_give_nan_not_errors():
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
    assert np.isnan(gauc([1, 1], [0.2, 0.3], [0, 0]))
    assert logloss([1, 0], [1.0, 0.0]) < 1e-5  # clipped, finite


def test_ci_and_relimpr():
    m, h = mean_ci95([0.8, 0.82, 0.81, 0.79, 0.8])
    assert m == pytest.approx(0.804) and 0 < h < 0.02
    assert rel_impr(0.8047, 0.7957) == pytest.approx(0.0304, abs=2e-4)  # paper's +3.04%
