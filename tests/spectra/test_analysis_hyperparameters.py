"""spectra.analysis.suggest_hyperparameters: stability of gradient descent at the suggested rates."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest
import torch
from torch import nn

import spectra
from curvature import Hessian
from spectra import analysis

matplotlib.use("Agg")


def least_squares(seed: int, n: int = 200, p: int = 20):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, p, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return X, y, g


def gd_final_loss_ratio(X, y, lr: float, *, momentum: float = 0.0, steps: int = 400) -> float:
    """Heavy-ball / gradient descent on ‖Xw − y‖²/(2n) from a generic start; final/initial loss."""
    n, p = X.shape
    w = torch.linspace(-1.0, 1.0, p, dtype=torch.float64).reshape(p, 1)
    w_star = torch.linalg.lstsq(X, y).solution
    f = lambda w: float(((X @ w - y) ** 2).sum() / (2 * n) - ((X @ w_star - y) ** 2).sum() / (2 * n))  # noqa: E731
    start, w_prev = f(w), w.clone()
    for _ in range(steps):
        grad = X.T @ (X @ w - y) / n
        w, w_prev = w - lr * grad + momentum * (w - w_prev), w
    return f(w) / start


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_descent_converges_below_and_diverges_above_the_suggested_rate(seed):
    X, y, g = least_squares(seed)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    H = Hessian(model, lambda o, t: 0.5 * nn.functional.mse_loss(o, t), (X, y))
    s = analysis.suggest_hyperparameters(H, num_steps=20, generator=g)
    lam = torch.linalg.eigvalsh(X.T @ X / X.shape[0])
    assert s.lambda_max == pytest.approx(float(lam[-1]), rel=1e-10)
    assert s.max_learning_rate == pytest.approx(2.0 / float(lam[-1]), rel=1e-10)
    assert gd_final_loss_ratio(X, y, 0.9 * s.max_learning_rate) < 1e-3
    assert gd_final_loss_ratio(X, y, 1.1 * s.max_learning_rate) > 1e3
    # Heavy ball: stable below 2(1+ρ)/λ_max, unstable above.
    rho = s.momentum
    assert gd_final_loss_ratio(X, y, 0.9 * s.max_learning_rate_momentum, momentum=rho, steps=2000) < 1e-3
    assert gd_final_loss_ratio(X, y, 1.1 * s.max_learning_rate_momentum, momentum=rho, steps=400) > 1e3
    # The suggested heavy-ball rate itself converges.
    assert gd_final_loss_ratio(X, y, s.learning_rate, momentum=rho, steps=2000) < 1e-6


def test_polyak_values_on_a_diagonal_quadratic():
    """Eigenvalues uniform in [0.01, 1] and m = n Lanczos steps: Polyak's α*, ρ* exactly, and the
    heavy ball contracts at (√κ − 1)/(√κ + 1)."""
    n = 200
    lam = torch.linspace(0.01, 1.0, n, dtype=torch.float64)
    s = analysis.suggest_hyperparameters(torch.diag(lam), num_steps=n, safety=1.0,
                                         generator=torch.Generator().manual_seed(0))
    a, r = 4 / (1 + 0.1) ** 2, ((1 - 0.1) / (1 + 0.1)) ** 2
    assert s.learning_rate == pytest.approx(a, rel=1e-8)
    assert s.momentum == pytest.approx(r, rel=1e-8)
    assert s.classic_learning_rate == pytest.approx(a, rel=1e-8)
    assert s.classic_mu == pytest.approx(0.01, rel=1e-8)
    w, w_prev = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    norms = []
    for _ in range(400):
        w, w_prev = w - s.learning_rate * lam * w + s.momentum * (w - w_prev), w
        norms.append(float(w.norm()))
    rate = (norms[399] / norms[199]) ** (1 / 200)
    kappa = 100.0
    assert rate == pytest.approx((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), rel=0.05)


def test_density_input_rules_and_caps():
    lam = torch.cat([torch.zeros(50), torch.linspace(0.05, 1.0, 150)]).double()
    A = torch.diag(lam)
    dens = spectra.slq(A, num_probes=4, num_steps=60, generator=torch.Generator().manual_seed(0))
    s = analysis.suggest_hyperparameters(dens, mu_rule="mass_quantile", quantile=0.2)
    assert s.num_matvecs == 0 and math.isnan(s.classic_learning_rate)
    assert s.lambda_max == pytest.approx(1.0, rel=1e-6)
    assert 0.05 <= s.mu <= 0.4  # zeros are not "positive curvature"
    assert s.momentum <= s.momentum_max
    assert s.learning_rate <= s.safety * s.max_learning_rate_momentum + 1e-15
    low = analysis.suggest_hyperparameters(dens, momentum_max=0.1)
    assert low.momentum == 0.1
    custom = analysis.suggest_hyperparameters(dens, mu_rule=lambda nodes, weights: 0.25)
    assert custom.mu == 0.25 and custom.mu_rule == "<lambda>"
    assert s.damping(32) == pytest.approx(s.learning_rate / 32)
    json.dumps(s.to_dict())
    assert s.plot().get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_bad_input():
    A = torch.diag(torch.linspace(0.1, 1.0, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match="mu_rule"):
        analysis.suggest_hyperparameters(A, mu_rule="median")
    with pytest.raises(ValueError, match="safety"):
        analysis.suggest_hyperparameters(A, safety=1.5)
    with pytest.raises(ValueError, match="positive curvature"):
        analysis.suggest_hyperparameters(-A)
    with pytest.raises(ValueError, match="symmetric"):
        analysis.suggest_hyperparameters(torch.triu(torch.ones(30, 30, dtype=torch.float64)))
    with pytest.raises(ValueError, match="mu"):
        analysis.heavy_ball(1.0, 2.0)
