"""Task-local embedding tables in the meta-learning engine (metactr.engine.local_tables).

The meta-gradient with local tables must equal the dense one (every registered model, and a
MetaSelector over LR/FM/FFM/DeepFM with every parameter adapted); adapted rows must match the
dense adapted table; the cases where localising would not be exact must take the dense path;
a row beyond a table must fail clearly.
"""

from __future__ import annotations

import pytest
import torch

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.errors import ConfigError, DataError
from metactr.engine import functional as fn
from metactr.engine.functional import (MetaSGDRates, adapt_and_predict, fast_adapt, inner_adapt, live_params,
                                     local_tables_default, maml_outer_loss)
from metactr.engine.local_tables import localisable_tables, plan_local_tables, task_rows, unique_rows
from metactr.models.metaselector import MetaSelector
from metactr.models.base import build_model, objective, registry
from metactr.models.layers import FieldEmbedding

# multi-valued item field, a context field, ids named as MeLU / Meta-Embedding expect them
SPEC = FeatureSpec(user=(Field("user_id", 9), Field("age", 4)), item=(Field("item_id", 13), Field("genres", 5, 2)),
                   context=(Field("weekday", 4),), max_hist_len=3)
T, S, Q = 3, 4, 3


def _ids(fields: tuple[Field, ...], shape: tuple[int, ...], g: torch.Generator, hi: int | None = None) -> torch.Tensor:
    cols = []
    for f in fields:
        # a narrow id range per task makes tasks touch few, different rows
        v = torch.randint(1, hi or f.vocab_size, (*shape, f.max_len), generator=g)
        if f.max_len > 1:
            v = v * (torch.rand(v.shape, generator=g) < 0.6)
            v[..., 0] = v[..., 0].clamp_min(1)
        cols.append(v)
    return torch.cat(cols, dim=-1)


def make_batch(shape: tuple[int, ...], seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    L = SPEC.max_hist_len
    lens = torch.randint(0, L + 1, shape, generator=g)
    mask = torch.arange(L) < lens.unsqueeze(-1)
    return Batch(user=_ids(SPEC.user, shape, g), item=_ids(SPEC.item, shape, g), context=_ids(SPEC.context, shape, g),
                 hist=_ids(SPEC.item, (*shape, L), g) * mask.unsqueeze(-1), hist_mask=mask,
                 hist_label=(torch.rand(*shape, L, generator=g) < 0.5).double() * mask,
                 label=(torch.rand(shape, generator=g) < 0.5).double(), user_id=torch.zeros(shape, dtype=torch.long))


@pytest.fixture(scope="module")
def tasks():
    sup, qry = make_batch((T, S), 1), make_batch((T, Q), 2)
    sw = torch.ones(T, S, dtype=torch.float64)
    sw[0, 2:] = 0  # padded support rows
    qw = torch.ones(T, Q, dtype=torch.float64)
    qw[2, 1:] = 0
    return sup, qry, sw, qw


def tiny(name: str, **extra):
    torch.manual_seed(0)
    if name == "metaselector":  # a mixture of two registered base models
        extra = {"base_models": [{"name": "lr"}, {"name": "fm", "embed_dim": 3}], **extra}
    for kw in ({"embed_dim": 3, "hidden": (5,)}, {"embed_dim": 3}, {}):
        try:
            model = build_model(name, SPEC, **kw, **extra)
            break
        except ConfigError:
            continue
    else:  # pragma: no cover - a new model with other hyper-parameter names
        raise AssertionError(f"cannot build a tiny '{name}'")
    with torch.no_grad():  # visible embeddings, so that every term moves the loss
        for m in model.modules():
            if isinstance(m, FieldEmbedding):
                m.weight.normal_(0, 0.3)
    return model.double().eval()


def tiny_selector():
    torch.manual_seed(0)
    bases = [build_model("lr", SPEC), build_model("fm", SPEC, embed_dim=3), build_model("ffm", SPEC, embed_dim=2),
             build_model("deepfm", SPEC, embed_dim=3, hidden=(5, 4))]
    model = MetaSelector(SPEC, bases, embed_dim=3, hidden=(6,))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FieldEmbedding):
                m.weight.normal_(0, 0.3)
    return model.double().eval()


def meta_grads(model, loss, extra=()):
    params = [*live_params(model).items(), *((f"rate{i}", r) for i, r in enumerate(extra))]
    gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, gs, strict=True)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def used_params(model, batch: Batch) -> list[str]:
    """Parameters the forward pass uses (Meta-Embedding's generator is not: it has its own loss)."""
    live = live_params(model)
    loss = objective(model, None, batch.select(0))[0]
    grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
    return [n for n, g in zip(live, grads, strict=True) if g is not None]


def tables_of(model) -> list[str]:
    return [f"{p}.weight" for p, m in model.named_modules() if isinstance(m, FieldEmbedding)]


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", sorted(registry()))
def test_every_model_local_meta_gradient_equals_dense(tasks, name):
    sup, qry, sw, qw = tasks
    model = tiny(name)
    names = used_params(model, sup)  # every parameter the forward uses, tables included
    assert set(localisable_tables(model, names)) == set(tables_of(model))  # every table goes local
    kw = dict(names=names, lr=0.4, steps=2, support_weight=sw, query_weight=qw)
    dense = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, local_tables=False, **kw))
    local = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, local_tables=True, **kw))
    assert not tables_of(model) or any(dense[t].abs().max() > 0 for t in tables_of(model))  # (rate models: none)
    assert_same(dense, local)


@pytest.mark.parametrize("name", ["deepfm", "din", "rml", "ffm"])
def test_frozen_tables_go_local_with_the_same_meta_gradient(tasks, name, monkeypatch):
    """Tables that are not adapted are gathered per task too (vmap path): same meta-gradient,
    tables' gradients included, and the frozen plan is really used."""
    sup, qry, sw, qw = tasks
    model = tiny(name)
    used = used_params(model, sup)
    names = [n for n in used if n not in tables_of(model)]  # everything but the tables
    kw = dict(names=names, lr=0.4, steps=2, support_weight=sw, query_weight=qw)
    dense = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, local_tables=False, **kw))
    seen = []
    real = fn._vectorized_outer_loss
    monkeypatch.setattr(fn, "_vectorized_outer_loss", lambda *a, **k: seen.append(k["frozen"]) or real(*a, **k))
    local = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, local_tables=True, **kw))
    assert seen and seen[0] is not None and set(seen[0].tables) == set(tables_of(model)) & set(used)
    assert any(dense[t].abs().max() > 0 for t in tables_of(model) if t in used)
    assert_same(dense, local)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("vectorize", [True, False])
def test_metaselector_local_meta_gradient_equals_dense(tasks, first_order, meta_sgd, vectorize):
    sup, qry, sw, qw = tasks
    model = tiny_selector()
    live = live_params(model)
    names = list(live)
    assert len(localisable_tables(model, names)) == 7  # lr 1, fm 2, ffm 2, deepfm 1, selector 1
    rates = MetaSGDRates(live, names, 0.3).double() if meta_sgd else None
    lr = rates.as_dict() if meta_sgd else 0.3
    extra = list(rates.rates) if meta_sgd else []
    kw = dict(names=names, lr=lr, steps=2, first_order=first_order, support_weight=sw, query_weight=qw,
              vectorize=vectorize)
    dense = meta_grads(model, maml_outer_loss(model, live, sup, qry, local_tables=False, **kw), extra)
    local = meta_grads(model, maml_outer_loss(model, live, sup, qry, local_tables=True, **kw), extra)
    if meta_sgd:  # the rates of the tables get their meta-gradient through the gathered copies
        assert dense[f"rate{names.index('base.2.embedding.weight')}"].abs().max() > 0
    assert_same(dense, local)


def test_local_adapted_rows_equal_dense_rows_and_others_stay(tasks):
    """fast_adapt with local tables: touched rows as the dense adaptation, the rest unchanged."""
    sup, _, sw, _ = tasks
    model = tiny_selector()
    b = sup.select(1)
    dense = fast_adapt(model, b, lr=0.5, steps=3, local_tables=False)
    local = fast_adapt(model, b, lr=0.5, steps=3, local_tables=True)
    assert dense.keys() == local.keys() == dict(model.named_parameters()).keys()
    live = live_params(model)
    for name in tables_of(model):
        module = dict(model.named_modules())[name[: -len(".weight")]]
        touched = torch.unique(task_rows(module, [Batch(*(t.unsqueeze(0) for t in b))]))
        untouched = torch.ones(live[name].shape[0], dtype=torch.bool)
        untouched[touched] = False
        torch.testing.assert_close(local[name], dense[name], atol=1e-6, rtol=0)
        assert torch.equal(local[name][untouched], live[name].detach()[untouched])
        assert not torch.equal(local[name][touched], live[name].detach()[touched])
    assert_same({n: local[n] for n in local}, {n: dense[n] for n in dense})


def test_vmapped_inner_step_rows_equal_dense_adapted_table(tasks):
    """The per-task local copies after the vectorized inner loop are the dense copies' rows."""
    sup, qry, sw, qw = tasks
    model = tiny("ffm")
    live = live_params(model)
    name = "embedding.weight"
    plan = plan_local_tables(model, [name], [sup, qry])
    lt = plan.tables[name]
    # adapted copies = W - lr * grad: compare the per-task inner gradients via one step with lr=1
    for t in range(T):
        d = fn.inner_adapt(model, live, sup.select(t), names=[name], lr=1.0, weight=sw[t])[name]
        p1, _ = fn.localise(plan.select(t), live, 1.0, [name])
        loc = fn.inner_adapt(model, p1, sup.select(t), names=[name], lr=1.0, weight=sw[t])[name]
        used = lt.row_map[t] >= 0
        torch.testing.assert_close(loc[lt.row_map[t][used]], d[used], atol=1e-10, rtol=0)
        assert torch.equal(d[~used], live[name].detach()[~used])  # untouched rows: zero gradient


def test_adapt_and_predict_equals_vmapped_inner_adapt(tasks):
    """Meta-test helper: local tables, plain autograd, same logits as vmap(inner_adapt)."""
    sup, qry, sw, _ = tasks
    model = tiny_selector()
    live = {n: p.detach() for n, p in live_params(model).items()}
    names = list(live)
    rates = {n: r.detach() for n, r in MetaSGDRates(live, names, 0.2).double().as_dict().items()}

    def one(s, w, q):
        adapted = inner_adapt(model, live, s, names=names, lr=rates, steps=2, weight=w)
        return torch.func.functional_call(model, adapted, (q,)).logit

    ref = torch.func.vmap(one)(sup, sw, qry)
    base = torch.func.vmap(lambda q: torch.func.functional_call(model, live, (q,)).logit)(qry)
    for local in (True, False):
        got = adapt_and_predict(model, live, sup, qry, names=names, lr=rates, steps=2, support_weight=sw,
                                local_tables=local)
        assert got.shape == (T, Q) and not got.requires_grad
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)
    assert (ref - base).abs().max() > 1e-4  # the adaptation moved the predictions
    with pytest.raises(ValueError, match="leading task dimension"):
        adapt_and_predict(model, live, sup.select(0), qry.select(0), names=names, lr=0.1)


# --------------------------------------------------------------------------- which path
def test_fallbacks_take_the_dense_path(tasks):
    sup, qry, _, _ = tasks
    fm = tiny("fm", l2_weight=0.1)  # L2 on the FM tables: untouched rows would shrink
    assert localisable_tables(fm, list(live_params(fm))) == {}
    assert plan_local_tables(fm, list(live_params(fm)), [sup, qry]) is None
    fm0 = tiny("fm")  # no L2: both tables local
    assert set(localisable_tables(fm0, list(live_params(fm0)))) == {"embedding.weight", "linear.weight"}
    # non-table parameters never go local; a model that opts out stays dense
    assert localisable_tables(fm0, ["bias"]) == {}
    fm0.local_tables = False
    assert localisable_tables(fm0, list(live_params(fm0))) == {}
    sel = tiny_selector()
    sel.base[2].local_tables = False  # one base model opting out keeps only its own tables dense
    local = set(localisable_tables(sel, list(live_params(sel))))
    assert len(local) == 5 and not any(n.startswith("base.2.") for n in local)
    # a table that already carries a row_map is left alone
    basic = tiny("basic")
    basic.embedding.row_map = torch.arange(basic.embedding.weight.shape[0])
    assert localisable_tables(basic, list(live_params(basic))) == {}


def test_l2_model_dense_fallback_still_exact(tasks):
    sup, qry, sw, qw = tasks
    model = tiny("fm", l2_weight=0.05)
    names = list(live_params(model))
    kw = dict(names=names, lr=0.3, steps=1, support_weight=sw, query_weight=qw)
    a = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, **kw))
    with local_tables_default(False):
        b = meta_grads(model, maml_outer_loss(model, live_params(model), sup, qry, **kw))
    assert_same(a, b)


def test_local_tables_default_context_switches_the_path(tasks, monkeypatch):
    sup, qry, sw, qw = tasks
    model = tiny("fm")
    plans = []
    real = fn._vectorized_outer_loss

    def spy(*a, **kw):
        plans.append(kw["plan"])
        return real(*a, **kw)

    monkeypatch.setattr(fn, "_vectorized_outer_loss", spy)
    kw = dict(names=list(live_params(model)), lr=0.1, support_weight=sw, query_weight=qw)
    maml_outer_loss(model, live_params(model), sup, qry, **kw)
    with local_tables_default(False):
        maml_outer_loss(model, live_params(model), sup, qry, **kw)
        maml_outer_loss(model, live_params(model), sup, qry, local_tables=True, **kw)
    assert [p is not None for p in plans] == [True, False, True]
    assert set(plans[0].tables) == {"embedding.weight", "linear.weight"}


# --------------------------------------------------------------------------- the row sets
def test_unique_rows_per_task_and_row_map():
    rows = torch.tensor([[5, 2, 5, 9], [1, 1, 1, 1], [0, 9, 3, 3]])
    local, row_map = unique_rows(rows, 10)
    assert local.shape == (3, 3)
    assert local[0].tolist() == [2, 5, 9] and local[1, 0] == 1 and local[2].tolist() == [0, 3, 9]
    for t in range(3):
        used = torch.nonzero(row_map[t] >= 0).flatten()
        assert used.tolist() == sorted(set(rows[t].tolist()))
        assert torch.equal(local[t][row_map[t][used]], used)  # the map inverts the local rows
    assert (row_map[1] >= 0).sum() == 1  # filler slots of task 1 are never referenced


def test_task_touching_a_row_beyond_the_table_fails_clearly(tasks):
    sup, qry, sw, qw = tasks
    model = tiny("deepfm")
    bad = sup._replace(item=sup.item.clone())
    bad.item[1, 0, 0] = 10_000  # item id far beyond the vocabulary
    with pytest.raises(DataError, match="task 1 looks up row .* of 'embedding.weight'"):
        maml_outer_loss(model, live_params(model), bad, qry, names=list(live_params(model)), lr=0.1,
                        support_weight=sw, query_weight=qw)
    with pytest.raises(DataError, match="row -"):
        unique_rows(torch.tensor([[0, -1]]), 5)
    with pytest.raises(DataError, match="slots"):
        task_rows(model.embedding, [sup._replace(user=sup.user[..., :1])])


def test_lookup_outside_the_plan_fails_loudly(tasks):
    """A row the plan did not foresee maps to -1 and errors instead of reading a wrong row."""
    sup, qry, sw, qw = tasks
    model = tiny("basic")
    plan = plan_local_tables(model, ["embedding.weight"], [sup.select(slice(0, 1)), qry.select(slice(0, 1))])
    params, _ = fn.localise(plan, live_params(model), 0.1, ["embedding.weight"])
    row_map = plan.tables["embedding.weight"].row_map[0]
    first_user_row = int(model.embedding.user_offsets[0])
    unseen = [v for v in range(1, 9) if row_map[first_user_row + v] < 0]
    assert unseen  # task 0 touches few user ids
    other = sup.select(0)
    other = other._replace(user=torch.full_like(other.user, unseen[0]))
    with pytest.raises(IndexError):
        torch.func.functional_call(model, params, (other,))
