"""The RML model (metactr.models.rml) and its two-phase strategy (metactr.strategies.two_phase)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, vmap

from metactr.data.batch import Batch, FeatureSpec, Field
from metactr.engine.functional import live_params
from metactr.strategies.base import Context
from metactr.strategies.config import TwoPhaseConfig
from metactr.strategies.two_phase import TwoPhase, split_point
from metactr.models.base import build_model, objective

SPEC = FeatureSpec(user=(Field("user_id", 20), Field("age", 5)),
                   item=(Field("item_id", 30), Field("genre", 6, max_len=2)), max_hist_len=5)


def make_batch(B: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    L = SPEC.max_hist_len
    lens = torch.tensor([1, 2, 3, 5, 4, 2][:B] + [3] * max(0, B - 6))
    mask = torch.arange(L) < lens.unsqueeze(-1)
    hist = torch.stack([torch.randint(1, 30, (B, L), generator=g), torch.randint(1, 6, (B, L), generator=g),
                        torch.randint(0, 6, (B, L), generator=g)], -1) * mask.unsqueeze(-1)
    return Batch(user=torch.stack([torch.randint(1, 20, (B,), generator=g), torch.randint(1, 5, (B,), generator=g)], -1),
                 item=torch.stack([torch.randint(1, 30, (B,), generator=g), torch.randint(1, 6, (B,), generator=g),
                                   torch.randint(0, 6, (B,), generator=g)], -1),
                 context=torch.zeros((B, 0), dtype=torch.long), hist=hist, hist_mask=mask,
                 hist_label=torch.randint(0, 2, (B, L), generator=g).float() * mask,
                 label=torch.randint(0, 2, (B,), generator=g).float(), user_id=torch.arange(B))


def rml(name: str = "rml", **kw):
    torch.manual_seed(0)
    kw = {"embed_dim": 4, "att_hidden": (8,), "lstm_hidden": 6, "mlp_hidden": (8,), "aux_hidden": (5,),
          "emb_init_std": 0.3, **kw}
    return build_model(name, SPEC, **kw).eval()


def test_parameter_groups_follow_the_paper():
    m = rml()
    groups = m.param_groups()
    assert set(groups) == {"emb", "meta", "mlp"}
    assert groups["emb"] == ["embedding.weight"]
    assert any(n.startswith("attention.") for n in groups["meta"])
    assert any(n.startswith("lstm.") for n in groups["meta"])
    assert any(n.startswith("aux_net.") for n in groups["meta"])
    assert "item_bias" in groups["mlp"] and all(n.startswith(("mlp.", "item_bias")) for n in groups["mlp"])
    # L2 only on weight matrices of the attention net and the MLP (the authors' kernels)
    l2 = m.l2_names()
    assert l2 and all(n.endswith("weight") and n.startswith(("attention.", "att_fc.", "mlp.")) for n in l2)
    assert not any(n.startswith(("lstm.", "aux_net.", "embedding")) for n in l2)


def test_padded_session_positions_never_change_output_or_aux():
    m = rml()
    b = make_batch()
    out = m(b)
    # scribble on every padded position: ids, labels
    pad = ~b.hist_mask
    junk_hist = torch.where(pad.unsqueeze(-1), torch.full_like(b.hist, 3), b.hist)
    junk_lab = torch.where(pad, torch.ones_like(b.hist_label), b.hist_label)
    out2 = m(b._replace(hist=junk_hist, hist_label=junk_lab))
    torch.testing.assert_close(out.logit, out2.logit, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.aux, out2.aux, atol=1e-6, rtol=0)
    assert out.aux.shape == (b.size,) and (out.aux[0] == 0)  # one item: no (h_{t-1}, e_t) pair
    assert (out.aux[1:] > 0).all()


def test_aux_loss_depends_on_session_labels_and_weights_the_total():
    m = rml()
    b = make_batch()
    a1 = m(b).aux
    a2 = m(b._replace(hist_label=(1 - b.hist_label) * b.hist_mask)).aux
    assert not torch.allclose(a1[1:], a2[1:])
    full, _ = objective(m, None, b)
    m.aux_weight = 0.0
    no_aux, _ = objective(m, None, b)
    assert full.item() == pytest.approx(no_aux.item() + 0.3 * a1.mean().item(), rel=1e-5)


def test_ablations_drop_their_branch():
    b = make_batch()
    no_att, no_lstm = rml("rml_no_att"), rml("rml_no_lstm")
    assert not any(n.startswith("attention") for n, _ in no_att.named_parameters())
    assert not any(n.startswith(("lstm", "aux_net")) for n, _ in no_lstm.named_parameters())
    assert (no_lstm(b).aux == 0).all()
    assert no_att(b).logit.shape == (6,)
    with pytest.raises(Exception, match="at least one"):
        build_model("rml", SPEC, use_attention=False, use_lstm=False)


def test_rml_is_vmappable_over_tasks():
    m = rml()
    b = make_batch(6)
    tasks = Batch(*(t.reshape(2, 3, *t.shape[1:]) for t in b))
    params = live_params(m)
    out = vmap(lambda x: functional_call(m, params, (x,)).logit)(tasks)
    torch.testing.assert_close(out.reshape(-1), m(b).logit, atol=1e-5, rtol=0)


def two_phase(m, B: int = 6):
    """The two-phase strategy set up on model ``m`` (a run of one epoch of B-row batches) and its phase."""
    strat = TwoPhase(TwoPhaseConfig(lr=0.05, local_lr=0.05))
    phase = strat.setup(Context(m, None, list(range(B)), torch.Generator(), 1.0, B))[0]
    return strat, phase


def test_two_phase_local_step_leaves_emb_and_mlp_bit_identical():
    m = rml().train()
    strat, phase = two_phase(m)
    named = live_params(m)
    meta = set(m.params_in("meta"))

    class NoGlobal(torch.optim.Optimizer):  # records the state between the two phases
        def __init__(self, params):
            super().__init__(params, {})
            self.snap = None

        def step(self, closure=None):
            self.snap = {n: p.detach().clone() for n, p in named.items()}

    before = {n: p.detach().clone() for n, p in named.items()}
    strat.global_opt = glob = NoGlobal(list(named.values()))
    phase.step(make_batch(6))
    after_local = glob.snap
    for n in before:
        if n in meta:
            continue
        assert torch.equal(before[n], after_local[n]), n
    assert any(not torch.equal(before[n], after_local[n]) for n in meta)


def test_two_phase_global_step_updates_everything():
    m = rml().train()
    _, phase = two_phase(m)
    named = live_params(m)
    before = {n: p.detach().clone() for n, p in named.items()}
    phase.step(make_batch(6))
    assert not torch.equal(before["embedding.weight"], named["embedding.weight"])
    assert not torch.equal(before["mlp.net.0.weight"], named["mlp.net.0.weight"])


def test_split_point_is_a_third():
    assert split_point(128, 1 / 3) == 42
    assert split_point(6, 1 / 3) == 2
    assert split_point(2, 1 / 3) == 1
    assert split_point(1, 1 / 3) == 1
