"""The compiled embedding kernel (``metactr.models.native``): the same sums as the PyTorch paths for
every model, gradients of any order, bad rows, no compiler, switched off, threads, transforms."""

from __future__ import annotations

import threading

import pytest
import torch
from test_models import SPECS, make_batch, make_model
from torch.func import grad, vmap

from metactr.models import native
from metactr.models.base import objective, registry
from metactr.models.interactions import flat_fields, lookup
from metactr.models.layers import FieldEmbedding

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled kernel here: {native.load_error}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel calls made during the test, by direction (``fwd`` / ``bwd``): proof of which path ran."""
    calls: list[str] = []
    real = native._call
    monkeypatch.setattr(native, "_call", lambda kind, *a: calls.append(kind) or real(kind, *a))
    return calls


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, out = objective(model, None, batch)
    loss.backward()
    return out.logit.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


PLAIN_MODELS = [n for n in registry() if n not in ("meta_embedding", "metaselector", "melu", "mamo", "rates_lr",
                                                      "popularity")]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_every_model_scores_and_learns_the_same_with_and_without_the_kernel(name, spec_name, kernel_calls):
    spec = SPECS[spec_name]
    batch = make_batch(spec, B=6)
    model = make_model(name, spec)
    model.eval()  # no dropout: both passes see the same function
    with native.enabled(True):
        logit_n, grads_n = _loss_and_grads(model, batch)
    assert "fwd" in kernel_calls and "bwd" in kernel_calls  # the kernel really ran, both ways
    n_calls = len(kernel_calls)
    with native.enabled(False):
        logit_t, grads_t = _loss_and_grads(model, batch)
    assert len(kernel_calls) == n_calls  # and the reference pass did not use it
    torch.testing.assert_close(logit_n, logit_t, rtol=1e-5, atol=1e-6)
    assert grads_n.keys() == grads_t.keys()
    for n in grads_t:
        torch.testing.assert_close(grads_n[n], grads_t[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_kernel_is_what_runs_when_usable(kernel_calls):
    model = make_model("deepfm", SPECS["multi"])
    objective(model, None, make_batch(SPECS["multi"]))[0].backward()
    assert kernel_calls == ["fwd", "bwd"]  # every field (user, context, item, session mean) in one call each way


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_order_gradients_match_the_torch_path(dtype, kernel_calls):
    spec = SPECS["multi"]
    batch = make_batch(spec, B=5)
    emb = FieldEmbedding(spec, 3).to(dtype)
    target = torch.randn(5, len(spec.user) + len(spec.context) + 2 * len(spec.item), 3, dtype=dtype)

    def gradient_and_hessian_term(on: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with native.enabled(on):
            per_position = emb(batch.hist, "item")  # forward: the per-position lookup
            loss = ((flat_fields(emb, batch, True) - target) ** 2).sum() ** 1.5 + per_position.square().sum()
            (g,) = torch.autograd.grad(loss, emb.weight, create_graph=True)
            (h,) = torch.autograd.grad((g * g).sum(), emb.weight)
        return g.detach(), h

    g_n, h_n = gradient_and_hessian_term(True)
    assert kernel_calls.count("fwd") >= 3 and "bwd" in kernel_calls  # second order: the scatter's adjoint ran
    g_t, h_t = gradient_and_hessian_term(False)
    torch.testing.assert_close(g_n, g_t, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h_n, h_t, rtol=1e-4, atol=1e-5)


def test_a_row_outside_the_table_is_an_index_error_naming_it():
    w = torch.randn(5, 3)
    with pytest.raises(IndexError, match="index 7 is out of range for an embedding table of 5 rows"):
        native.bag(w, torch.tensor([[1, 7]]), torch.ones(1, 2), torch.tensor([0, 1]), 2)
    with pytest.raises(IndexError, match="index -1"):
        native.bag(w, torch.tensor([[-1]]), torch.zeros(1, 1), torch.tensor([0]), 1)


def test_a_bad_field_map_or_mismatched_shapes_are_refused():
    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match="field map entry 4 at slot 1 is outside"):
        native.bag(w, torch.tensor([[1, 2]]), torch.ones(1, 2), torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="do not match"):
        native.bag(w, torch.tensor([[1, 2]]), torch.ones(1, 3), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="do not match"):
        native.bag(w, torch.tensor([[1, 2]]), torch.ones(1, 2), torch.tensor([0]), 2)


def test_padding_ids_and_empty_inputs():
    spec = SPECS["single"]
    emb = FieldEmbedding(spec, 4)
    zeros = torch.zeros(3, len(spec.user), dtype=torch.long)  # every slot padding
    assert torch.equal(emb(zeros, "user"), torch.zeros(3, len(spec.user), 4))
    empty = emb(torch.zeros(0, len(spec.user), dtype=torch.long), "user")
    assert empty.shape == (0, len(spec.user), 4)
    w = torch.randn(4, 2, requires_grad=True)
    out = native.bag(w, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.tensor([0, 0, 1]), 2)
    out.sum().backward()
    assert out.shape == (0, 2, 2) and torch.equal(w.grad, torch.zeros(4, 2))


def test_a_coefficient_that_needs_its_gradient_is_refused():
    with pytest.raises(ValueError, match="coef must not need its gradient"):
        native.bag(torch.randn(3, 2), torch.tensor([[0]]), torch.ones(1, 1, requires_grad=True), torch.tensor([0]), 1)


def test_not_used_under_vmap_or_grad_transforms():
    spec = SPECS["single"]
    emb = FieldEmbedding(spec, 4)
    ids = torch.randint(1, 4, (3, 2, len(spec.user)))
    seen = []

    def f(w, x):
        seen.append(native.usable(w))
        return torch.func.functional_call(emb, {"weight": w}, (x, "user")).sum()

    vmapped = vmap(f, in_dims=(None, 0))(emb.weight, ids)
    g = grad(f)(emb.weight, ids[0])
    assert seen == [False, False] and vmapped.shape == (3,) and g.shape == emb.weight.shape
    assert native.usable(emb.weight)  # outside the transforms it runs


def test_switched_off_by_environment_and_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("METACTR_NATIVE", "0")
    assert native.library() is None and native.load_error == "disabled by METACTR_NATIVE"
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("METACTR_NATIVE", "1")
    monkeypatch.setenv("METACTR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.library() is None and "native kernel unavailable" in native.load_error
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind
    spec = SPECS["multi"]
    model = make_model("deepfm", spec)
    loss, _ = objective(model, None, make_batch(spec))  # the PyTorch path
    loss.backward()
    assert torch.isfinite(loss)


def test_compiles_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("METACTR_CACHE", str(tmp_path))
    assert native.library() is not None
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].startswith("bag_") and files[0].endswith(".so")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", "false")  # a second process finds the compiled file: no compiler needed
    assert native.library() is not None


def test_threads_scoring_at_once_get_their_own_results():
    spec = SPECS["multi"]
    model = make_model("din", spec).eval()
    batches = [make_batch(spec, B=7, seed=s) for s in range(6)]
    with torch.no_grad():
        expected = [model(b).logit for b in batches]
    got: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        with torch.no_grad():
            got[k] = [model(batches[(k + j) % 6]).logit for j in range(30)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in got.items():
        for j, out in enumerate(outs):
            assert torch.equal(out, expected[(k + j) % 6])


def test_lookup_of_several_groups_is_one_table_gradient(kernel_calls):
    spec = SPECS["multi"]
    batch = make_batch(spec)
    emb = FieldEmbedding(spec, 5)
    parts = [(batch.user, "user"), (batch.context, "context"), (batch.item, "item")]
    with native.enabled(True):
        a = lookup(emb, parts)
        a.square().sum().backward()
    assert kernel_calls == ["fwd", "bwd"]
    g_a, emb.weight.grad = emb.weight.grad, None
    with native.enabled(False):
        b = lookup(emb, parts)
        b.square().sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(g_a, emb.weight.grad)


def test_predicting_first_then_training_works(kernel_calls):
    """The kernel's cached field maps are built outside inference mode, so a model scored first
    (``predict_proba`` runs under ``torch.inference_mode``) still trains afterwards."""
    spec = SPECS["multi"]
    model, batch = make_model("deepfm", spec), make_batch(spec)
    with torch.inference_mode():
        model(batch)
    loss, _ = objective(model, None, batch)
    loss.backward()
    assert kernel_calls == ["fwd", "fwd", "bwd"] and model.embedding.weight.grad is not None
