"""Label-aware session input (issue 15's controls): each session item joined with its known label."""

from __future__ import annotations

import pytest
import torch

from metactr.models.base import objective
from tests.test_models import SINGLE, make_batch, make_model

AWARE = ["din", "gru4rec", "lstm4rec", "rml"]


@pytest.mark.parametrize("name", AWARE)
def test_labels_reach_the_score_and_padding_does_not(name):
    model = make_model(name, SINGLE, label_aware=True).eval()
    with torch.no_grad():
        model.label_embedding.weight.normal_(0, 0.5)
    batch = make_batch(SINGLE, lens=[4, 2, 1, 0, 3])
    ref = model(batch).logit
    flipped = batch._replace(hist_label=(1 - batch.hist_label) * batch.hist_mask)
    moved = (model(flipped).logit - ref).abs()
    assert (moved[:3] > 1e-6).all() and moved[3] == 0  # the empty session has no label to flip
    junk = batch._replace(hist_label=torch.where(batch.hist_mask, batch.hist_label, 1.0))
    torch.testing.assert_close(model(junk).logit, ref)  # labels at padded positions are ignored
    blind = make_model(name, SINGLE).eval()
    torch.testing.assert_close(blind(flipped).logit, blind(batch).logit)  # the default stays label-blind


@pytest.mark.parametrize("name", AWARE)
def test_label_vectors_learn_and_sit_in_the_embedding_group(name):
    model = make_model(name, SINGLE, label_aware=True)
    assert "label_embedding.weight" in model.param_groups()["emb"]
    loss, _ = objective(model, None, make_batch(SINGLE))
    loss.backward()
    assert model.label_embedding.weight.grad.abs().sum() > 0


def test_rml_auxiliary_loss_never_sees_the_label_it_predicts():
    """The auxiliary net predicts session item t's label from h_{t-1} and item t: with label-aware
    input, the label of the last item must not enter its own prediction."""
    model = make_model("rml", SINGLE, label_aware=True, dropout=0.0).eval()
    with torch.no_grad():
        model.label_embedding.weight.normal_(0, 0.5)
    batch = make_batch(SINGLE, lens=[4, 4, 4, 4, 4])
    seen = {}
    model.aux_net.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach().clone()))
    model(batch)
    x0 = seen["x"]
    last = batch.hist_label.clone()
    last[:, -1] = 1 - last[:, -1]
    model(batch._replace(hist_label=last))
    torch.testing.assert_close(seen["x"], x0)
