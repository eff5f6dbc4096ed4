"""Intervals that cover what varies: training seeds x test users, and paired method differences.

A benchmark number is a distribution, not a value: it moves with the training run (seed) and
with which users happen to be in the test set, and a user's rows move together (one taste, one
session). ``compare_methods`` takes, for several methods, per-seed predicted probabilities on
the *same* test rows, and reports for each method the mean AUC, GAUC and LogLoss over seeds
with 95% intervals, and the paired difference of every method against a reference.

Design (one resample ``b`` of ``n_boot``):

1. **Users, not rows.** Draw the test users with replacement (as many as there are); a user
   drawn k times contributes all of its rows k times. This is one ``np.bincount`` per resample:
   a multiplicity ``M[b, u]`` per user, used as row weights ``M[b, user(i)]``. Rows of one user
   are never split, so the within-user correlation is kept (a row bootstrap would treat a
   user's 40 correlated rows as 40 independent facts and give too narrow intervals).
2. **Seeds.** Each method's metric is computed at every seed under the same user weights,
   ``v[b, s]``. ``seed_mode="resample"`` (default) then draws S seeds with replacement and
   averages them: the interval is the one of the reported mean over S seeds, and covers the
   spread between training runs (scaled by 1/S, as the mean's is). ``seed_mode="one"`` takes
   one random seed per resample: the interval of a *single* run (wider; what a user who trains
   once should expect). With one seed the seed variance cannot be estimated and only the user
   part is covered: the result says ``seeds: 1``.
3. **Paired differences on the same resamples.** ``delta[b] = v_m[b] - v_ref[b]`` uses the
   same user multiplicities for both methods, so the variation that moves both (an easy or a
   hard set of users) cancels; the seed draws of the two methods are independent (different
   training runs), or the same indices with ``pair_seeds=True`` (when seed s of every method
   shares something, e.g. a data split). ``excludes_zero``: the interval lies entirely on one side.

The point estimates are the means over seeds on the full test set; the intervals are the
percentile intervals of the resampled values. AUC under weights is rank-based: rows are sorted
once per (method, seed) (the order does not change between resamples), and for all resamples
at once the weighted count of (positive, negative) pairs in order comes from cumulative sums of
the sorted weights (ties count one half). GAUC is ``eval.metrics.gauc``'s: the row-weighted mean
of per-user AUCs over users with both classes; a user's AUC does not change when the user is
drawn again, so a resample only re-weights the per-user terms. LogLoss is the weighted mean.

Cost: O(n_boot x rows) per (method, seed); ~1,000 resamples x 10 methods x 5 seeds on 5,000
rows run in about a second on one core (``test_intervals.py`` checks the budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from metactr.errors import DataError
from metactr.eval.metrics import EPS, gauc

SeedMode = Literal["resample", "one"]
ROW_BLOCK = 4_000_000  # elements of one [resamples, rows] block of the row form


@dataclass
class MethodScores:
    method: str
    seeds: int
    auc_mean: float
    auc_ci95: tuple[float, float]
    gauc_mean: float
    gauc_ci95: tuple[float, float]
    logloss_mean: float
    logloss_ci95: tuple[float, float]
    auc_per_seed: list[float] = field(default_factory=list)


@dataclass
class PairedDiff:
    method: str
    reference: str
    delta_auc: float
    ci95: tuple[float, float]
    excludes_zero: bool
    delta_gauc: float
    gauc_ci95: tuple[float, float]
    delta_logloss: float
    logloss_ci95: tuple[float, float]


@dataclass
class Comparison:
    methods: dict[str, MethodScores]
    pairs: list[PairedDiff]
    reference: str
    n_test: int
    n_users: int
    n_boot: int
    seed_mode: str
    level: float

    def rows(self) -> list[dict]:
        """Rows in the shape of ``metactr bench``'s results.json (issue 14), without the
        dataset/protocol/subset/stage keys the caller adds."""
        return [{"method": m.method, "auc_mean": m.auc_mean, "auc_ci95": list(m.auc_ci95),
                 "gauc_mean": m.gauc_mean, "gauc_ci95": list(m.gauc_ci95), "logloss_mean": m.logloss_mean,
                 "logloss_ci95": list(m.logloss_ci95), "n_test": self.n_test, "n_users": self.n_users,
                 "seeds": m.seeds} for m in self.methods.values()]

    def pair_rows(self) -> list[dict]:
        return [{"method": p.method, "reference": p.reference, "delta_auc": p.delta_auc, "ci95": list(p.ci95),
                 "excludes_zero": p.excludes_zero, "delta_gauc": p.delta_gauc, "gauc_ci95": list(p.gauc_ci95),
                 "delta_logloss": p.delta_logloss, "logloss_ci95": list(p.logloss_ci95)} for p in self.pairs]


# ------------------------------------------------------------------------------ input checks
def _check(y, users, preds: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    y = np.asarray(y).reshape(-1)
    users = np.asarray(users).reshape(-1)
    n = y.size
    if n == 0:
        raise DataError("no test rows", field="y")
    if users.size != n:
        raise DataError(f"{users.size} user ids for {n} labels", field="users")
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels must be 0 or 1", field="y")
    y = y.astype(np.float64)
    if y.min() == y.max():
        raise DataError(f"the test rows hold one class only (all {int(y[0])}): AUC is undefined", field="y")
    if not preds:
        raise DataError("no methods to compare", field="preds")
    out = {}
    for name, p in preds.items():
        a = np.asarray(p, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != n or a.shape[0] == 0:
            raise DataError(f"predictions of shape {np.shape(p)}; expected [seeds, {n}] or [{n}]",
                            field=f"preds.{name}")
        bad = ~np.isfinite(a) | (a < 0) | (a > 1)
        if bad.any():
            s, i = np.argwhere(bad)[0]
            raise DataError(f"probability {a[s, i]!r} at seed {s}, row {i} (must be finite, in [0, 1])",
                            field=f"preds.{name}")
        out[str(name)] = a
    return y, users, out


# ------------------------------------------------------------------------------ resampled metrics
def user_multiplicities(n_users: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_users] how often each user is drawn in each resample (each row sums to n_users)."""
    draws = rng.integers(0, n_users, size=(n_boot, n_users))
    draws += (np.arange(n_boot) * n_users)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n_users).reshape(n_boot, n_users).astype(np.float64)


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of scores ``p`` [n] for labels ``y`` [n] under each row of weights ``w`` [B, n] -> [B].

    Sort once; for every resample at once, count the weighted (positive, negative) pairs that are
    in order (ties one half) with cumulative sums of the sorted negative weights.
    """
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order].astype(bool)
    ws = w[:, order]
    wn = np.where(ys, 0.0, ws)
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    if len(starts) == len(ps):  # no ties: negatives strictly below each positive
        below = np.cumsum(wn, axis=1)
        num = (ws[:, ys] * below[:, ys]).sum(axis=1)
    else:  # per tie group: negatives below the group + half of those inside it
        gneg = np.add.reduceat(wn, starts, axis=1)
        gpos = np.add.reduceat(np.where(ys, ws, 0.0), starts, axis=1)
        below = np.cumsum(gneg, axis=1) - gneg
        num = (gpos * (below + 0.5 * gneg)).sum(axis=1)
    wpos = (ws * ys).sum(axis=1)
    den = wpos * (ws.sum(axis=1) - wpos)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_auc_users(y: np.ndarray, p: np.ndarray, u: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``weighted_auc`` with row weights ``M[:, u]``, as a quadratic form over users -> [B].

    The in-order pair count is ``sum_{u,v} M[b,u] K[u,v] M[b,v]`` with ``K[u,v]`` = pairs
    (positive of u, negative of v) in order (ties one half): one [U, U] matrix per (method,
    seed) from a cumulative count of negatives per user along the sorted scores, then one
    matrix product for all resamples. Cheaper than the row form when users are few (U^2 << n:
    the powered holdouts give tens of rows per user).
    """
    n_users = M.shape[1]
    order = np.argsort(p, kind="stable")
    ps, ys, us = p[order], y[order].astype(bool), u[order]
    n = len(ps)
    # cumulative negatives per user over the negative rows only (float32 counts are exact < 2^24)
    negs = np.flatnonzero(~ys)
    cneg = np.zeros((len(negs) + 1, n_users), dtype=np.float32)
    cneg[1 + np.arange(len(negs)), us[negs]] = 1.0
    np.cumsum(cneg, axis=0, out=cneg)  # cneg[k] = per user, the k lowest-scored negatives
    neg_upto = np.cumsum(~ys)  # negatives among sorted rows 0..i
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    glen = np.diff(np.r_[starts, n])
    ends = np.r_[starts[1:], n]
    lo = np.repeat(np.r_[0, neg_upto][starts], glen)  # negatives below the row's tie group
    hi = np.repeat(neg_upto[ends - 1], glen)  # ... and up to its end
    pos = np.flatnonzero(ys)
    by_user = pos[np.argsort(us[pos], kind="stable")]
    vals = cneg[lo[by_user]]
    vals += cneg[hi[by_user]]  # twice (negatives below + half of the tied ones)
    first = np.flatnonzero(np.r_[True, us[by_user][1:] != us[by_user][:-1]])
    K = np.zeros((n_users, n_users), dtype=np.float64)
    if len(by_user):
        K[us[by_user][first]] = 0.5 * np.add.reduceat(vals, first, axis=0, dtype=np.float64)
    num = np.einsum("bu,bu->b", M @ K, M)
    n_pos = np.bincount(us[ys], minlength=n_users).astype(np.float64)
    n_neg = np.bincount(us[~ys], minlength=n_users).astype(np.float64)
    den = (M @ n_pos) * (M @ n_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def resampled_auc(y: np.ndarray, p: np.ndarray, u: np.ndarray, M: np.ndarray, how: str = "auto") -> np.ndarray:
    """AUC under user multiplicities ``M`` [B, U] for rows of users ``u``: the row form
    (``weighted_auc``, O(B n)) or the user form (``weighted_auc_users``, O(B U^2) in BLAS),
    whichever is cheaper (``how``: auto, rows, users)."""
    B, U = M.shape
    n = len(y)
    if how == "auto":  # a BLAS multiply-add costs ~1/8 of a pass of NumPy over [B, n]
        cheaper = B * U * U / 8 + 4 * n * U < 6 * B * n
        how = "users" if cheaper and n * U <= 50_000_000 else "rows"  # (the [n, U] counts: <= 200 MB)
    if how == "users":
        return weighted_auc_users(y, p, u, M)
    step = max(1, ROW_BLOCK // max(n, 1))  # resamples per block: a few [block, n] arrays of ~32 MB
    return np.concatenate([weighted_auc(y, p, M[b:b + step, u]) for b in range(0, B, step)])


def _per_user_terms(y: np.ndarray, p: np.ndarray, u: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_u * AUC_u where the user has both classes else 0, n_u where it does else 0), per user code."""
    n_u = np.bincount(u, minlength=n_users).astype(np.float64)
    pos_u = np.bincount(u, weights=y, minlength=n_users)
    ok = (pos_u > 0) & (pos_u < n_u)
    # per-user AUC: the same rank pass as metrics.gauc, via its group formula on codes
    order = np.lexsort((p, u))
    us, ps, ys = u[order], p[order], y[order]
    key_change = np.r_[True, (us[1:] != us[:-1]) | (ps[1:] != ps[:-1]), True]
    tie_b = np.flatnonzero(key_change)
    tie_len = np.diff(tie_b)
    first = np.repeat(tie_b[:-1], tie_len)
    grp_start = np.concatenate([[0], np.cumsum(n_u)[:-1]])[us]
    rank = (first - grp_start) + (np.repeat(tie_len, tie_len) + 1) / 2.0
    rank_pos = np.bincount(us, weights=rank * ys, minlength=n_users)
    neg_u = n_u - pos_u
    with np.errstate(invalid="ignore", divide="ignore"):
        auc_u = np.where(ok, (rank_pos - pos_u * (pos_u + 1) / 2.0) / (pos_u * neg_u), 0.0)
    return auc_u * n_u * ok, n_u * ok


def _metric_draws(y, u, n_users, a: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per seed, full-data values and [B, S] resampled values of AUC, GAUC, LogLoss."""
    S = a.shape[0]
    n_u = np.bincount(u, minlength=n_users).astype(np.float64)
    full_w = np.ones((1, len(y)))
    vals = {k: np.empty((M.shape[0], S)) for k in ("auc", "gauc", "logloss")}
    full = {k: np.empty(S) for k in vals}
    for s in range(S):
        p = a[s]
        vals["auc"][:, s] = resampled_auc(y, p, u, M)
        full["auc"][s] = weighted_auc(y, p, full_w)[0]
        g_num, g_den = _per_user_terms(y, p, u, n_users)
        with np.errstate(invalid="ignore", divide="ignore"):
            vals["gauc"][:, s] = (M @ g_num) / (M @ g_den)
        full["gauc"][s] = gauc(y, p, u)
        pc = np.clip(p, EPS, 1 - EPS)
        ll_u = np.bincount(u, weights=-(y * np.log(pc) + (1 - y) * np.log1p(-pc)), minlength=n_users)
        vals["logloss"][:, s] = (M @ ll_u) / (M @ n_u)
        full["logloss"][s] = ll_u.sum() / len(y)
    return full, vals


def _combine(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[B, S] values, [B, k] seed indices -> [B] mean over the drawn seeds."""
    return np.take_along_axis(v, idx, axis=1).mean(axis=1)


def _interval(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(x, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------ the entry point
def compare_methods(y, users, preds: Mapping[str, object], *, reference: str | None = None,
                    baselines: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                    seed_mode: SeedMode = "resample", pair_seeds: bool = False,
                    level: float = 0.95) -> Comparison:
    """Scores with intervals for every method and paired differences against ``reference``.

    ``y`` [n] 0/1 labels and ``users`` [n] user ids of the test rows; ``preds`` maps a method to
    its probabilities [seeds, n] (or [n] for one seed) on those rows, in the same order.
    ``reference``: the method every other is compared with; default the strongest of
    ``baselines`` (all methods when None) by mean AUC. See the module docstring for the design.
    """
    if seed_mode not in ("resample", "one"):
        raise DataError(f"seed_mode must be 'resample' or 'one', got {seed_mode!r}", field="seed_mode")
    if not 0 < level < 1 or n_boot < 1:
        raise DataError("need 0 < level < 1 and n_boot >= 1", field="level")
    y, users, arrs = _check(y, users, preds)
    codes, u = np.unique(users, return_inverse=True)
    n_users = len(codes)
    rng = np.random.default_rng(seed)
    M = user_multiplicities(n_users, n_boot, rng)
    full, draws = {}, {}
    for name, a in arrs.items():
        full[name], draws[name] = _metric_draws(y, u, n_users, a, M)
    # seed draws: per method, or shared where pair_seeds and the seed counts agree
    max_s = max(a.shape[0] for a in arrs.values())
    k = lambda S: S if seed_mode == "resample" else 1  # noqa: E731
    shared = rng.integers(0, max_s, size=(n_boot, k(max_s)))
    idx = {}
    for name, a in arrs.items():
        S = a.shape[0]
        if pair_seeds and S == max_s:
            idx[name] = shared
        else:
            idx[name] = rng.integers(0, S, size=(n_boot, k(S)))
    comb = {name: {m: _combine(draws[name][m], idx[name]) for m in ("auc", "gauc", "logloss")} for name in arrs}
    methods = {}
    for name, a in arrs.items():
        f = full[name]
        methods[name] = MethodScores(
            method=name, seeds=int(a.shape[0]),
            auc_mean=float(np.mean(f["auc"])), auc_ci95=_interval(comb[name]["auc"], level),
            gauc_mean=float(np.nanmean(f["gauc"])) if np.isfinite(f["gauc"]).any() else float("nan"),
            gauc_ci95=_interval(comb[name]["gauc"], level),
            logloss_mean=float(np.mean(f["logloss"])), logloss_ci95=_interval(comb[name]["logloss"], level),
            auc_per_seed=[float(x) for x in f["auc"]])
    pool = list(baselines) if baselines is not None else list(arrs)
    unknown = [b for b in pool + ([reference] if reference else []) if b not in arrs]
    if unknown:
        raise DataError(f"unknown method(s) {unknown} (have: {', '.join(arrs)})", field="reference")
    if reference is None:
        if not pool:
            raise DataError("no baselines to choose a reference from", field="baselines")
        reference = max(pool, key=lambda m: methods[m].auc_mean)
    pairs = []
    for name in arrs:
        if name == reference:
            continue
        d = {m: comb[name][m] - comb[reference][m] for m in ("auc", "gauc", "logloss")}
        ci = _interval(d["auc"], level)
        pairs.append(PairedDiff(
            method=name, reference=reference,
            delta_auc=methods[name].auc_mean - methods[reference].auc_mean, ci95=ci,
            excludes_zero=bool(ci[0] > 0 or ci[1] < 0),
            delta_gauc=methods[name].gauc_mean - methods[reference].gauc_mean, gauc_ci95=_interval(d["gauc"], level),
            delta_logloss=methods[name].logloss_mean - methods[reference].logloss_mean,
            logloss_ci95=_interval(d["logloss"], level)))
    return Comparison(methods, pairs, reference, n_test=int(len(y)), n_users=int(n_users), n_boot=int(n_boot),
                      seed_mode=seed_mode, level=level)
