"""The CPU fast paths compute exactly what the plain code computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metactr.models.layers as layers
from metactr.data.prepared import Split
from metactr.models.layers import TargetAttention, gather_rows


@pytest.mark.parametrize("mode", ["weights", "softmax"])
def test_packed_attention_equals_dense(monkeypatch, mode):
    torch.manual_seed(0)
    att = TargetAttention(8, (6, 4), mode=mode).double()
    q = torch.randn(6, 8, dtype=torch.double, requires_grad=True)
    k = torch.randn(6, 7, 8, dtype=torch.double, requires_grad=True)
    mask = torch.rand(6, 7) < 0.4
    mask[0] = False  # an empty session
    mask[1] = True  # a full one

    def run():
        out, w = att(q, k, mask)
        return (out, w, *torch.autograd.grad((out ** 2).sum() + w.sum(), [q, k, *att.parameters()]))

    monkeypatch.setattr(layers, "_packable", lambda m: True)
    packed = run()
    monkeypatch.setattr(layers, "_packable", lambda m: False)
    dense = run()
    for a, b in zip(packed, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert packed[0][0].abs().sum() == 0  # the empty session attends to nothing


@pytest.mark.parametrize("mode", ["weights", "softmax"])
@pytest.mark.parametrize("n_valid", [0, 3, 7])
def test_shared_session_attention_equals_per_row(mode, n_valid):
    """One session scored against many candidates (stride-0 rows, as the service builds them)
    gives what the same session copied into every row gives, gradients included."""
    torch.manual_seed(1)
    att = TargetAttention(8, (6, 4), mode=mode).double()
    q = torch.randn(5, 8, dtype=torch.double, requires_grad=True)
    k1 = torch.randn(1, 7, 8, dtype=torch.double, requires_grad=True)
    m1 = torch.zeros(1, 7, dtype=torch.bool)
    m1[0, torch.randperm(7)[:n_valid]] = True
    keys, mask = k1.expand(5, -1, -1), m1.expand(5, -1)
    assert layers.shares_rows(keys, mask) and not layers.shares_rows(keys.contiguous(), mask)

    def run(keys, mask):
        out, w = att(q, keys, mask)
        return (out, w, *torch.autograd.grad((out ** 2).sum() + w.sum(), [q, k1, *att.parameters()]))

    for a, b in zip(run(keys, mask), run(keys.contiguous(), mask.contiguous()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not layers.shares_rows(torch.ones(1, 3))  # a single row is nothing to share


def test_shared_history_batch_scores_like_a_copied_one(tmp_path):
    """DIN and RML on a batch whose session is one stride-0 row: the same scores as on the copied
    batch (the service's /predict path)."""
    from metactr.data.prepared import PreparedDataset
    from metactr.data.toy import write_toy_rml_dataset
    from metactr.models import build_model

    write_toy_rml_dataset(tmp_path, n_users=8, n_items=20, rows_per_user=6)
    ds = PreparedDataset(tmp_path)
    b = ds.batch(ds.split("wc_train"), torch.arange(6))
    assert b.hist_mask[0].any()
    one = lambda t: t[:1].expand_as(t)  # noqa: E731
    shared = b._replace(hist=one(b.hist), hist_mask=one(b.hist_mask), hist_label=one(b.hist_label))
    copied = shared._replace(hist=shared.hist.contiguous(), hist_mask=shared.hist_mask.contiguous(),
                     hist_label=shared.hist_label.contiguous())
    for name in ("din", "rml"):
        torch.manual_seed(0)
        model = build_model(name, ds.spec).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(shared).logit, model(copied).logit, rtol=1e-5, atol=1e-6)


def test_packing_only_for_large_padded_masks_outside_vmap():
    sparse = torch.arange(10).expand(1024, 10) < torch.arange(1024).remainder(10).unsqueeze(1) + 1  # 55% valid
    assert layers._packable(sparse)
    assert not layers._packable(torch.ones(1024, 10, dtype=torch.bool))  # nothing to skip
    assert not layers._packable(sparse[:128])  # small batches: the gather costs more than it saves
    seen = []
    torch.func.vmap(lambda m: seen.append(layers._packable(m)) or m.float())(sparse.unsqueeze(0))
    assert seen == [False]


def test_gather_rows_matches_embedding_with_double_backward():
    torch.manual_seed(0)
    w = torch.randn(11, 3, dtype=torch.double, requires_grad=True)
    idx = torch.tensor([[0, 3, 3], [10, 1, 0]])
    torch.testing.assert_close(gather_rows(w, idx), F.embedding(idx, w))
    # second order: d/dw of ||d loss/dw||^2 agrees with F.embedding's
    def gg(fn):
        g, = torch.autograd.grad((fn(w, idx) ** 3).sum(), w, create_graph=True)
        return torch.autograd.grad((g ** 2).sum(), w)[0]
    torch.testing.assert_close(gg(gather_rows), gg(lambda w, i: F.embedding(i, w)))


def test_packed_split_subset_equals_column_subset():
    g = torch.Generator().manual_seed(0)
    n, L = 9, 4
    cols = dict(user_id=torch.randint(1, 5, (n,), generator=g), hist_ids=torch.randint(0, 7, (n, L), generator=g),
                hist_len=torch.randint(0, L + 1, (n,), generator=g), hist_labels=torch.rand(n, L, generator=g),
                target=torch.randint(1, 7, (n,), generator=g), label=torch.randint(0, 2, (n,), generator=g).float(),
                context=torch.randint(0, 3, (n, 2), generator=g))
    plain = Split("s", **cols)
    packed = Split.packed("s", **cols)
    for idx in (torch.tensor([3, 0, 8, 3]), slice(2, 6)):
        a, b = plain.subset(idx), packed.subset(idx)
        for name in cols:
            torch.testing.assert_close(getattr(b, name), getattr(a, name))


def test_arrow_helpers_equal_pyarrow():
    """data.sessions.arrow / numpy_of (no pandas import) give exactly pyarrow's arrays."""
    import numpy as np
    import pyarrow as pa

    from metactr.data.sessions import arrow, numpy_of

    rng = np.random.default_rng(0)
    for a in (rng.integers(-5, 5, 37).astype(np.int8), rng.integers(0, 9, 37).astype(np.int32),
              rng.integers(0, 2**40, 37), rng.random(37), rng.random(37) < 0.3, np.zeros(0, np.int32),
              rng.integers(0, 9, 40).astype(np.int32)[::3]):
        got = arrow(a)
        assert got.type == pa.array(a).type and got.equals(pa.array(a))
    lists = pa.ListArray.from_arrays(arrow(np.array([0, 2, 2, 5], np.int32)), arrow(np.arange(5, dtype=np.int32)))
    sub = lists.filter(arrow(np.array([False, True, True])))
    np.testing.assert_array_equal(numpy_of(sub.flatten()), [2, 3, 4])
    np.testing.assert_array_equal(numpy_of(pa.array([1, None, 3])), pa.array([1, None, 3]).to_numpy(zero_copy_only=False))
