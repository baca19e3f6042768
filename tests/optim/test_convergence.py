"""Convergence: fewer steps than Adam at its best learning rate on an ill-conditioned quadratic and
logistic regression, no NaN over 1,000 non-convex steps, and which AdaHessian power to start from."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.optim import AdaHessian, Sophia
from tests.optim.problems import f64, logistic_problem

ADAM_GRID = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01)


def _quadratic():
    # Axis-aligned, condition number 1e4 (the case a diagonal preconditioner is meant for).
    gen = torch.Generator().manual_seed(0)
    a = torch.logspace(-2, 2, 20, dtype=f64)
    x_star = torch.randn(20, generator=gen, dtype=f64)
    return lambda w: 0.5 * (a * (w - x_star) ** 2).sum()


def _logistic():
    X, y, fstar = logistic_problem()
    return lambda w: nn.functional.binary_cross_entropy_with_logits(X @ w, y) - fstar


def steps_to(objective, make_opt, target, *, max_steps=300):
    w = torch.zeros(20, dtype=f64, requires_grad=True)
    opt = make_opt([w])

    def closure():
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    for t in range(1, max_steps + 1):
        opt.step(closure)
        with torch.no_grad():
            value = float(objective(w))
        if not math.isfinite(value):
            return math.inf
        if value <= target:
            return t
    return math.inf


def best_adam(objective, target):
    return min(steps_to(objective, lambda p, lr=lr: torch.optim.Adam(p, lr=lr), target) for lr in ADAM_GRID)


def _gen():
    return torch.Generator().manual_seed(0)


# Deterministic full-batch problems: light momentum suits them (the paper's β1 = 0.965 is tuned for
# noisy language-model gradients).
SOPHIA = lambda p: Sophia(p, lr=0.3, rho=0.3, betas=(0.5, 0.9), weight_decay=0.0, update_period=10, generator=_gen())  # noqa: E731
ADAHESSIAN = lambda p: AdaHessian(p, lr=1.0, betas=(0.5, 0.999), generator=_gen())  # noqa: E731


@pytest.mark.parametrize("name, make", [("sophia", SOPHIA), ("adahessian", ADAHESSIAN)])
def test_fewer_steps_than_tuned_adam_on_an_ill_conditioned_quadratic(name, make):
    objective = _quadratic()
    adam = best_adam(objective, 1e-6)  # measured: 156 steps (lr 0.3)
    ours = steps_to(objective, make, 1e-6)  # measured: Sophia (update_period=10) 37, AdaHessian 21
    assert ours < 0.5 * adam, (ours, adam)


def test_fewer_steps_than_tuned_adam_on_ill_conditioned_logistic_regression():
    objective = _logistic()
    adam = best_adam(objective, 1e-3)  # measured: 208 steps (lr 1.0)
    sophia = steps_to(objective, lambda p: Sophia(p, lr=1.0, rho=1.0, betas=(0.9, 0.99), weight_decay=0.0,
                                                  update_period=1, generator=_gen()), 1e-3)
    ada1 = steps_to(objective, lambda p: AdaHessian(p, lr=3.0, hessian_power=1.0, generator=_gen()), 1e-3)
    assert sophia < adam and ada1 < adam, (sophia, ada1, adam)  # measured: 99, 109 vs 208


def test_adahessian_hessian_power_on_ill_conditioned_logistic_regression():
    # Measured over lr in {3, 1, 0.3, 0.1}: hessian_power=1 (lr 3) reaches the target in 109 steps,
    # hessian_power=0.5 never within 300 (its best final gap 0.03): start from 1.0 with a larger lr.
    objective = _logistic()
    def make(lr, k):
        return lambda p: AdaHessian(p, lr=lr, hessian_power=k, generator=_gen())

    power = {k: min(steps_to(objective, make(lr, k), 1e-3) for lr in (3.0, 1.0, 0.3)) for k in (1.0, 0.5)}
    assert power[1.0] < power[0.5], power


@pytest.mark.parametrize("make", [
    lambda p: Sophia(p, lr=0.01, generator=_gen()),
    lambda p: AdaHessian(p, lr=0.05, generator=_gen()),
])
def test_no_nan_over_1000_non_convex_steps(make):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 4, generator=gen)
    y = torch.sin(3 * X[:, :1]) * torch.cos(2 * X[:, 1:2])
    opt = make(model.parameters())

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(1000):
        loss = opt.step(closure)
        assert math.isfinite(float(loss.detach()))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert float(closure().detach()) < 0.5 * first
