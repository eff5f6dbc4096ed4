"""FTRL-Proximal against its closed form (McMahan et al. 2013, Alg. 1), and the optimizer factory."""

from __future__ import annotations

import math

import pytest
import torch

from metactr.errors import ConfigError
from metactr.train.config import OptimConfig
from metactr.engine.optim import FTRL, build_optimizer


def _step(opt: FTRL, p: torch.Tensor, grad: list[float]) -> None:
    p.grad = torch.tensor(grad, dtype=p.dtype)
    opt.step()


def test_ftrl_first_step_matches_hand_computation():
    # alpha=0.5, beta=1, l1=0.1, l2=0.2, w0=0, g=[0.5, -0.05]:
    # coord 0: sigma = sqrt(.25)/.5 = 1, z = .5, n = .25, w = -(.5-.1)/((1+.5)/.5+.2) = -.4/3.2 = -0.125
    # coord 1: z = -0.05, |z| <= l1 -> w = 0
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = FTRL([p], lr=0.5, beta=1.0, l1=0.1, l2=0.2)
    _step(opt, p, [0.5, -0.05])
    torch.testing.assert_close(p.detach(), torch.tensor([-0.125, 0.0], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["z"], torch.tensor([0.5, -0.05], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["n"], torch.tensor([0.25, 0.0025], dtype=torch.float64))


def _closed_form(grads: list[float], alpha: float, beta: float, l1: float, l2: float) -> list[float]:
    """Scalar per-coordinate reference, written from the paper's pseudo-code with plain floats."""
    z = n = w = 0.0
    out = []
    for g in grads:
        sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / alpha
        z += g - sigma * w
        n += g * g
        w = 0.0 if abs(z) <= l1 else -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)
        out.append(w)
    return out


@pytest.mark.parametrize("l1,l2", [(0.0, 0.0), (0.1, 0.2), (1.0, 0.0)])
def test_ftrl_several_steps_match_closed_form(l1, l2):
    grads = [[0.5, -0.05, 2.0], [-0.3, 0.4, 0.0], [0.1, 0.9, -1.5], [0.0, -0.2, 0.7]]
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FTRL([p], lr=0.5, beta=1.0, l1=l1, l2=l2)
    seen = []
    for g in grads:
        _step(opt, p, g)
        seen.append(p.detach().clone())
    for i in range(3):
        expected = _closed_form([g[i] for g in grads], 0.5, 1.0, l1, l2)
        got = [float(s[i]) for s in seen]
        assert got == pytest.approx(expected, abs=1e-12)
    if l1 == 1.0:  # a strong L1 keeps small-gradient coordinates exactly at zero (sparsity)
        assert float(seen[-1][0]) == 0.0


def test_ftrl_keeps_initial_weights_and_untouched_coordinates():
    w0 = torch.tensor([0.3, -0.7, 0.0], dtype=torch.float64)
    p = w0.clone().requires_grad_(True)
    opt = FTRL([p], lr=0.1, beta=1.0, l1=0.05, l2=0.01)
    _step(opt, p, [0.0, 0.0, 0.0])  # no gradient anywhere: nothing moves
    torch.testing.assert_close(p.detach(), w0)
    _step(opt, p, [0.0, 1.0, 0.0])  # only coordinate 1 moves
    q = p.detach()
    assert float(q[0]) == pytest.approx(0.3) and float(q[2]) == 0.0 and float(q[1]) != pytest.approx(-0.7)


def test_ftrl_trains_logistic_regression():
    torch.manual_seed(0)
    x = torch.randn(512, 5)
    y = (x @ torch.tensor([2.0, -1.0, 0.0, 0.5, 0.0]) > 0).float()
    w = torch.zeros(5, requires_grad=True)
    opt = FTRL([w], lr=0.5, l1=0.01)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert w[0] > 0 > w[1]


def test_ftrl_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        FTRL([torch.zeros(1, requires_grad=True)], lr=0.0)
    with pytest.raises(ValueError):
        FTRL([torch.zeros(1, requires_grad=True)], l1=-1.0)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adagrad", torch.optim.Adagrad),
                                      ("sgd", torch.optim.SGD), ("ftrl", FTRL)])
def test_build_optimizer(name, cls):
    p = torch.zeros(3, requires_grad=True)
    opt = build_optimizer([p], OptimConfig(name=name, lr=0.01))
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.01


def test_build_optimizer_ftrl_refuses_weight_decay():
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        build_optimizer([torch.zeros(1, requires_grad=True)], OptimConfig(name="ftrl", weight_decay=0.1))
