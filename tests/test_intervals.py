"""Intervals over seeds x test users (eval.intervals): exact weighted AUC, coverage, pairing, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from metactr.errors import DataError
from metactr.eval.intervals import (compare_methods, resampled_auc, user_multiplicities, weighted_auc,
                                    weighted_auc_users)
from metactr.eval.metrics import auc, gauc, logloss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _clustered(rng, n_users=100, rows=10, user_sd=1.0, shared=0.0):
    """Rows of users whose labels share a user effect; ``shared`` of it is visible to the scores."""
    u = np.repeat(np.arange(n_users), rows)
    a = rng.normal(size=n_users) * user_sd
    x = rng.normal(size=u.size)
    y = (rng.random(u.size) < _sigmoid(a[u] + x)).astype(int)
    return u, x + shared * a[u], y


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_equals_sklearn_on_the_repeated_rows(ties):
    rng = np.random.default_rng(0)
    u, score, y = _clustered(rng, n_users=30, rows=7)
    p = _sigmoid(score)
    if ties:
        p = np.round(p, 1)
    M = user_multiplicities(30, 6, rng)
    got_rows = weighted_auc(y, p, M[:, u])
    got_users = weighted_auc_users(y, p, u, M)
    for b in range(6):
        rep = np.repeat(np.arange(u.size), M[b, u].astype(int))
        want = roc_auc_score(y[rep], p[rep])
        assert got_rows[b] == pytest.approx(want, abs=1e-12)
        assert got_users[b] == pytest.approx(want, abs=1e-12)
    assert np.allclose(resampled_auc(y, p, u, M, how="rows"), resampled_auc(y, p, u, M, how="users"))


def test_row_form_in_blocks_equals_one_block(monkeypatch):
    import metactr.eval.intervals as iv

    rng = np.random.default_rng(7)
    u, score, y = _clustered(rng, n_users=20, rows=5)
    M = user_multiplicities(20, 9, rng)
    whole = resampled_auc(y, score, u, M, how="rows")
    monkeypatch.setattr(iv, "ROW_BLOCK", 2 * y.size)  # blocks of 2 resamples
    assert np.array_equal(resampled_auc(y, score, u, M, how="rows"), whole)


def test_point_estimates_are_the_metrics_of_eval_metrics():
    rng = np.random.default_rng(1)
    u, score, y = _clustered(rng)
    p = np.stack([_sigmoid(score + rng.normal(size=score.size) * 0.5) for _ in range(3)])
    c = compare_methods(y, u * 7 + 3, {"a": p, "b": p[0]}, n_boot=50)  # any user ids
    m = c.methods["a"]
    assert m.seeds == 3 and c.methods["b"].seeds == 1
    assert m.auc_mean == pytest.approx(np.mean([auc(y, q) for q in p]), abs=1e-12)
    assert m.gauc_mean == pytest.approx(np.mean([gauc(y, q, u) for q in p]), abs=1e-12)
    assert m.logloss_mean == pytest.approx(np.mean([logloss(y, q) for q in p]), abs=1e-9)
    assert c.n_test == y.size and c.n_users == 100
    row = c.rows()[0]
    assert set(row) >= {"method", "auc_mean", "auc_ci95", "gauc_mean", "logloss_mean", "n_test", "n_users", "seeds"}
    assert row["auc_ci95"][0] < row["auc_mean"] < row["auc_ci95"][1]


def test_identical_method_has_zero_delta_and_a_better_one_excludes_zero():
    rng = np.random.default_rng(2)
    u, score, y = _clustered(rng, n_users=200, rows=15)
    base = np.stack([_sigmoid(0.5 * score + rng.normal(size=score.size)) for _ in range(5)])
    better = np.stack([_sigmoid(score + 0.3 * rng.normal(size=score.size)) for _ in range(5)])
    worse = np.stack([_sigmoid(0.2 * score + rng.normal(size=score.size)) for _ in range(5)])
    c = compare_methods(y, u, {"base": base, "copy": base.copy(), "better": better, "worse": worse},
                        baselines=["base", "worse"], n_boot=400)
    assert c.reference == "base"  # the strongest baseline by mean AUC
    pairs = {p.method: p for p in c.pairs}
    assert set(pairs) == {"copy", "better", "worse"}
    assert pairs["copy"].delta_auc == 0.0 and not pairs["copy"].excludes_zero
    assert pairs["copy"].ci95[0] <= 0 <= pairs["copy"].ci95[1]
    assert pairs["better"].delta_auc > 0.05 and pairs["better"].excludes_zero and pairs["better"].ci95[0] > 0
    assert pairs["worse"].excludes_zero and pairs["worse"].ci95[1] < 0
    # the same resamples for both: the paired interval is far narrower than either method's own
    own = c.methods["better"].auc_ci95[1] - c.methods["better"].auc_ci95[0]
    assert pairs["better"].ci95[1] - pairs["better"].ci95[0] < own
    assert compare_methods(y, u, {"base": base, "better": better}, reference="better", n_boot=20).reference == "better"


def test_interval_covers_the_truth_at_about_the_nominal_rate():
    """Users drawn afresh each replicate, five seeds whose models differ systematically (weight c
    of a useless feature): the truth is the population AUC averaged over the seed distribution."""
    rng = np.random.default_rng(3)
    big_u, big_x, big_y = _clustered(rng, n_users=12000, rows=10)
    big_z = rng.normal(size=big_x.size)
    qs = (np.arange(8) + 0.5) / 8
    from scipy.stats import norm

    cs = norm.ppf(qs) * 0.4
    truth = np.mean([roc_auc_score(big_y, big_x + c * big_z) for c in cs])
    hits, reps = 0, 150
    for _ in range(reps):
        u, x, y = _clustered(rng, n_users=60, rows=10)
        z = rng.normal(size=x.size)
        p = np.stack([_sigmoid(x + c * z) for c in rng.normal(size=5) * 0.4])
        lo, hi = compare_methods(y, u, {"m": p}, n_boot=200, seed=int(rng.integers(1 << 30))).methods["m"].auc_ci95
        hits += lo <= truth <= hi
    assert 0.88 <= hits / reps <= 0.995  # 0.94 over 400 replicates with a finer truth


def test_users_not_rows_widen_the_interval_when_rows_are_correlated():
    rng = np.random.default_rng(4)
    u, score, y = _clustered(rng, n_users=60, rows=40, user_sd=2.0, shared=1.0)
    p = _sigmoid(score)
    by_user = compare_methods(y, u, {"m": p}, n_boot=500).methods["m"].auc_ci95
    by_row = compare_methods(y, np.arange(y.size), {"m": p}, n_boot=500).methods["m"].auc_ci95
    assert (by_user[1] - by_user[0]) > 1.5 * (by_row[1] - by_row[0])


def test_seed_spread_is_covered():
    """Seeds that differ a lot on a large test set: the interval of one run spans them."""
    rng = np.random.default_rng(5)
    u, score, y = _clustered(rng, n_users=400, rows=20)
    p = np.stack([_sigmoid(score + rng.normal(size=score.size) * s) for s in (0.2, 0.6, 1.0, 1.5, 2.5)])
    c_one = compare_methods(y, u, {"m": p}, n_boot=400, seed_mode="one").methods["m"]
    c_mean = compare_methods(y, u, {"m": p}, n_boot=400).methods["m"]
    seeds = c_one.auc_per_seed
    assert c_one.auc_ci95[0] <= min(seeds) + 0.01 and c_one.auc_ci95[1] >= max(seeds) - 0.01
    assert (c_mean.auc_ci95[1] - c_mean.auc_ci95[0]) < (c_one.auc_ci95[1] - c_one.auc_ci95[0])
    one_seed = compare_methods(y, u, {"m": p[2]}, n_boot=400).methods["m"]
    assert (one_seed.auc_ci95[1] - one_seed.auc_ci95[0]) < (c_mean.auc_ci95[1] - c_mean.auc_ci95[0])


def test_fast_enough():
    rng = np.random.default_rng(6)
    n, U = 5000, 300
    u = rng.integers(0, U, n)
    x = rng.normal(size=n)
    y = (rng.random(n) < _sigmoid(x)).astype(int)
    preds = {f"m{k}": _sigmoid(x[None] * (0.5 + 0.05 * k) + rng.normal(size=(5, n))) for k in range(10)}
    t = time.perf_counter()
    c = compare_methods(y, u, preds, n_boot=1000)
    took = time.perf_counter() - t
    assert len(c.pairs) == 9
    assert took < 12, took  # ~1-4 s on 2 shared cores; a per-resample Python loop would take minutes


@pytest.mark.parametrize("kwargs,field,needle", [
    ({"users": np.arange(5)}, "users", "5 user ids"),
    ({"preds": {"m": np.full(10, 0.5)}}, "preds.m", "shape"),
    ({"preds": {"m": np.r_[np.full(19, 0.5), np.nan]}}, "preds.m", "nan"),
    ({"preds": {"m": np.r_[np.full(19, 0.5), 1.5]}}, "preds.m", "1.5"),
    ({"y": np.ones(20)}, "y", "one class"),
    ({"y": np.r_[np.ones(19), 2]}, "y", "0 or 1"),
    ({"preds": {}}, "preds", "no methods"),
    ({"reference": "nope"}, "reference", "nope"),
])
def test_bad_input_is_a_clear_error(kwargs, field, needle):
    args = {"y": np.r_[np.zeros(10), np.ones(10)], "users": np.arange(20) % 4,
            "preds": {"m": np.linspace(0.1, 0.9, 20)}}
    extra = {k: kwargs.pop(k) for k in ("reference",) if k in kwargs}
    args.update(kwargs)
    with pytest.raises(DataError) as e:
        compare_methods(args["y"], args["users"], args["preds"], n_boot=10, **extra)
    assert e.value.field == field and needle in str(e.value)
