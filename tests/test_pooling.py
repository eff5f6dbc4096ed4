"""Weighted-bag pooling (``metactr.models.pooling``) equals the masked einsum pooling it replaced:
forward, gradient, padding, empty rows, under vmap and through double backward."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from metactr.data.batch import FeatureSpec, Field
from metactr.models import pooling
from metactr.models.layers import FieldEmbedding

SPEC = FeatureSpec(user=(Field("user_id", 6),), item=(Field("item_id", 9), Field("genre", 5, 3), Field("tag", 4, 2)),
                   context=(), max_hist_len=4)


def reference_fields(emb: FieldEmbedding, weight: torch.Tensor, ids: torch.Tensor, group: str) -> torch.Tensor:
    """The former ``FieldEmbedding.forward``: mask, einsum with the pool matrix, divide by count."""
    mask = (ids > 0).to(weight.dtype)
    rows = ids + getattr(emb, f"{group}_offsets")
    raw = weight.index_select(-2, rows.reshape(-1)).unflatten(-2, rows.shape) * mask.unsqueeze(-1)
    pool = getattr(emb, f"{group}_pool")
    return torch.einsum("...sd,sf->...fd", raw, pool) / (mask @ pool).clamp_min(1.0).unsqueeze(-1)


def reference_bag(emb, weight, ids, group, w):
    return (reference_fields(emb, weight, ids, group) * w[..., None, None]).sum(-3)


def session(n: int = 5, L: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Item-group ids [n, L, 6] with padded slots, padded positions, one all-padding row, and
    the position weights of a masked mean."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(1, 9, (n, L, 1), generator=g), torch.randint(0, 5, (n, L, 3), generator=g),
                     torch.randint(0, 4, (n, L, 2), generator=g)], dim=-1)
    ids[0, 1, 1:4] = 0  # a genre field with no valid slot
    mask = torch.rand(n, L, generator=g) > 0.3
    mask[-1] = False  # an empty session
    ids = ids * mask[..., None]
    m = mask.float()
    return ids, m / m.sum(-1, keepdim=True).clamp_min(1.0)


@pytest.fixture(params=["gather", "table"])
def strategy(request, monkeypatch):
    monkeypatch.setattr(pooling, "TABLE_RATIO", 0 if request.param == "gather" else 10**9)
    return request.param


@pytest.mark.parametrize("dim", [3, 40])  # einsum path and batched-matmul path of forward
def test_forward_and_bag_equal_the_einsum_pooling_with_gradients(dim, strategy):
    torch.manual_seed(0)
    emb = FieldEmbedding(SPEC, dim, init_std=1.0)
    ids, w = session()
    for got_fn, ref_fn in ((lambda W: emb(ids, "item"), lambda W: reference_fields(emb, W, ids, "item")),
                           (lambda W: emb.bag(ids, "item", w), lambda W: reference_bag(emb, W, ids, "item", w))):
        got, ref = got_fn(emb.weight), ref_fn(emb.weight)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        probe = torch.randn_like(ref)
        g_got, = torch.autograd.grad((got * probe).sum(), emb.weight)
        g_ref, = torch.autograd.grad((ref * probe).sum(), emb.weight)
        torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5)
    bag = emb.bag(ids, "item", w)
    assert bag.shape == (5, 3, dim)
    assert torch.equal(bag[-1], torch.zeros(3, dim))  # empty session: zeros, not NaN
    # a field without valid slots contributes nothing; a row's fields are its valid slots' means
    torch.testing.assert_close(emb(ids, "item")[0, 1, 1], torch.zeros(dim))


def test_bag_under_vmap_with_per_task_tables_and_double_backward(strategy):
    """Meta-learning needs per-task (adapted) tables under vmap and second-order gradients."""
    torch.manual_seed(1)
    emb = FieldEmbedding(SPEC, 4, init_std=1.0)
    tables = (emb.weight.detach().unsqueeze(0) + 0.1 * torch.randn(3, *emb.weight.shape)).requires_grad_(True)
    ids = torch.stack([session(seed=s)[0] for s in range(3)])
    w = torch.stack([session(seed=s)[1] for s in range(3)])

    def second_order(fn):
        def task(W, i, wt):  # one inner SGD step on a per-task table, then a loss at the adapted table
            g = torch.func.grad(lambda x: (fn(x, i, wt) ** 2).sum())(W)
            return fn(W - 0.1 * g, i, wt).sin().sum()
        out = vmap(task)(tables, ids, w).sum()
        return out, torch.autograd.grad(out, tables)[0]

    call = _BagCall(emb)
    new = second_order(lambda W, i, wt: torch.func.functional_call(call, {"emb.weight": W}, (i, wt)))
    ref = second_order(lambda W, i, wt: reference_bag(emb, W, i, "item", wt))
    torch.testing.assert_close(new[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[1], ref[1], atol=1e-5, rtol=1e-5)
    assert new[1].abs().sum() > 0


class _BagCall(torch.nn.Module):
    """``FieldEmbedding.bag`` as a module's forward, so that ``functional_call`` swaps the table."""

    def __init__(self, emb: FieldEmbedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.emb.bag(ids, "item", w)


def test_task_local_table_through_row_map_equals_the_full_table(strategy):
    torch.manual_seed(2)
    emb = FieldEmbedding(SPEC, 5, init_std=1.0)
    ids, w = session()
    full = emb.bag(ids, "item", w)
    used = torch.unique(ids + emb.item_offsets)
    row_map = torch.full((emb.weight.shape[0],), -1, dtype=torch.long)
    row_map[used] = torch.arange(len(used))
    local = torch.func.functional_call(_BagCall(emb), {"emb.weight": emb.weight[used], "emb.row_map": row_map},
                                       (ids, w))
    torch.testing.assert_close(local, full, atol=1e-6, rtol=1e-5)


def test_strategy_choice_and_edge_cases():
    assert pooling.use_table(300, 3, 80) and not pooling.use_table(13522, 3, 80)
    emb = FieldEmbedding(SPEC, 2)
    ids, w = session()
    assert emb.bag(ids, "context", w).shape == (5, 0, 2)  # a group the spec does not have
    assert emb.bag(ids[:, :0], "item", w[:, :0]).abs().sum() == 0  # no positions at all
    with pytest.raises(RuntimeError):
        emb.bag(ids, "item", w[:, :2])  # weights for fewer positions than the session has
