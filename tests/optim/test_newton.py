"""Gradient-regularized Newton: exactness on a quadratic, fast local convergence on logistic
regression, negative curvature on Rosenbrock, errors and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvature
from curvature.optim import GradientRegularizedNewton, NonFiniteError
from tests.cases import CLOSURES, make_closure
from tests.optim.problems import f64


class Point(nn.Module):
    """A model that is its own parameter vector (the loss is a function of it)."""

    def __init__(self, x0):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(x0, dtype=f64).clone())

    def forward(self, inputs):
        return self.x


def _solve(model, loss_fn, iters, *, op=curvature.Hessian, tol=1e-8, zeroing="set_to_none", **kwargs):
    data = (torch.zeros(1, dtype=f64), torch.zeros(1, dtype=f64))
    opt = GradientRegularizedNewton(model.parameters(), **kwargs)
    closure = make_closure(opt, model, loss_fn, data, zeroing)

    infos = []
    for _ in range(iters):
        opt.step(closure, curvature=op(model, loss_fn, data))
        infos.append(opt.last_step_info)
        closure()
        if float(model.x.grad.norm()) < tol:
            break
    return infos, opt


@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_quadratic_every_trial_accepted_and_gamma_doubles(zeroing):
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(30, 30, generator=gen, dtype=f64)
    A = Q @ Q.T / 30 + 1e-3 * torch.eye(30, dtype=f64)
    b = torch.randn(30, generator=gen, dtype=f64)
    model = Point(torch.zeros(30))
    infos, _ = _solve(model, lambda x, t: 0.5 * x @ A @ x - b @ x, 30, cg_tol=1e-13, zeroing=zeroing)
    assert all(i.accepted and i.rejections == 0 for i in infos)
    assert [i.gamma for i in infos] == [2.0 ** (k + 1) for k in range(len(infos))]
    assert len(infos) <= 12
    # γ0 = 1e12: one step lands on x* (the step tends to Newton's).
    model = Point(torch.zeros(30))
    _solve(model, lambda x, t: 0.5 * x @ A @ x - b @ x, 1, gamma=1e12, cg_tol=1e-13)
    x_star = torch.linalg.solve(A, b)
    assert float((model.x.detach() - x_star).norm() / x_star.norm()) < 1e-6


def _logistic(mu):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(500, 50, generator=gen, dtype=f64)
    w = torch.randn(50, generator=gen, dtype=f64)
    y = (X @ w + 0.5 * torch.randn(500, generator=gen, dtype=f64) > 0).to(f64)
    model = nn.Linear(50, 1, bias=False).to(f64)
    nn.init.zeros_(model.weight)

    def loss_fn(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], t) + 0.5 * mu * model.weight.square().sum()

    return model, loss_fn, (X, y)


def test_fast_local_convergence_on_logistic_regression():
    model, loss_fn, data = _logistic(1e-3)
    opt = GradientRegularizedNewton(model.parameters())

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss

    norms, losses = [], []
    for _ in range(25):
        # The Hessian, not the GGN: the GGN misses the L2 term (it does not go through the model's
        # outputs), and that model error of μ makes the rate linear (measured: 18 iterations).
        opt.step(closure, curvature=curvature.Hessian(model, loss_fn, data))
        losses.append(opt.last_step_info.new_loss)
        norms.append(float(closure().detach() * 0 + model.weight.grad.norm()))
        if norms[-1] < 1e-8:
            break
    assert norms[-1] < 1e-8 and len(norms) <= 12  # measured: 10 iterations, no rejection
    assert all(b <= a + 1e-15 for a, b in zip(losses, losses[1:]))  # monotone
    # Superlinear tail: the contraction factor of ‖g‖ shrinks over the last steps.
    ratios = [b / a for a, b in zip(norms, norms[1:])]
    assert ratios[-1] < 0.05 and ratios[-1] < ratios[-3]
    # Adam at its best learning rate needs at least 10x as many steps to the same loss.
    target = losses[-1] + 1e-6
    best = math.inf
    for lr in (0.3, 0.1, 0.03):
        m, lf, d = _logistic(1e-3)
        adam = torch.optim.Adam(m.parameters(), lr=lr)
        for t in range(1, 301):
            adam.zero_grad()
            loss = lf(m(d[0]), d[1])
            if float(loss.detach()) <= target:
                best = min(best, t)
                break
            loss.backward()
            adam.step()
    assert best >= 10 * len(norms)


@pytest.mark.parametrize("zeroing", list(CLOSURES))
def test_rosenbrock_with_the_exact_hessian_handles_negative_curvature(zeroing):
    def rosenbrock(x, t):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    model = Point([-1.2, 1.0])
    infos, _ = _solve(model, rosenbrock, 60, zeroing=zeroing)
    assert model.x.detach().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert len(infos) <= 60
    losses = [i.new_loss for i in infos]
    assert all(b <= a for a, b in zip(losses, losses[1:]))


def test_errors_and_resume():
    model, loss_fn, data = _logistic(1e-3)
    opt = GradientRegularizedNewton(model.parameters())

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss

    G = curvature.GGN(model, loss_fn, data)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(curvature=G)
    with pytest.raises(TypeError, match="needs curvature="):
        opt.step(closure)
    other = nn.Linear(50, 1, bias=False).to(f64)
    with pytest.raises(ValueError, match="exactly the optimizer's parameters"):
        opt.step(closure, curvature=curvature.GGN(other, loss_fn, data))
    with pytest.raises(NonFiniteError):
        opt.step(lambda: torch.tensor(float("nan")), curvature=G)
    assert torch.equal(model.weight, torch.zeros_like(model.weight))
    for kwargs, match in ((dict(gamma=0.0), "gamma"), (dict(gamma_min=-1.0), "gamma_min"),
                          (dict(gamma=1.0, gamma_min=2.0), "gamma_min"), (dict(max_trials=0), "max_trials")):
        with pytest.raises(ValueError, match=match):
            GradientRegularizedNewton(model.parameters(), **kwargs)
    for _ in range(2):
        opt.step(closure, curvature=curvature.GGN(model, loss_fn, data))
    state = copy.deepcopy(opt.state_dict())  # as torch.save would
    w = model.weight.detach().clone()
    opt.step(closure, curvature=curvature.GGN(model, loss_fn, data))
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.copy_(w)
    opt2 = GradientRegularizedNewton(model.parameters(), gamma=5.0)
    opt2.load_state_dict(state)

    def closure2():
        opt2.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss

    opt2.step(closure2, curvature=curvature.GGN(model, loss_fn, data))
    assert torch.equal(model.weight, expected)
