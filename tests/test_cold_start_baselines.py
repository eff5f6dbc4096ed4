"""The RML paper's meta-learning competitors: MeLU, MAMO, Meta-Embedding (models + trainers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.data.prepared import PreparedDataset
from metactr.errors import ConfigError
from metactr.data.tasks import item_target_counts, item_task_batches
from metactr.data.toy import write_toy_rml_dataset
from metactr.engine.functional import live_params, maml_outer_loss
from metactr.models.base import build_model, objective, registry
from metactr.strategies import strategy_config
from metactr.strategies.cold_start import meta_embedding_loss
from metactr.train.trainer import train

SPEC = FeatureSpec(user=(Field("user_id", 20), Field("age", 5), Field("tags", 4, max_len=2)),
                   item=(Field("item_id", 30), Field("genre", 6, max_len=2), Field("year", 7)), max_hist_len=4)
MAML_MODELS = ["melu", "mamo"]


def random_batch(shape: tuple[int, ...], gen: torch.Generator, L: int = 4) -> Batch:
    lens = torch.randint(0, L + 1, shape, generator=gen)
    mask = torch.arange(L) < lens.unsqueeze(-1)

    def items(s):
        return torch.stack([torch.randint(1, 30, s, generator=gen), torch.randint(1, 6, s, generator=gen),
                            torch.randint(0, 6, s, generator=gen), torch.randint(1, 7, s, generator=gen)], -1)

    user = torch.stack([torch.randint(1, 20, shape, generator=gen), torch.randint(1, 5, shape, generator=gen),
                        torch.randint(1, 4, shape, generator=gen), torch.randint(0, 4, shape, generator=gen)], -1)
    return Batch(user=user,
                 item=items(shape), context=torch.zeros((*shape, 0), dtype=torch.long),
                 hist=items((*shape, L)) * mask.unsqueeze(-1), hist_mask=mask,
                 hist_label=torch.randint(0, 2, (*shape, L), generator=gen).double() * mask,
                 label=torch.randint(0, 2, shape, generator=gen).double(), user_id=torch.zeros(shape, dtype=torch.long))


def tiny(name: str, **kw):
    torch.manual_seed(0)
    base = {"embed_dim": 4, "hidden": (8,), "emb_init_std": 0.3}
    return build_model(name, SPEC, **{**base, **kw}).double()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return PreparedDataset(write_toy_rml_dataset(tmp_path_factory.mktemp("toy"), n_users=24, rows_per_user=10))


FAST = {"tasks_per_batch": 8, "support_size": 6, "query_size": 4, "lr": 0.02, "inner_lr": 0.05}


def fit(name: str, model, ds, *, epochs: float = 4, **kw):
    """Train ``model`` with strategy ``name`` (the fast settings above) in the Trainer."""
    return train(model, ds, "wc_train", strategy_config(name, {**FAST, **kw}), epochs=epochs, batch_size=32, seed=0)


# --------------------------------------------------------------------------- models
def test_models_are_registered():
    assert {"melu", "mamo", "meta_embedding"} <= set(registry())


@pytest.mark.parametrize("name", ["melu", "mamo", "meta_embedding"])
def test_forward_backward_and_groups_cover_every_parameter(name):
    model = tiny(name)
    batch = random_batch((6,), torch.Generator().manual_seed(0))
    loss, out = objective(model, None, batch)
    assert out.logit.shape == (6,) and torch.isfinite(out.logit).all()
    loss.backward()
    groups = model.param_groups()  # raises when a parameter has no group or two
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    # the classifier and the input embeddings learn (meta_embedding's generator is not in forward)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("embedding" in n for n in trained) and len(trained) >= 3


@pytest.mark.parametrize("name", ["melu", "mamo"])
def test_id_fields_are_unused_by_default_and_used_on_request(name):
    batch = random_batch((5,), torch.Generator().manual_seed(1))
    other = batch._replace(user=batch.user.clone(), item=batch.item.clone())
    other.user[:, 0] = (other.user[:, 0] % 19) + 1  # change only the user and item ids
    other.item[:, 0] = (other.item[:, 0] % 29) + 1
    model = tiny(name)
    assert torch.equal(model(batch).logit, model(other).logit)
    with_ids = tiny(name, use_ids=True)
    assert not torch.allclose(with_ids(batch).logit, with_ids(other).logit)


@pytest.mark.parametrize("name", ["melu", "mamo", "meta_embedding"])
def test_padding_invariance(name):
    """Extra padded session positions and padded multi-valued slots change nothing."""
    model = tiny(name)
    b = random_batch((5,), torch.Generator().manual_seed(2))
    pad = 3
    longer = b._replace(hist=torch.cat([b.hist, torch.zeros(5, pad, b.hist.shape[-1], dtype=torch.long)], 1),
                        hist_mask=torch.cat([b.hist_mask, torch.zeros(5, pad, dtype=torch.bool)], 1),
                        hist_label=torch.cat([b.hist_label, torch.zeros(5, pad, dtype=b.hist_label.dtype)], 1))
    torch.testing.assert_close(model(b).logit, model(longer).logit)
    # the session has no effect at all without use_history
    if name != "meta_embedding":
        flat = tiny(name, use_history=False)
        shuffled = b._replace(hist=b.hist.flip(0), hist_mask=b.hist_mask.flip(0))
        torch.testing.assert_close(flat(b).logit, flat(shuffled).logit)


def test_mamo_memory_personalises_by_profile():
    model = tiny("mamo", n_memory=4, tau=1.0)
    b = random_batch((6,), torch.Generator().manual_seed(3))
    a = model.read_attention(torch.randn(6, 8, dtype=torch.float64))
    torch.testing.assert_close(a.sum(-1), torch.ones(6, dtype=torch.float64))
    base = model(b).logit
    with torch.no_grad():
        model.task_memory.add_(torch.randn_like(model.task_memory))
    assert not torch.allclose(base, model(b).logit)  # the memory cube enters the prediction
    with pytest.raises(ConfigError):
        tiny("mamo", tau=-1.0)
    with pytest.raises(ConfigError):
        tiny("mamo", n_memory=0)


@pytest.mark.parametrize("name", MAML_MODELS)
def test_vmap_meta_gradient_matches_task_loop(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(4)
    sup, qry = random_batch((3, 5), g), random_batch((3, 4), g)
    sw = torch.ones(3, 5, dtype=torch.float64)
    sw[0, 3:] = 0
    qw = torch.ones(3, 4, dtype=torch.float64)
    local = model.params_in(*("decision",) if name == "melu" else ("user_enc", "item_enc", "rec"))
    grads = []
    for vec in (True, False):
        params = live_params(model)
        loss = maml_outer_loss(model, params, sup, qry, names=local, lr=0.1, steps=1, support_weight=sw,
                               query_weight=qw, vectorize=vec)
        grads.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
    for a, b in zip(*grads, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    # padded support rows (weight 0) do not matter
    flipped = sup._replace(label=torch.where(sw > 0, sup.label, 1 - sup.label))
    params = live_params(model)
    l1 = maml_outer_loss(model, params, sup, qry, names=local, lr=0.1, support_weight=sw, query_weight=qw)
    l2 = maml_outer_loss(model, params, flipped, qry, names=local, lr=0.1, support_weight=sw, query_weight=qw)
    torch.testing.assert_close(l1, l2)


def test_meta_embedding_wraps_a_base_and_validates():
    model = tiny("meta_embedding", base="deepfm")
    assert "base.embedding.weight" in model.params_in("emb") and model.params_in("generator")
    items = random_batch((4,), torch.Generator().manual_seed(5)).item
    assert model.generate(items).shape == (4, 5)  # DeepFM's table is [v | w]: embed_dim + 1
    with pytest.raises(ConfigError):
        build_model("meta_embedding", SPEC, base="nope")
    with pytest.raises(ConfigError):
        build_model("meta_embedding", SPEC, base="meta_embedding")
    no_id = FeatureSpec(user=SPEC.user, item=(Field("genre", 6, max_len=2),), max_hist_len=4)
    with pytest.raises(ConfigError):
        build_model("meta_embedding", no_id)


def test_meta_embedding_warm_up_gradient_is_per_item():
    """Batched cold/warm losses equal the mean of the losses computed one item at a time."""
    model = tiny("meta_embedding")
    g = torch.Generator().manual_seed(6)
    T = 3
    a, b = random_batch((T, 4), g), random_batch((T, 3), g)
    items = torch.stack([random_batch((1,), g).item[0] for _ in range(T)])
    items[:, 0] = torch.tensor([3, 7, 11])
    a = a._replace(hist=a.hist.clone())
    a.hist[0, :, 0, 0] = 7  # a session item that is another task's item must not couple the tasks
    a = a._replace(item=items[:, None].expand(T, 4, -1).clone())  # each task's rows are about its item
    b = b._replace(item=items[:, None].expand(T, 3, -1).clone())
    aw = torch.ones(T, 4, dtype=torch.float64)
    aw[1, 2:] = 0
    bw = torch.ones(T, 3, dtype=torch.float64)
    la, lb = model.cold_warm_losses(items, a, aw, b, bw, warm_lr=0.5)
    singles = [model.cold_warm_losses(items[t:t + 1], a.select(slice(t, t + 1)), aw[t:t + 1],
                                      b.select(slice(t, t + 1)), bw[t:t + 1], warm_lr=0.5) for t in range(T)]
    torch.testing.assert_close(la, torch.stack([s[0] for s in singles]).mean())
    torch.testing.assert_close(lb, torch.stack([s[1] for s in singles]).mean())
    assert not torch.allclose(la, lb)  # the warm-up step changed the embedding
    gen_grads = torch.autograd.grad(0.1 * la + 0.9 * lb, list(model.generator.parameters()))
    assert all(gr.abs().sum() > 0 for gr in gen_grads)


# --------------------------------------------------------------------------- trainers
def _train_loss(model, ds, split="wc_train") -> float:
    with torch.no_grad():
        return float(objective(model, None, ds.batch(ds.split(split)))[0])


@pytest.mark.parametrize("name", ["melu", "mamo"])
def test_maml_trainers_reduce_the_training_loss(toy, name):
    torch.manual_seed(0)
    model = build_model(name, toy.spec, embed_dim=8, hidden=(16,))
    before = _train_loss(model, toy)
    res = fit(name, model, toy, epochs=15, lr=0.05)
    assert _train_loss(model, toy) < before - 0.01
    assert isinstance(res.strategy.optimizer, torch.optim.Adam)
    assert res.strategy.adapt_groups == (["decision"] if name == "melu" else ["user_enc", "item_enc", "rec"])


def test_maml_trainer_rejects_a_model_without_its_groups(toy):
    model = build_model("basic", toy.spec, embed_dim=4, hidden=(8,))
    with pytest.raises(ConfigError):
        fit("melu", model, toy)
    with pytest.raises(ConfigError):
        fit("meta_embedding", model, toy)


def test_item_tasks_are_distinct_items_with_disjoint_halves(toy):
    rng = np.random.default_rng(0)
    s = toy.split("wc_train")
    seen = []
    for items, a, a_w, b, b_w in item_task_batches(toy, "wc_train", tasks_per_batch=5, a_size=3, b_size=3, rng=rng):
        assert items.unique().numel() == items.numel()
        for t in range(items.numel()):  # every real row of a task is about the task's item
            assert (a.item[t, a_w[t] > 0, 0] == items[t]).all() and (b.item[t, b_w[t] > 0, 0] == items[t]).all()
            assert a_w[t].sum() >= 1 and b_w[t].sum() >= 1
        seen += items.tolist()
    counts = item_target_counts(toy, "wc_train")
    assert sorted(seen) == sorted(np.flatnonzero(counts >= 2).tolist())  # one pass = every item once
    assert counts.sum() == len(s)


def test_meta_embedding_trainer_learns_generator_and_installs_cold_items(toy):
    torch.manual_seed(0)
    model = build_model("meta_embedding", toy.spec, embed_dim=8, hidden=(16,))
    before = _train_loss(model, toy)
    res = fit("meta_embedding", model, toy, epochs=3, cold_threshold=12)
    assert _train_loss(model, toy) < before - 0.01  # the pre-trained base
    counts = item_target_counts(toy, "wc_train")
    cold = np.flatnonzero(counts < 12)
    cold = torch.from_numpy(cold[cold > 0])
    assert res.extra["n_cold_items"] == cold.numel() > 0
    with torch.no_grad():  # installed rows are the generator's output
        rows = model.id_rows(toy.item_table[cold])
        torch.testing.assert_close(model.table.weight[rows], model.generate(toy.item_table[cold]))
    # the meta loss on fixed item tasks went down while training the generator
    assert res.extra["meta_loss_last"] < res.extra["meta_loss_first"] + 0.05
    with pytest.raises(ConfigError):
        strategy_config("meta_embedding", {"alpha": 2.0})


def test_meta_embedding_generator_step_lowers_its_meta_loss(toy):
    torch.manual_seed(0)
    model = build_model("meta_embedding", toy.spec, embed_dim=8, hidden=(16,), emb_init_std=0.1)
    items, a, a_w, b, b_w = next(item_task_batches(toy, "wc_train", tasks_per_batch=16, a_size=4, b_size=4,
                                                   rng=np.random.default_rng(0)))
    opt = torch.optim.Adam(model.generator.parameters(), lr=0.05)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("generator")}
    losses = []
    for _ in range(15):
        loss = meta_embedding_loss(model, toy, items, a, a_w, b, b_w, warm_lr=0.1, alpha=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3
    for n, p in model.named_parameters():  # the base stays frozen
        if n in base_before:
            assert torch.equal(p.detach(), base_before[n])


# --------------------------------------------------------------------------- through `reproduce rml`
def test_reproduce_rml_runs_the_meta_learning_baselines(tmp_path):
    import json

    from metactr.cli import main
    from metactr.papers.rml.reproduce import ReproduceConfig, method_config

    assert {m: method_config(ReproduceConfig(), m).strategy for m in ("meta_e", "melu", "mamo")} == \
        {"meta_e": "meta_embedding", "melu": "melu", "mamo": "mamo"}
    data = write_toy_rml_dataset(tmp_path / "toy", n_users=24, rows_per_user=10)
    out = tmp_path / "run"
    assert main(["reproduce", "rml", "--data", str(data), "--out", str(out), "--methods", "meta_e,melu,mamo",
                 "--seeds", "1", "--subsets", "wc", "--epochs", "0.5", "--mode", "full"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    ftc = {r["method"]: r for r in rows if r["stage"] == "finetune_c"}
    assert set(ftc) == {"meta_e", "melu", "mamo"}
    assert ftc["melu"]["paper_auc"] == 0.7666
    n_test = len(PreparedDataset(data).split("wc_test"))
    before = {r["method"]: r for r in rows if r["stage"] == "before"}
    for m, r in ftc.items():  # every test row scored (mode full), and fine-tuning moved each model
        assert r["n_test"] == n_test
        assert r["logloss_mean"] != pytest.approx(before[m]["logloss_mean"], abs=1e-6), m
