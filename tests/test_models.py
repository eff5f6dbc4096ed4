"""The model zoo: every model's forward/backward, padding invariance, vmap over tasks, parameter
groups, double backward, and the FM / FFM / attention maths against explicit formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.errors import ConfigError
from metactr.models.base import build_model, objective, registry
from metactr.models.interactions import (flat_fields, fm_pairwise, history_fields, lookup,
                                         sequence_inputs)
from metactr.models.layers import FieldEmbedding, TargetAttention
from metactr.models.rnn import AUGRU, GRU, LSTM

MODELS = ["basic", "lr", "fm", "ffm", "deepfm", "wide_deep", "din", "dien", "gru4rec", "lstm4rec", "mimn"]
RNN_MODELS = ["dien", "gru4rec", "lstm4rec", "mimn"]
GROUPS = {"emb", "interaction", "mlp"}

# multi-valued item and user fields + a context field (the general FieldEmbedding path)
MULTI = FeatureSpec(user=(Field("uid", 6), Field("tags", 5, 2)),
                    item=(Field("iid", 9), Field("genres", 5, 3)),
                    context=(Field("weekday", 4),), max_hist_len=4)
# single-valued fields only, no context (the fast lookup path)
SINGLE = FeatureSpec(user=(Field("uid", 6), Field("age", 4)), item=(Field("iid", 9), Field("cat", 4)), max_hist_len=4)
SPECS = {"multi": MULTI, "single": SINGLE}


def _ids(fields: tuple[Field, ...], shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    cols = []
    for f in fields:
        v = torch.randint(1, f.vocab_size, (*shape, f.max_len), generator=g)
        if f.max_len > 1:  # drop some values of multi-valued fields, keep the first
            keep = torch.rand(v.shape, generator=g) < 0.6
            keep[..., 0] = True
            v = v * keep
        cols.append(v)
    return torch.cat(cols, dim=-1) if cols else torch.zeros(*shape, 0, dtype=torch.long)


def make_batch(spec: FeatureSpec, B: int = 5, L: int = 4, seed: int = 0, lens: list[int] | None = None) -> Batch:
    """Random batch with left-aligned sessions of lengths ``lens`` (0 = empty session allowed)."""
    g = torch.Generator().manual_seed(seed)
    if lens is None:
        lens = torch.randint(0, L + 1, (B,), generator=g).tolist()
        lens[0] = L  # at least one full and one empty session
        lens[-1] = 0
    mask = torch.arange(L) < torch.tensor(lens)[:, None]
    hist = _ids(spec.item, (B, L), g) * mask[..., None]
    hist_label = (torch.rand(B, L, generator=g) < 0.5).float() * mask
    return Batch(user=_ids(spec.user, (B,), g), item=_ids(spec.item, (B,), g), context=_ids(spec.context, (B,), g),
                 hist=hist, hist_mask=mask, hist_label=hist_label,
                 label=(torch.rand(B, generator=g) < 0.5).float(), user_id=torch.arange(B))


def make_model(name: str, spec: FeatureSpec, seed: int = 0, **kw):
    torch.manual_seed(seed)
    small = {"embed_dim": 4} if name != "lr" else {}
    if name in ("basic", "deepfm", "wide_deep", "din", "dien", "gru4rec", "lstm4rec", "mimn"):
        small["hidden"] = (8, 4)
    small.update(kw)
    model = build_model(name, spec, **small)
    # larger embeddings than the 1e-4 default, so that every term visibly moves the output
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("weight") and ("embedding" in n or "linear" in n) and p.dim() == 2 and p.shape[0] > 8:
                p.normal_(0, 0.5)
    return model


def test_every_model_is_registered():
    assert set(MODELS) <= set(registry())


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_parameter_learns(name, spec_name):
    spec = SPECS[spec_name]
    model = make_model(name, spec, aux_weight=1.0)
    batch = make_batch(spec)
    loss, out = objective(model, None, batch)
    assert out.logit.shape == (5,) and out.aux.shape == (5,)
    assert torch.isfinite(out.logit).all() and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{name}: {n} has an all-zero gradient"


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_the_output(name, spec_name):
    spec = SPECS[spec_name]
    model = make_model(name, spec).eval()
    batch = make_batch(spec, lens=[4, 2, 1, 0, 3])
    ref = model(batch)
    # garbage ids and labels at masked positions, then 3 more padded positions
    g = torch.Generator().manual_seed(5)
    junk = _ids(spec.item, batch.hist.shape[:2], g)
    pad = ~batch.hist_mask
    hist = torch.where(pad[..., None], junk, batch.hist)
    hist_label = torch.where(pad, 1.0, batch.hist_label)
    hist = torch.cat([hist, _ids(spec.item, (5, 3), g)], dim=1)
    mask = torch.cat([batch.hist_mask, torch.zeros(5, 3, dtype=torch.bool)], dim=1)
    hist_label = torch.cat([hist_label, torch.ones(5, 3)], dim=1)
    longer = batch._replace(hist=hist, hist_mask=mask, hist_label=hist_label)
    out = model(longer)
    torch.testing.assert_close(out.logit, ref.logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux, ref.aux, atol=1e-5, rtol=1e-5)
    # ...while a real session item does change the output (the test is not vacuous)
    if True:
        changed = batch._replace(hist=torch.where(batch.hist_mask[..., None], (batch.hist % 3) + 1, batch.hist))
        assert not torch.allclose(model(changed).logit[:3], ref.logit[:3])


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("name", MODELS)
def test_vmap_over_tasks_equals_a_loop(name, spec_name):
    spec = SPECS[spec_name]
    model = make_model(name, spec, aux_weight=0.5)
    base = {k: v.detach() for k, v in model.named_parameters()}
    # per-task parameters (as after an inner MAML step) and per-task batches: [T=2, B=3, ...]
    params = {k: torch.stack([v, v + 0.01 * torch.randn_like(v)]) for k, v in base.items()}
    tasks = [make_batch(spec, B=3, seed=s, lens=[4, 1, 0]) for s in (1, 2)]
    stacked = Batch(*(torch.stack(ts) for ts in zip(*tasks)))

    def logit(p, b):
        return functional_call(model, p, (b,)).logit

    def loss(p, b):
        return objective(model, p, b)[0]

    batched = vmap(logit)(params, stacked)
    grads = vmap(grad(loss))(params, stacked)
    for t in range(2):
        p_t = {k: v[t] for k, v in params.items()}
        torch.testing.assert_close(batched[t], logit(p_t, tasks[t]), atol=1e-5, rtol=1e-5)
        g_t = grad(loss)(p_t, tasks[t])
        for k in g_t:
            torch.testing.assert_close(grads[k][t], g_t[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_param_groups_cover_every_parameter(name):
    model = make_model(name, MULTI)
    groups = model.param_groups()
    assert set(groups) <= GROUPS and "emb" in groups
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith(("embedding", "linear")) for n in groups["emb"])
    assert model.l2_names() and set(model.l2_names()) <= set(names)
    if name in RNN_MODELS + ["din"]:
        assert groups["interaction"]


@pytest.mark.parametrize("name", RNN_MODELS)
def test_double_backward_through_rnn_models(name):
    model = make_model(name, MULTI, aux_weight=1.0)
    batch = make_batch(MULTI)
    params = dict(model.named_parameters())
    loss, _ = objective(model, params, batch)
    g1 = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    second = sum((g ** 2).sum() for g in g1)
    g2 = torch.autograd.grad(second, list(params.values()), allow_unused=True)
    rnn_grads = [g for n, g in zip(params, g2) if n.startswith(("rnn", "extractor", "evolution", "controller", "miu."))]
    assert rnn_grads and all(g is not None and torch.isfinite(g).all() for g in rnn_grads)
    assert any(g.abs().sum() > 0 for g in rnn_grads)


@pytest.mark.parametrize("cell", ["gru", "lstm", "augru"])
def test_rnn_cells_gradcheck_and_gradgradcheck(cell):
    torch.manual_seed(0)
    layer = {"gru": GRU(3, 2), "lstm": LSTM(3, 2), "augru": AUGRU(3, 2)}[cell].double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    att = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, att, *ps):
        out = functional_call(layer, dict(zip(dict(layer.named_parameters()), ps)),
                              (x, mask, att) if cell == "augru" else (x, mask))
        return out[0], out[1]

    inputs = (x, att, *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_fm_pairwise_equals_the_double_sum():
    v = torch.randn(3, 5, 4)
    explicit = sum((v[:, i] * v[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(fm_pairwise(v), explicit)


def test_fm_model_equals_its_formula():
    model = make_model("fm", MULTI)
    batch = make_batch(MULTI)
    v = flat_fields(model.embedding, batch, True)
    w = flat_fields(model.linear, batch, True)
    n = v.shape[1]
    expected = model.bias + w.sum((1, 2)) + sum((v[:, i] * v[:, j]).sum(-1) for i in range(n) for j in range(i + 1, n))
    torch.testing.assert_close(model(batch).logit, expected)


def test_deepfm_is_fm_plus_dnn_on_shared_embeddings():
    model = make_model("deepfm", MULTI)
    batch = make_batch(MULTI)
    vw = flat_fields(model.embedding, batch, True)
    v, w = vw[..., :4], vw[..., 4]
    n = v.shape[1]
    fm = model.bias + w.sum(1) + sum((v[:, i] * v[:, j]).sum(-1) for i in range(n) for j in range(i + 1, n))
    torch.testing.assert_close(model(batch).logit, fm + model.mlp(v.reshape(5, -1)).squeeze(-1))


def test_ffm_equals_an_explicit_pairwise_loop():
    model = make_model("ffm", MULTI, embed_dim=3)
    batch = make_batch(MULTI)
    # field order: user (2), context (1), item (2), history (2)
    n, k = model.n_fields, model.k
    assert n == 7
    emb = model.embedding
    vecs = [emb(batch.user, "user"), emb(batch.context, "context"), emb(batch.item, "item")]
    h = emb(batch.hist, "item")
    m = batch.hist_mask.float()
    vecs.append((h * m[..., None, None]).sum(1) / m.sum(1).clamp_min(1)[:, None, None])
    v = torch.cat(vecs, dim=1)  # [B, F, F*k]
    pair = torch.zeros(batch.label.shape)
    for i in range(n):
        for j in range(i + 1, n):
            pair = pair + (v[:, i, j * k:(j + 1) * k] * v[:, j, i * k:(i + 1) * k]).sum(-1)
    linear = flat_fields(model.linear, batch, True).sum((1, 2))
    torch.testing.assert_close(model(batch).logit, model.bias + linear + pair)
    no_linear = make_model("ffm", MULTI, embed_dim=3, linear_term=False)
    assert not hasattr(no_linear, "linear")


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_fast_lookups_equal_field_embedding(spec_name):
    spec = SPECS[spec_name]
    emb = FieldEmbedding(spec, 3, init_std=1.0)
    b = make_batch(spec)
    for g, ids in (("user", b.user), ("item", b.item), ("item", b.hist)):
        # the single-valued fast path must equal the general slot-pooling computation
        mask = (ids > 0).float()
        raw = torch.nn.functional.embedding(ids + getattr(emb, f"{g}_offsets"), emb.weight) * mask[..., None]
        pool = getattr(emb, f"{g}_pool")
        ref = torch.einsum("...sd,sf->...fd", raw, pool) / (mask @ pool).clamp_min(1.0)[..., None]
        torch.testing.assert_close(emb(ids, g), ref)
    ref = torch.cat([emb(b.user, "user"), emb(b.context, "context"), emb(b.item, "item")], dim=1)
    torch.testing.assert_close(lookup(emb, [(b.user, "user"), (b.context, "context"), (b.item, "item")]), ref)
    m = b.hist_mask.float()[..., None, None]
    hist_mean = (emb(b.hist, "item") * m).sum(1) / m.sum(1).clamp_min(1)
    torch.testing.assert_close(history_fields(emb, b), hist_mean)
    torch.testing.assert_close(history_fields(emb, b)[-1], torch.zeros(len(spec.item), 3))  # empty session
    other, target, hist = sequence_inputs(emb, b)
    torch.testing.assert_close(target, emb(b.item, "item").flatten(-2))
    torch.testing.assert_close(hist, emb(b.hist, "item").flatten(-2))
    torch.testing.assert_close(other, torch.cat([emb(b.user, "user"), emb(b.context, "context")], 1).flatten(-2))


@pytest.mark.parametrize("mode", ["softmax", "weights"])
def test_split_attention_equals_target_attention(mode):
    torch.manual_seed(0)
    att = TargetAttention(6, (5, 3), mode=mode)
    q, k = torch.randn(4, 6), torch.randn(4, 7, 6)
    mask = torch.rand(4, 7) < 0.6
    mask[0] = False
    out, w = att(q, k, mask)
    scores = att.reference(q, k, mask)  # MLP on the concatenated [q, k, q-k, q*k]
    if mode == "softmax":
        ref_w = torch.softmax((scores * att.scale).masked_fill(~mask, -1e9), -1) * mask
    else:
        ref_w = scores * mask
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch.einsum("bl,bld->bd", ref_w, k), atol=1e-6, rtol=1e-5)


def test_target_attention_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    att = TargetAttention(6, (5, 3), activation="dice", mode="weights")
    q, k = torch.randn(4, 6), torch.randn(4, 7, 6)
    mask = torch.rand(4, 7) < 0.6
    out, w = att(q, k, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, w16 = att(q, k, mask)
        assert torch.is_autocast_enabled("cpu")  # re-enabled after the attention
        mixed = att.mlp.net[0](torch.randn(2, 24))
    assert out16.dtype == w16.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(out16, out, atol=0, rtol=0)
    torch.testing.assert_close(w16, w, atol=0, rtol=0)


def test_dien_aux_loss_uses_real_session_labels_and_masks_padding():
    model = make_model("dien", MULTI)
    assert model.aux_weight == 1.0  # the paper's default weight
    batch = make_batch(MULTI, lens=[4, 2, 1, 0, 3])
    aux = model(batch).aux
    assert (aux[[0, 1, 4]] > 0).all() and (aux[[2, 3]] == 0).all()  # <2 valid items: no pair to supervise
    flipped = batch._replace(hist_label=torch.where(batch.hist_mask, 1 - batch.hist_label, 0.0))
    aux2 = model(flipped).aux
    assert not torch.allclose(aux[[0, 1, 4]], aux2[[0, 1, 4]])
    # equals the explicit per-pair loss
    other, target, hist = sequence_inputs(model.embedding, batch)
    states, _ = model.extractor(hist, batch.hist_mask)
    for b, n in ((0, 4), (1, 2), (4, 3)):
        losses = [F.binary_cross_entropy_with_logits(
            model.aux_net(torch.cat([states[b, t - 1], hist[b, t]])).squeeze(-1), batch.hist_label[b, t])
            for t in range(1, n)]
        torch.testing.assert_close(aux[b], torch.stack(losses).mean())


def test_models_accept_list_hyperparameters_and_reject_bad_ones():
    assert build_model("deepfm", SINGLE, hidden=[8, 4]).mlp.out_dim == 1
    with pytest.raises(ConfigError, match="hidden"):
        build_model("deepfm", SINGLE, hidden=(8, 0))
    with pytest.raises(ConfigError, match="attention_mode"):
        build_model("din", SINGLE, attention_mode="max")
    with pytest.raises(ConfigError, match="embed_dim"):
        build_model("fm", SINGLE, embed_dim=0)
    with pytest.raises(ConfigError, match="miu_topk"):
        build_model("mimn", SINGLE, miu_topk=5)
    with pytest.raises(ConfigError, match="dropout"):
        build_model("gru4rec", SINGLE, dropout=1.5)
    with pytest.raises(ConfigError, match="no_such"):
        build_model("dien", SINGLE, no_such=1)


def test_every_model_runs_on_the_real_ml1m_spec(real_data):
    from metactr.data.prepared import PreparedDataset

    ds = PreparedDataset(real_data("ml-1m-rml"))
    split = ds.split("wc_train")
    batch = ds.batch(split, torch.arange(8))
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, ds.spec).eval()
        out = model(batch)
        assert out.logit.shape == (8,) and torch.isfinite(out.logit).all() and torch.isfinite(out.aux).all(), name
