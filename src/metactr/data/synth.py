"""A seeded synthetic click log with drifting user interests (model in docs/synthetic.md).

Generative model (K = ``n_topics`` latent dimensions, E = ``n_epochs`` time periods):

* item i: topic z_i ~ Uniform{0..K-1}; vector v_i = e_{z_i} + sigma_item * N(0, I_K);
  popularity weight w_i = (rank_i)^(-item_zipf) (rank = random permutation of 1..n_items);
  click bias b_i ~ N(0, sigma_bias^2).
* user u: activity a_u ~ LogNormal(0, user_activity_sigma); interest at epoch 0
  x_u(0) ~ N(0, I_K); drift x_u(e) = rho x_u(e-1) + sqrt(1 - rho^2) N(0, I_K) (a stationary
  AR(1), so interests change over time but keep unit variance).
* row r (time-ordered): time t_r uniform over [start, start + days), rows sorted by time;
  epoch e = floor(E * (t_r - start) / span); user u ~ Categorical(a / sum a);
  shown topic k ~ Categorical(softmax(exposure_temp * x_u(e))); item i ~ Categorical(w_i within
  topic k); click probability p = sigmoid(beta0 + beta * <x_u(e), v_i> + b_i + c_u(q)); click ~ Bernoulli(p).
* optional click propensity (``propensity_sigma`` > 0, default 0 = absent): the span is cut into
  ``propensity_periods`` periods q; c_u(0) ~ N(0, propensity_sigma^2), c_u(q) = propensity_rho
  c_u(q-1) + sqrt(1 - propensity_rho^2) N(0, propensity_sigma^2). It moves all of a user's click
  probabilities together for a few days, so the labels of a user's recent rows (a session's
  history) tell something about the next one that neither the user's long-run rate nor the items
  do: the log on which session- or user-level adaptation has something to adapt to. Drawn from its
  own random stream, so a log without it is unchanged.

Output: one Parquet file (``user_id, item_id, timestamp, click, p_click``) written in chunks of
``chunk_rows`` rows (memory bounded for any n_rows), plus side tables ``<stem>.users.parquet``
(user_id, segment = argmax x_u(0), activity = activity decile) and ``<stem>.items.parquet``
(item_id, topic, popularity = popularity decile). ``p_click`` is the true click probability,
so the Bayes-optimal AUC of a split can be measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from metactr.errors import ConfigError
from metactr.utils import atomic_path

START = 1_600_000_000  # 2020-09-13, Unix seconds


def _deciles(x: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return (ranks * 10 // max(len(x), 1)).astype(np.int32)


def generate(out_path: str | Path, *, n_users: int, n_items: int, n_rows: int, seed: int, n_topics: int = 8,
             n_epochs: int = 6, rho: float = 0.7, item_zipf: float = 0.7, user_activity_sigma: float = 1.0,
             exposure_temp: float = 1.0, beta0: float = 0.0, beta: float = 1.5, sigma_item: float = 0.5,
             sigma_bias: float = 0.5, days: int = 180, chunk_rows: int = 1_000_000, propensity_sigma: float = 0.0,
             propensity_rho: float = 0.9, propensity_periods: int = 60) -> Path:
    """Write the log to ``out_path`` (and the two side tables beside it); returns ``out_path``."""
    for name, v, lo in (("n_users", n_users, 1), ("n_items", n_items, n_topics), ("n_rows", n_rows, 1),
                        ("n_topics", n_topics, 1), ("n_epochs", n_epochs, 1), ("days", days, 1),
                        ("chunk_rows", chunk_rows, 1)):
        if v < lo:
            raise ConfigError(f"must be >= {lo}, got {v}", field=name)
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {rho}", field="rho")
    if not 0.0 <= propensity_rho <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {propensity_rho}", field="propensity_rho")
    if propensity_sigma < 0 or propensity_periods < 1:
        raise ConfigError("propensity_sigma must be >= 0 and propensity_periods >= 1",
                          field="propensity_sigma" if propensity_sigma < 0 else "propensity_periods")
    out_path = Path(out_path)
    rng = np.random.default_rng(seed)
    K = n_topics
    # ---- items
    topic = rng.integers(0, K, size=n_items)
    v = np.eye(K, dtype=np.float32)[topic] + sigma_item * rng.standard_normal((n_items, K), dtype=np.float32)
    pop = (rng.permutation(n_items) + 1.0) ** (-item_zipf)
    bias = (sigma_bias * rng.standard_normal(n_items)).astype(np.float32)
    order = np.argsort(topic, kind="stable")  # items grouped by topic
    cum = np.cumsum(pop[order])
    topic_start = np.searchsorted(topic[order], np.arange(K))
    topic_end = np.searchsorted(topic[order], np.arange(K), side="right")
    lo_mass = np.where(topic_start > 0, cum[np.maximum(topic_start - 1, 0)], 0.0)
    mass = np.where(topic_end > topic_start, cum[np.maximum(topic_end - 1, 0)] - lo_mass, 0.0)
    # ---- users
    activity = rng.lognormal(0.0, user_activity_sigma, size=n_users)
    user_cdf = np.cumsum(activity) / activity.sum()
    x = np.empty((n_epochs, n_users, K), dtype=np.float32)
    x[0] = rng.standard_normal((n_users, K), dtype=np.float32)
    for e in range(1, n_epochs):
        x[e] = rho * x[e - 1] + np.sqrt(1 - rho**2) * rng.standard_normal((n_users, K), dtype=np.float32)
    span = days * 86_400
    prop = None
    if propensity_sigma > 0:  # its own stream: the draws above (and a log without it) are unchanged
        pr = np.random.default_rng([seed, 2])
        prop = np.empty((propensity_periods, n_users), dtype=np.float32)
        prop[0] = propensity_sigma * pr.standard_normal(n_users, dtype=np.float32)
        for q in range(1, propensity_periods):
            prop[q] = propensity_rho * prop[q - 1] + np.sqrt(1 - propensity_rho**2) * propensity_sigma * \
                pr.standard_normal(n_users, dtype=np.float32)
    # time grid: chunk c covers [c, c+1) / n_chunks of the span, so the file is in time order
    n_chunks = -(-n_rows // chunk_rows)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("click", pa.int8()), ("p_click", pa.float32())])
    users_path = out_path.with_name(out_path.stem + ".users.parquet")
    items_path = out_path.with_name(out_path.stem + ".items.parquet")
    with atomic_path(out_path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for c in range(n_chunks):
                n = min(chunk_rows, n_rows - c * chunk_rows)
                r = np.random.default_rng([seed, 1, c])
                t = np.sort(START + ((c + r.random(n)) * span / n_chunks).astype(np.int64))
                epoch = np.minimum(((t - START) * n_epochs) // span, n_epochs - 1)
                u = np.minimum(np.searchsorted(user_cdf, r.random(n)), n_users - 1)
                xu = x[epoch, u]  # [n, K]
                logits = exposure_temp * xu + np.log(np.maximum(mass, 1e-300))[None, :]
                k = np.argmax(logits + r.gumbel(size=(n, K)).astype(np.float32), axis=1)
                pos = lo_mass[k] + r.random(n) * mass[k]
                item = order[np.minimum(np.searchsorted(cum, pos, side="right"), n_items - 1)]
                score = beta0 + beta * np.einsum("nk,nk->n", xu, v[item]) + bias[item]
                if prop is not None:
                    period = np.minimum(((t - START) * propensity_periods) // span, propensity_periods - 1)
                    score = score + prop[period, u]
                p = (1.0 / (1.0 + np.exp(-score))).astype(np.float32)
                click = (r.random(n) < p).astype(np.int8)
                arrays = [u.astype(np.int64), item.astype(np.int64), t, click, p]
                w.write_table(pa.Table.from_arrays([pa.array(a) for a in arrays], schema=schema))
        users = pl.DataFrame({"user_id": np.arange(n_users, dtype=np.int64), "segment": np.argmax(x[0], axis=1),
                              "activity": _deciles(activity)})
        items = pl.DataFrame({"item_id": np.arange(n_items, dtype=np.int64), "topic": topic.astype(np.int32),
                              "popularity": _deciles(pop)})
        with atomic_path(users_path) as tu:
            users.write_parquet(tu)
        with atomic_path(items_path) as ti:
            items.write_parquet(ti)
    return out_path
