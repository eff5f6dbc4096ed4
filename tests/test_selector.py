"""MetaSelector (WWW'20): the mixture model, its meta-training and the baselines/oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.errors import ConfigError, DataError
from metactr.eval.metrics import logloss
from metactr.papers.metaselector import baselines as sb
from metactr.engine.functional import MetaSGDRates, live_params
from metactr.models.metaselector import MetaSelector
from metactr.papers.metaselector.train import (
    BaseModelConfig,
    MetaTrainConfig,
    SelectorData,
    SelectorExperiment,
    UserIndex,
    adapt,
    fine_tune_rates,
    meta_loss,
    meta_test,
    meta_train,
)
from metactr.data.toy import write_toy_selector_dataset as write_toy_dataset
from metactr.models.base import build_model, objective

SPEC = FeatureSpec(user=(Field("user_id", 6), Field("age", 4)), item=(Field("item_id", 9), Field("genre", 5, 2)),
                   context=(Field("weekday", 8),), max_hist_len=3)


def toy_batch(n: int = 7, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, 5, (n, 3, 3), generator=g)
    mask = torch.rand(n, 3, generator=g) > 0.3
    return Batch(user=torch.randint(1, 4, (n, 2), generator=g), item=torch.randint(1, 5, (n, 3), generator=g),
                 context=torch.randint(1, 8, (n, 1), generator=g), hist=hist * mask[..., None], hist_mask=mask,
                 hist_label=torch.zeros(n, 3), label=(torch.rand(n, generator=g) > 0.5).float(),
                 user_id=torch.randint(1, 4, (n,), generator=g))


def tiny_selector(k: int = 2, spec: FeatureSpec = SPEC, seed: int = 0) -> MetaSelector:
    torch.manual_seed(seed)
    bases = [build_model("basic", spec, embed_dim=3, hidden=(4,), emb_init_std=0.3) for _ in range(k)]
    return MetaSelector(spec, bases, embed_dim=3, hidden=(5,))


# --------------------------------------------------------------------------- the model
def test_mixture_weights_sum_to_one_and_mix_is_convex():
    model = tiny_selector(3).eval()
    b = toy_batch()
    lam = model.weights(b)
    assert lam.shape == (7, 3)
    assert torch.all(lam >= 0)
    torch.testing.assert_close(lam.sum(-1), torch.ones(7))
    p_k = torch.sigmoid(model.base_logits(b))
    p = torch.sigmoid(model(b).logit)
    torch.testing.assert_close(p, (lam * p_k).sum(-1), atol=1e-6, rtol=1e-5)
    assert torch.all(p >= p_k.min(-1).values - 1e-6) and torch.all(p <= p_k.max(-1).values + 1e-6)


def test_one_base_model_reduces_to_it():
    torch.manual_seed(1)
    base = build_model("basic", SPEC, embed_dim=3, hidden=(4,), emb_init_std=0.5)
    model = MetaSelector(SPEC, [base], hidden=(5,)).eval()
    b = toy_batch()
    torch.testing.assert_close(model(b).logit, base(b).logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(objective(model, None, b)[0], objective(base, None, b)[0], atol=1e-6, rtol=1e-6)


def test_mixture_logloss_is_the_bce_of_the_mix_and_stays_finite_at_extremes():
    model = tiny_selector(2).eval()
    b = toy_batch()
    lam = model.weights(b)
    p = (lam * torch.sigmoid(model.base_logits(b))).sum(-1)
    loss, _ = objective(model, None, b)
    assert float(loss.detach()) == pytest.approx(logloss(b.label, p.detach()), abs=1e-5)
    with torch.no_grad():  # saturated base models: the log-space mix never gives inf/NaN
        for m in model.base:
            m.mlp.net[-1].bias.fill_(80.0)
    assert torch.isfinite(objective(model, None, b)[0])


def test_parameter_groups_split_base_and_selector():
    model = tiny_selector(2)
    groups = model.param_groups()
    assert set(groups) == {"base", "selector"}
    assert all(n.startswith("base.") for n in groups["base"]) and groups["base"]
    assert all(n.startswith("selector.") for n in groups["selector"]) and groups["selector"]
    with pytest.raises(ConfigError):
        MetaSelector(SPEC, [])


# --------------------------------------------------------------------------- inner step / meta-gradient
@pytest.mark.parametrize("groups, moved", [(("base", "selector"), {"base", "selector"}), (("selector",), {"selector"})])
def test_inner_step_moves_exactly_the_adapted_groups(groups, moved):
    model = tiny_selector(2)
    params = live_params(model)
    names = model.params_in(*groups)
    rates = MetaSGDRates(params, names, init=0.5).as_dict()
    new = adapt(model, params, rates, toy_batch(), torch.ones(7), steps=1)
    changed = {g for g, ns in model.param_groups().items()
               for n in ns if not torch.equal(new[n].detach(), params[n].detach())}
    assert changed == moved
    for g in {"base", "selector"} - moved:  # untouched parameters are the very same tensors
        assert all(new[n] is params[n] for n in model.params_in(g))


def test_meta_gradient_matches_finite_differences_float64():
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_selector(2, seed=3)
        params = live_params(model)
        names = model.params_in("base", "selector")
        rates = MetaSGDRates(params, names, init=0.3)
        T = 2
        sup = Batch(*(torch.stack([t, t2]) for t, t2 in zip(toy_batch(5, 1), toy_batch(5, 2), strict=True)))
        qry = Batch(*(torch.stack([t, t2]) for t, t2 in zip(toy_batch(4, 3), toy_batch(4, 4), strict=True)))
        sw, qw = torch.ones(T, 5), torch.ones(T, 4)
        sw[1, 4] = 0.0

        def f() -> torch.Tensor:  # the inner step needs autograd even inside the no_grad FD probes
            with torch.enable_grad():
                return meta_loss(model, params, rates.as_dict(), sup, qry, sw, qw, steps=1, first_order=False,
                                 vectorize=True)

        loss = f()
        targets = [params["selector.mlp.net.0.weight"], params["base.0.mlp.net.0.weight"], rates.rates[0]]
        grads = torch.autograd.grad(loss, targets)
        eps = 1e-6
        for t, g in zip(targets, grads, strict=True):
            for idx in [(0, 0), (1, 2)] if t.dim() == 2 else [(0, 0)]:
                idx = idx if t.dim() == 2 else (idx[0],)
                with torch.no_grad():
                    t[idx] += eps
                    up = f().item()
                    t[idx] -= 2 * eps
                    down = f().item()
                    t[idx] += eps
                assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)
        # the per-task loop and the vmap engine give the same loss
        loop = meta_loss(model, params, rates.as_dict(), sup, qry, sw, qw, steps=1, first_order=False,
                         vectorize=False)
        assert float(loop.detach()) == pytest.approx(float(f().detach()), rel=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------- data helpers
@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ms_toy")
    write_toy_dataset(d, n_users=24, n_items=30, seed=1, newusers=5)
    return d


def test_user_index_samples_rows_of_the_right_user(toy_dir):
    data = SelectorData.load(toy_dir, disjoint=False)
    idx = UserIndex.build(data.train)
    pos = torch.arange(len(idx.users))
    rows, w = idx.sample(pos, 6, torch.Generator().manual_seed(0))
    assert rows.shape == w.shape and rows.shape[1] <= 6
    uid = data.train.user_id[rows]
    assert torch.all(uid == idx.users[pos][:, None])
    for r, ww in zip(rows, w, strict=True):  # real rows are distinct
        real = r[ww > 0]
        assert len(real.unique()) == len(real) == int(ww.sum())
    latest, lw = idx.sample(pos, 3, None, latest=True)
    last = idx.rows[idx.starts + idx.counts - 1]
    assert torch.all(latest[:, -1] == last)
    assert torch.equal(idx.lookup(torch.tensor([10**6])), torch.tensor([-1]))


def test_selector_data_bad_input(tmp_path, toy_dir):
    with pytest.raises(DataError):
        SelectorData.load(tmp_path / "absent")
    (tmp_path / "x").mkdir()
    import shutil
    for f in ("users.parquet", "items.parquet", "meta.json", "ms_support.parquet"):
        shutil.copy(toy_dir / f, tmp_path / "x" / f)
    with pytest.raises(DataError, match="ms_query"):
        SelectorData.load(tmp_path / "x")
    with pytest.raises(DataError, match="disjoint"):
        shutil.copy(toy_dir / "ms_query.parquet", tmp_path / "x")
        shutil.copy(toy_dir / "ms_test.parquet", tmp_path / "x")
        SelectorData.load(tmp_path / "x", disjoint=True)
    data = SelectorData.load(toy_dir)  # the disjoint new-user splits are used when present
    assert data.disjoint_test_users
    assert not set(data.test.user_id.tolist()) & set(data.train.user_id.tolist())
    small = SelectorData.load(toy_dir, disjoint=False, max_users=5)
    assert len(small.train.user_id.unique()) == 5 and set(small.test.user_id.tolist()) <= set(small.train.user_id.tolist())


def test_config_rejects_unknown_keys_and_bad_values():
    from metactr.config import validate

    with pytest.raises(ConfigError, match="unknown key"):
        validate(SelectorExperiment, {"meta": {"episodez": 3}})
    with pytest.raises(ConfigError, match="inner_lr"):
        validate(SelectorExperiment, {"meta": {"inner_lr": -1}})
    cfg = SelectorExperiment()
    assert [b.name for b in cfg.base_models] == ["lr", "fm", "ffm", "deepfm"]
    assert cfg.selector.hidden == [200, 200, 200] and cfg.meta.users_per_episode == 10


# --------------------------------------------------------------------------- meta-training / meta-test
def _toy_cfg(episodes: int = 4) -> MetaTrainConfig:
    return MetaTrainConfig(episodes=episodes, inner_lr=0.05, outer_lr=0.01, max_support=8, max_query=4, test_chunk=7)


@pytest.mark.parametrize("groups", [("base", "selector"), ("selector",)])
def test_meta_train_updates_outer_groups_and_rates(toy_dir, groups):
    data = SelectorData.load(toy_dir, disjoint=False)
    torch.manual_seed(0)
    bases = [build_model("basic", data.ds.spec, embed_dim=3, hidden=(4,)) for _ in range(2)]
    model = MetaSelector(data.ds.spec, bases, embed_dim=3, hidden=(6,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = meta_train(model, data, _toy_cfg(), adapt_groups=groups, outer_groups=groups,
                     generator=torch.Generator().manual_seed(0))
    assert len(res.losses) == 4 and all(np.isfinite(res.losses))
    for g, names in model.param_groups().items():
        moved = any(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in names)
        assert moved == (g in groups)
    assert any(not torch.all(r == 0.05) for r in res.rates.rates)  # Meta-SGD rates learn
    assert all(torch.all(r >= 0) for r in res.rates.rates)
    # meta-test: vmapped and looped adaptation agree; no adaptation = the plain model
    cfg = _toy_cfg()
    a = meta_test(model, res.rates.as_dict(), data, cfg)
    b = meta_test(model, res.rates.as_dict(), data, cfg.model_copy(update={"vectorize": False}))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plain = meta_test(model, None, data, cfg)
    with torch.no_grad():
        direct = model(data.ds.batch(data.test)).logit
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, plain)


def test_fine_tune_rates_put_meta_test_lr_in_place_by_owner(toy_dir):
    data = SelectorData.load(toy_dir, disjoint=False)
    torch.manual_seed(0)
    bases = [build_model("basic", data.ds.spec, embed_dim=3, hidden=(4,)) for _ in range(2)]
    model = MetaSelector(data.ds.spec, bases, base_names=["a", "b"], embed_dim=3, hidden=(6,))
    learned = MetaSGDRates(live_params(model), [n for n, _ in model.named_parameters()], init=1e-3).as_dict()
    assert fine_tune_rates(learned, None, ["a", "b"]) == learned
    per = fine_tune_rates(learned, {"b": 0.3, "selector": 0.05}, ["a", "b"])
    for n, r in per.items():
        want = 1e-3 if n.startswith("base.0.") else 0.3 if n.startswith("base.1.") else 0.05
        assert r.shape == learned[n].shape and torch.allclose(r, torch.full_like(r, want))
    assert all(torch.all(r == 0.2) for r in fine_tune_rates(learned, 0.2, ["a", "b"]).values())
    with pytest.raises(ConfigError, match="unknown name.*'c'"):
        fine_tune_rates(learned, {"c": 0.1}, ["a", "b"])
    # larger fixed rates move the meta-test predictions further than the learned ones
    cfg = _toy_cfg().model_copy(update={"test_steps": 3})
    plain = meta_test(model, None, data, cfg)
    small = meta_test(model, learned, data, cfg)
    big = meta_test(model, fine_tune_rates(learned, 0.3, ["a", "b"]), data, cfg)
    assert (big - plain).abs().mean() > 10 * (small - plain).abs().mean() > 0


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), {"ffm": -1.0}, "fast"])
def test_config_rejects_bad_meta_test_lr(bad):
    from metactr.config import validate

    with pytest.raises(ConfigError, match="test_lr"):
        validate(SelectorExperiment, {"meta": {"test_lr": bad}})
    assert validate(SelectorExperiment, {"meta": {"test_lr": {"ffm": 0.3}}}).meta.test_lr == {"ffm": 0.3}
    with pytest.raises(ConfigError, match="inner_lr_by_model"):
        validate(SelectorExperiment, {"meta": {"inner_lr_by_model": bad}})


def test_config_rejects_a_bad_device_and_cuda_where_there_is_none(toy_dir):
    from metactr.config import validate
    from metactr.papers.metaselector.train import run_seed

    with pytest.raises(ConfigError, match="device"):
        validate(SelectorExperiment, {"device": "gpu"})
    if not torch.cuda.is_available():
        cfg = validate(SelectorExperiment, {"device": "cuda"})
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run_seed(cfg, SelectorData.load(toy_dir, disjoint=False), 0)


def test_inner_lr_by_model_sets_the_starting_meta_sgd_rates_per_owner(toy_dir):
    data = SelectorData.load(toy_dir, disjoint=False)
    torch.manual_seed(0)
    bases = [build_model("basic", data.ds.spec, embed_dim=3, hidden=(4,)) for _ in range(2)]
    model = MetaSelector(data.ds.spec, bases, base_names=["a", "b"], embed_dim=3, hidden=(6,))
    cfg = _toy_cfg().model_copy(update={"episodes": 0, "inner_lr_by_model": {"b": 0.3}})
    res = meta_train(model, data, cfg, adapt_groups=("base", "selector"), outer_groups=("base", "selector"),
                     generator=torch.Generator().manual_seed(0))
    for n, r in res.rates.as_dict().items():
        assert torch.all(r == (0.3 if n.startswith("base.1.") else cfg.inner_lr)), n
    with pytest.raises(ConfigError, match="inner_lr_by_model"):
        meta_train(model, data, cfg.model_copy(update={"inner_lr_by_model": {"c": 0.1}}),
                   adapt_groups=("selector",), outer_groups=("selector",), generator=torch.Generator())


# --------------------------------------------------------------------------- baselines and oracles
def _fake_preds(n: int = 400, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(float)
    P = np.clip(rng.beta(2, 2, (n, k)) * 0.6 + 0.4 * y[:, None] * rng.random((n, k)), 0.01, 0.99)
    users = rng.integers(0, 25, n)
    return P, y, users


def test_oracles_bound_every_selector_on_the_same_predictions():
    P, y, users = _fake_preds()
    rng = np.random.default_rng(1)
    ps, pu = sb.perfect_sample_selector(P, y), sb.perfect_user_selector(P, y, users)
    ll_s, ll_u = logloss(y, ps), logloss(y, pu)
    for k in range(P.shape[1]):  # every single model
        assert ll_u <= logloss(y, P[:, k]) + 1e-12
    for _ in range(20):  # every per-sample convex mix (any sample- or user-level soft selector)
        w = rng.dirichlet(np.ones(P.shape[1]), size=P.shape[0])
        assert ll_s <= logloss(y, sb.mix(P, w)) + 1e-12
    for _ in range(20):  # every hard per-user choice
        choice = rng.integers(0, P.shape[1], users.max() + 1)[users]
        assert ll_u <= logloss(y, P[np.arange(len(y)), choice]) + 1e-12
    share = sb.best_model_share(P, y, users, ["a", "b", "c", "d"])
    assert sum(share.values()) == pytest.approx(1.0)
    losses = sb.per_user_logloss(P[:, 0], y, users)
    assert losses.shape == (np.unique(users).size,)
    assert np.average(losses, weights=np.bincount(users)[np.unique(users)]) == pytest.approx(logloss(y, P[:, 0]))


def test_sample_level_selector_learns_labels_and_mixes(toy_dir):
    data = SelectorData.load(toy_dir, disjoint=False)
    rng = np.random.default_rng(0)
    y = data.query.label.numpy()
    # model 0 is right on the query rows, model 1 is wrong: the classifier must learn to prefer 0
    Pq = np.stack([np.where(y > 0, 0.9, 0.1), np.where(y > 0, 0.2, 0.8)], 1) + rng.normal(0, 0.01, (len(y), 2))
    sel = sb.SampleLevelSelector(data.ds, 2, hidden=(16,), embed_dim=3)
    hist = sel.fit(data.query, Pq, epochs=30, batch_size=64, lr=0.01, generator=torch.Generator().manual_seed(0))
    assert hist[-1] < hist[0]
    w = sel.weights(data.query, Pq)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert w[:, 0].mean() > 0.8
    p = sel.predict(data.query, Pq)
    assert np.all(p >= Pq.min(1) - 1e-6) and np.all(p <= Pq.max(1) + 1e-6)


def test_run_seed_produces_every_method_with_bounds(toy_dir):
    from metactr.papers.metaselector.train import run_seed

    data = SelectorData.load(toy_dir, disjoint=False)
    cfg = SelectorExperiment(
        base_models=[BaseModelConfig(name="lr", optimizer="ftrl", lr=0.05),
                     BaseModelConfig(name="basic", hp={"embed_dim": 4, "hidden": [8]})],
        pretrain={"epochs": 1, "batch_size": 64}, selector={"hidden": [8]},
        meta={"episodes": 3, "max_support": 8, "max_query": 4, "inner_lr": 0.01},
        sample_selector={"epochs": 1, "hidden": [8], "batch_size": 64}, reference_model="basic")
    r = run_seed(cfg, data, 0)
    assert set(r.metrics) == {"lr", "basic", "perfect_sample", "perfect_user", "sample_selector",
                              "metaselector", "metaselector_simplified"}
    best_ll = r.metrics["perfect_sample"]["logloss"]
    assert all(best_ll <= m["logloss"] + 1e-9 for k, m in r.metrics.items() if k not in ("metaselector", "metaselector_simplified"))
    assert r.metrics["perfect_user"]["logloss"] <= min(r.metrics["lr"]["logloss"], r.metrics["basic"]["logloss"])
    assert set(r.user_loss) == {"metaselector", "basic"}
    for key in ("metaselector", "metaselector_simplified"):
        st = r.selector_stats[key]
        assert set(st["mean_weight"]) == {"lr", "basic"} and sum(st["mean_weight"].values()) == pytest.approx(1, abs=1e-3)
        assert 0 <= st["entropy"] <= st["max_entropy"] + 1e-9
        assert set(st["rates"]) == ({"base.0", "base.1", "selector"} if key == "metaselector" else {"selector"})
    # Simplified never changes the base models; the full MetaSelector meta-trains them
    assert r.selector_stats["metaselector_simplified"]["base_auc_after_meta"] == pytest.approx(
        {k: r.metrics[k]["auc"] for k in ("lr", "basic")})
    held_out = run_seed(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"meta_bases": "support"})}),
                        data, 0)
    assert held_out.metrics["lr"] == r.metrics["lr"]  # the single models do not change
    # the selector starts from base models that never saw the query rows
    assert held_out.selector_stats["metaselector_simplified"]["base_auc_after_meta"] != pytest.approx(
        {k: r.metrics[k]["auc"] for k in ("lr", "basic")})
    with pytest.raises(ConfigError):
        run_seed(cfg.model_copy(update={"base_models": [cfg.base_models[0], cfg.base_models[0]]}), data, 0)


# --------------------------------------------------------------------------- diagnostics and settings
def test_forward_gives_the_logit_and_log_lambda_in_one_output():
    model = tiny_selector(3).eval()
    b = toy_batch()
    out = model(b)
    assert out.logit.shape == (7,) and out.log_weights.shape == (7, 3)
    torch.testing.assert_close(out.log_weights.exp(), model.weights(b))
    torch.testing.assert_close(out.log_weights.exp().sum(-1), torch.ones(7))


def test_metaselector_is_registered_and_rebuilds_from_a_checkpoint(tmp_path):
    from metactr.train.checkpoint import load_model, model_meta, save_checkpoint

    hp = {"base_models": [{"name": "lr"}, {"name": "fm", "embed_dim": 4}], "embed_dim": 4, "hidden": [8]}
    torch.manual_seed(0)
    model = build_model("metaselector", SPEC, **hp).eval()
    save_checkpoint(tmp_path / "ms", model, model_meta(model, hp, {}))
    again, _ = load_model(tmp_path / "ms")
    b = toy_batch()
    torch.testing.assert_close(again.eval()(b).logit, model(b).logit)
    assert again.base_names == ["lr", "fm"]


def test_lambda_stats_tell_a_uniform_mix_from_a_collapsed_or_per_user_one():
    from metactr.papers.metaselector.train import lambda_stats, rate_stats

    users = np.array([1, 1, 2, 2, 3, 3])
    uni = lambda_stats(np.full((6, 4), 0.25), users, list("abcd"))
    assert uni["entropy"] == pytest.approx(np.log(4)) and uni["max_entropy"] == pytest.approx(np.log(4))
    assert all(v == 0 for v in uni["user_std"].values())
    one = np.zeros((6, 4))
    one[:, 2] = 1.0
    col = lambda_stats(one, users, list("abcd"))
    assert col["entropy"] == pytest.approx(0.0) and col["mean_weight"]["c"] == 1.0
    assert col["user_argmax_share"] == {"a": 0.0, "b": 0.0, "c": 1.0, "d": 0.0}
    per_user = np.zeros((6, 4))
    per_user[[0, 1], 0] = per_user[[2, 3], 1] = per_user[[4, 5], 1] = 1.0
    pu = lambda_stats(per_user, users, list("abcd"))
    assert pu["user_std"]["a"] > 0.4 and pu["user_argmax_share"]["b"] == pytest.approx(2 / 3, abs=1e-4)
    rates = {"base.0.w": torch.full((3,), 0.1), "base.1.w": torch.full((2,), 0.3), "selector.x": torch.zeros(4)}
    assert rate_stats(rates, 2) == pytest.approx({"base.0": 0.1, "base.1": 0.3, "selector": 0.0})


def test_meta_test_returns_every_column_of_a_wide_score(toy_dir):
    from metactr.papers.metaselector.train import _score_with_weights

    data = SelectorData.load(toy_dir, disjoint=False)
    model = tiny_selector(2, spec=data.ds.spec)
    rates = MetaSGDRates(live_params(model), model.params_in("base", "selector"), 0.05).as_dict()
    cfg = _toy_cfg()
    wide = meta_test(model, rates, data, cfg, score=_score_with_weights)
    assert wide.shape == (len(data.test), 3)
    torch.testing.assert_close(wide[:, 0], meta_test(model, rates, data, cfg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide[:, 1:].exp().sum(-1), torch.ones(len(data.test)))


def test_ftrl_settings_reach_the_optimizer_and_beta_per_batch_learns_lr(toy_dir):
    from metactr.papers.metaselector.meta import base_epochs, base_optimizer, pretrain
    from metactr.engine.optim import FTRL

    data = SelectorData.load(toy_dir, disjoint=False)
    b = BaseModelConfig(name="lr", optimizer="ftrl", lr=0.1, beta=1e-3, l1=0.01, l2=0.5, epochs=4)
    opt = base_optimizer(build_model("lr", data.ds.spec), b)
    assert isinstance(opt, FTRL)
    assert {k: opt.defaults[k] for k in ("lr", "beta", "l1", "l2")} == {"lr": 0.1, "beta": 1e-3, "l1": 0.01, "l2": 0.5}
    assert base_epochs(SelectorExperiment(), b) == 4
    assert base_epochs(SelectorExperiment(pretrain={"epochs": 3}), b.model_copy(update={"epochs": None})) == 3
    with pytest.raises(ConfigError, match="beta"):
        from metactr.config import validate
        validate(SelectorExperiment, {"base_models": [{"name": "lr", "optimizer": "ftrl", "beta": -1}]})

    def train_loss(beta: float) -> float:
        torch.manual_seed(0)
        m = build_model("lr", data.ds.spec)
        cfg = BaseModelConfig(name="lr", optimizer="ftrl", lr=0.1, beta=beta)
        return pretrain(m, cfg, data.ds, data.train, epochs=3, batch_size=64,
                        generator=torch.Generator().manual_seed(0))[-1]

    # FTRL on mean mini-batch gradients: beta = 1 (McMahan's per-sample value) barely moves the
    # weights; beta = 1/batch is the per-sample beta = 1 and fits the data
    assert train_loss(1.0 / 64) < train_loss(1.0) - 0.01


def test_vectorized_meta_test_equals_the_per_user_path_with_the_paper_bases(toy_dir):
    """The vectorized meta-test (``adapt_and_predict`` with a score: all users of a chunk at
    once, task-local tables) gives the per-user ``adapt`` + score numbers, logit and log lambda,
    with LR / FM / FFM / DeepFM bases (shared multi-valued genre field, histories); with the
    plain logit as score it is the engine's default output."""
    from metactr.engine.functional import adapt_and_predict
    from metactr.papers.metaselector.train import _score_with_weights, build_base_models

    data = SelectorData.load(toy_dir, disjoint=False)
    torch.manual_seed(0)
    exp = SelectorExperiment.model_validate({"base_models": [
        {"name": "lr"}, {"name": "fm", "hp": {"embed_dim": 3}}, {"name": "ffm", "hp": {"embed_dim": 3}},
        {"name": "deepfm", "hp": {"embed_dim": 3, "hidden": [8]}}]})
    model = MetaSelector(data.ds.spec, build_base_models(exp, data.ds), embed_dim=3, hidden=(6,))
    rates = MetaSGDRates(live_params(model), model.params_in("base", "selector"), 0.5).as_dict()
    cfg = _toy_cfg()
    vec = meta_test(model, rates, data, cfg, steps=2, score=_score_with_weights)
    loop = meta_test(model, rates, data, cfg.model_copy(update={"vectorize": False}), steps=2,
                     score=_score_with_weights)
    assert vec.shape == (len(data.test), 5)
    torch.testing.assert_close(vec, loop, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(vec, meta_test(model, None, data, cfg, score=_score_with_weights), atol=1e-3)

    idx = UserIndex.build(data.test)
    rows, w = idx.sample(torch.arange(3), 6, None, latest=True)
    from metactr.data.tasks import task_batch

    sup = task_batch(data.ds, data.test, rows)
    live = {n: p.detach() for n, p in model.named_parameters()}
    kw = dict(names=list(rates), lr=rates, steps=1, support_weight=w)
    ours = adapt_and_predict(model, live, sup, sup, **kw,
                             score=lambda m, p, b: torch.func.functional_call(m, p, (b,)).logit)
    torch.testing.assert_close(ours, adapt_and_predict(model, live, sup, sup, **kw))
    with pytest.raises(KeyError):
        adapt_and_predict(model, live, sup, sup, names=["no.such.param"], lr=0.1, score=_score_with_weights)


def test_validation_protocol_never_reads_test_rows_and_cuts_support_chronologically(toy_dir):
    data = SelectorData.load(toy_dir, disjoint=False)
    val = data.validation()
    # train = support, test = query, meta-test users adapt on their support rows
    assert torch.equal(val.train.target, data.support.target) and torch.equal(val.test.target, data.query.target)
    assert torch.equal(val.test_train.target, data.support.target) and not val.disjoint_test_users
    # the inner support + query are exactly the support rows, each user's earliest ~75% first
    assert len(val.support) + len(val.query) == len(data.support)
    assert data.support.timestamp is not None
    for u in data.support.user_id.unique().tolist():
        s_ts = val.support.timestamp[val.support.user_id == u]
        q_ts = val.query.timestamp[val.query.user_id == u]
        n = int((data.support.user_id == u).sum())
        assert len(s_ts) == max(1, min(round(0.75 * n), max(n - 1, 1)))
        if len(q_ts):
            assert s_ts.max() <= q_ts.min()
    with pytest.raises(ConfigError, match="support_fraction"):
        data.validation(1.0)
    half = data.validation(0.5)  # the cut follows the pipeline's fraction when one is given
    assert len(half.support) < len(val.support) and len(half.support) + len(half.query) == len(data.support)
