"""The torch.func meta-learning engine (metactr.engine.functional) and user tasks (metactr.data.tasks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.data.prepared import PreparedDataset
from metactr.data.tasks import UserTaskSampler, pad_tasks, task_batch
from metactr.engine.functional import (MetaSGDRates, fast_adapt, inner_adapt, live_params,
                                     maml_outer_loss)
from metactr.data.toy import write_toy_rml_dataset
from metactr.models.base import build_model, objective

SPEC = FeatureSpec(user=(Field("user_id", 20), Field("age", 5)),
                   item=(Field("item_id", 30), Field("genre", 6, max_len=2)), max_hist_len=4)


def random_batch(shape: tuple[int, ...], gen: torch.Generator) -> Batch:
    L = SPEC.max_hist_len
    lens = torch.randint(1, L + 1, shape, generator=gen)
    mask = torch.arange(L) < lens.unsqueeze(-1)
    hist = torch.stack([torch.randint(1, 30, (*shape, L), generator=gen),
                        torch.randint(0, 6, (*shape, L), generator=gen),
                        torch.randint(0, 6, (*shape, L), generator=gen)], -1) * mask.unsqueeze(-1)
    return Batch(user=torch.stack([torch.randint(1, 20, shape, generator=gen), torch.randint(1, 5, shape, generator=gen)], -1),
                 item=torch.stack([torch.randint(1, 30, shape, generator=gen), torch.randint(1, 6, shape, generator=gen),
                                   torch.randint(0, 6, shape, generator=gen)], -1),
                 context=torch.zeros((*shape, 0), dtype=torch.long), hist=hist, hist_mask=mask,
                 hist_label=torch.randint(0, 2, (*shape, L), generator=gen).double() * mask,
                 label=torch.randint(0, 2, shape, generator=gen).double(), user_id=torch.zeros(shape, dtype=torch.long))


def tiny_model(name: str = "basic", **kw):
    torch.manual_seed(0)
    kw = {"embed_dim": 4, "hidden": (8,), "emb_init_std": 0.1, **kw}
    return build_model(name, SPEC, **kw).double()


@pytest.fixture
def tasks():
    g = torch.Generator().manual_seed(1)
    T, S, Q = 4, 5, 3
    sup, qry = random_batch((T, S), g), random_batch((T, Q), g)
    sw = torch.ones(T, S, dtype=torch.float64)
    sw[0, 3:] = 0  # task 0 has only 3 real support rows
    qw = torch.ones(T, Q, dtype=torch.float64)
    qw[1, 2:] = 0
    return sup, qry, sw, qw


def meta_grads(model, loss):
    params = live_params(model)
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), gs, strict=True)}


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_vmap_meta_gradient_equals_per_task_loop(tasks, steps, first_order):
    sup, qry, sw, qw = tasks
    model = tiny_model()
    names = model.params_in("mlp")
    kw = dict(names=names, lr=0.3, steps=steps, first_order=first_order, support_weight=sw, query_weight=qw)
    g_vec = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, vectorize=True, **kw))
    g_loop = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, vectorize=False, **kw))
    assert any(g.abs().max() > 0 for g in g_vec.values())
    for n in g_vec:
        torch.testing.assert_close(g_vec[n], g_loop[n], atol=1e-5, rtol=0)


def test_second_order_meta_gradient_matches_finite_differences(tasks):
    sup, qry, sw, qw = tasks
    model = tiny_model()
    names = model.params_in("mlp")

    def loss_at(params):
        return maml_outer_loss(model, params, sup, qry, names=names, lr=0.5, steps=2,
                               support_weight=sw, query_weight=qw)

    params = live_params(model)
    g = meta_grads(model, loss_at(params))
    eps = 1e-6
    for n in ["mlp.net.0.weight", "embedding.weight"]:
        flat_idx = [0, 7, 13]
        for i in flat_idx:
            plus = {k: v.detach().clone() for k, v in params.items()}
            minus = {k: v.detach().clone() for k, v in params.items()}
            plus[n].view(-1)[i] += eps
            minus[n].view(-1)[i] -= eps
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            assert abs(fd.item() - g[n].view(-1)[i].item()) < 1e-6, (n, i)


def test_first_order_differs_from_second_order(tasks):
    sup, qry, sw, qw = tasks
    model = tiny_model()
    names = model.params_in("mlp")
    g2 = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, names=names, lr=0.5, steps=2))
    g1 = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, names=names, lr=0.5, steps=2,
                                           first_order=True))
    assert (g2["mlp.net.0.weight"] - g1["mlp.net.0.weight"]).abs().max() > 1e-6


def test_padded_task_rows_do_not_change_the_meta_loss(tasks):
    sup, qry, sw, qw = tasks
    model = tiny_model()
    names = model.params_in("mlp")
    base = maml_outer_loss(model, live_params(model), sup, qry, names=names, lr=0.3, support_weight=sw, query_weight=qw)
    # scramble the padded rows' labels and features: weight 0 must hide them
    sup2 = sup._replace(label=torch.where(sw > 0, sup.label, 1 - sup.label),
                        item=torch.where((sw > 0).unsqueeze(-1), sup.item, torch.ones_like(sup.item)))
    qry2 = qry._replace(label=torch.where(qw > 0, qry.label, 1 - qry.label))
    other = maml_outer_loss(model, live_params(model), sup2, qry2, names=names, lr=0.3, support_weight=sw, query_weight=qw)
    torch.testing.assert_close(base, other, atol=1e-12, rtol=0)


def test_inner_adapt_touches_only_named_parameters(tasks):
    sup, _, sw, _ = tasks
    model = tiny_model()
    params = live_params(model)
    names = model.params_in("mlp")
    adapted = inner_adapt(model, params, sup.select(0), names=names, lr=0.1, steps=3, weight=sw[0])
    assert adapted["embedding.weight"] is params["embedding.weight"]
    assert not torch.equal(adapted[names[0]], params[names[0]])
    with pytest.raises(KeyError):
        inner_adapt(model, params, sup.select(0), names=["nope"], lr=0.1)
    with pytest.raises(ValueError):
        inner_adapt(model, params, sup.select(0), names=names, lr=0.1, steps=-1)


def test_metasgd_rates_receive_gradients(tasks):
    sup, qry, sw, qw = tasks
    model = tiny_model()
    names = model.params_in("mlp")
    rates = MetaSGDRates(live_params(model), names, init=0.2)
    loss = maml_outer_loss(model, live_params(model), sup, qry, names=names, lr=rates.as_dict(),
                           support_weight=sw, query_weight=qw)
    loss.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rates.rates)
    assert rates.as_dict()[names[0]].shape == live_params(model)[names[0]].shape
    with pytest.raises(ValueError):
        MetaSGDRates(live_params(model), names, init=0.0)


def test_fast_adapt_lowers_support_loss_without_graph(tasks):
    sup, _, _, _ = tasks
    model = tiny_model()
    batch = sup.select(1)
    before, _ = objective(model, None, batch)
    adapted = fast_adapt(model, batch, lr=0.5, steps=5)
    after, _ = objective(model, adapted, batch)
    assert after.item() < before.item()
    assert all(not t.requires_grad for t in adapted.values())
    # the model's own parameters are untouched
    torch.testing.assert_close(objective(model, None, batch)[0], before)


def test_maml_rejects_bad_shapes(tasks):
    sup, qry, _, _ = tasks
    model = tiny_model()
    with pytest.raises(ValueError):
        maml_outer_loss(model, live_params(model), sup.select(0), qry.select(0), names=model.params_in("mlp"), lr=0.1)
    with pytest.raises(ValueError):
        maml_outer_loss(model, live_params(model), sup, qry.select(slice(0, 2)), names=model.params_in("mlp"), lr=0.1)


# ----------------------------------------------------------------------------- tasks
def test_pad_tasks_pads_with_first_row_and_zero_weight():
    idx, w = pad_tasks([np.array([5, 6, 7]), [9], torch.tensor([1, 2, 3, 4, 5])], size=4)
    assert idx.tolist() == [[5, 6, 7, 5], [9, 9, 9, 9], [1, 2, 3, 4]]
    assert w.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    idx2, _ = pad_tasks([[1, 2], [3]])
    assert idx2.shape == (2, 2)
    with pytest.raises(ValueError):
        pad_tasks([[1], []])
    with pytest.raises(ValueError):
        pad_tasks([])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = write_toy_rml_dataset(tmp_path_factory.mktemp("toy"), n_users=20, rows_per_user=8)
    return PreparedDataset(root)


def test_task_batch_has_leading_task_dim(toy):
    idx, w = pad_tasks([[0, 1, 2], [5]], size=3)
    b = task_batch(toy, "wc_train", idx, w)
    assert b.label.shape == (2, 3) and b.hist.shape[:2] == (2, 3)
    flat = toy.batch(toy.split("wc_train"), idx.reshape(-1))
    assert torch.equal(b.item.reshape(6, -1), flat.item)
    with pytest.raises(ValueError):
        task_batch(toy, "wc_train", idx.reshape(-1))


def test_user_sampler_one_split_tasks_are_single_user_and_disjoint(toy):
    sampler = UserTaskSampler(toy, "wc_train", tasks_per_batch=6, support_size=10, query_size=10, query_frac=0.3)
    split = toy.split("wc_train")
    seen = []
    for tb in sampler.iterate(np.random.default_rng(0)):
        T = tb.users.shape[0]
        for t in range(T):
            s_rows = tb.support.user_id[t][tb.support_weight[t] > 0]
            q_rows = tb.query.user_id[t][tb.query_weight[t] > 0]
            assert (s_rows == tb.users[t]).all() and (q_rows == tb.users[t]).all()
            assert len(q_rows) >= 1 and len(s_rows) >= 1
        seen += tb.users.tolist()
    assert sorted(seen) == sorted(np.unique(split.user_id.numpy()).tolist())
    assert len(sampler) == -(-len(seen) // 6)


def test_user_sampler_support_and_query_rows_do_not_overlap(toy):
    sampler = UserTaskSampler(toy, "wc_train", tasks_per_batch=4, support_size=20, query_size=20)
    # identify rows by (target, hist first item) to check disjointness per task
    tb = next(sampler.iterate(np.random.default_rng(1)))
    for t in range(tb.users.shape[0]):
        s_keys = {(int(a), int(b)) for a, b, w in zip(tb.support.item[t, :, 0], tb.support.hist[t, :, -1, 0],
                                                          tb.support_weight[t], strict=True) if w > 0}
        n_s = int(tb.support_weight[t].sum())
        n_q = int(tb.query_weight[t].sum())
        assert n_s + n_q == 7  # every train row of the user (8 rows, 1 went to FT/test)
        assert len(s_keys) >= 1


def test_user_sampler_two_splits_matches_users(toy):
    sampler = UserTaskSampler(toy, "wc_train", query_split="wc_test", tasks_per_batch=3, support_size=4, query_size=2)
    test_users = set(toy.split("wc_test").user_id.tolist())
    n = 0
    for tb in sampler.iterate(np.random.default_rng(0)):
        for t in range(tb.users.shape[0]):
            assert int(tb.users[t]) in test_users
            assert (tb.query.user_id[t] == tb.users[t]).all()
        n += tb.users.shape[0]
    assert n == len(test_users)


def test_user_sampler_rejects_bad_arguments(toy):
    with pytest.raises(ValueError):
        UserTaskSampler(toy, "wc_train", query_frac=1.0)
    with pytest.raises(ValueError):
        UserTaskSampler(toy, "wc_train", tasks_per_batch=0)
