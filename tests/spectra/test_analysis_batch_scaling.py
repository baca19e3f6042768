"""spectra.analysis.batch_size_scaling on linear least squares, where H_B = (1/B) X_Bᵀ X_B exactly."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from spectra import analysis

matplotlib.use("Agg")

ELL = 10.0  # population spike: Σ = I + (ℓ − 1) u uᵀ


def half_mse(out, target):
    """``‖Xw − y‖²/(2B)``, whose Hessian is ``X_BᵀX_B / B``."""
    return 0.5 * nn.functional.mse_loss(out, target)


def spiked_regression(P: int, N: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(P, generator=g, dtype=torch.float64)
    u /= u.norm()
    S = torch.eye(P, dtype=torch.float64) + (ELL**0.5 - 1) * torch.outer(u, u)
    X = torch.randn(N, P, generator=g, dtype=torch.float64) @ S
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(P, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model, X, y, g


@pytest.mark.parametrize("seed", [0, 1])
def test_lambda_max_matches_dense_and_fit_matches_bbp(seed):
    P, N = 200, 10_000
    model, X, y, g = spiked_regression(P, N, seed)
    sizes = (25, 50, 100, 200, 400, 800)
    res = analysis.batch_size_scaling(
        model, half_mse, (X, y), batch_sizes=sizes, num_batches=12, smallest=False, adam=False, generator=g
    )
    assert bool(res.converged.all())
    for i, B in enumerate(sizes):
        for j, idx in enumerate(res.batch_indices[i]):
            assert idx.numel() == B and idx.unique().numel() == B  # without replacement
            Xb = X[idx]
            dense = float(torch.linalg.eigvalsh(Xb.T @ Xb / B)[-1])
            assert abs(float(res.lambda_max[i, j]) - dense) <= 1e-8 * dense
    lam_N = float(torch.linalg.eigvalsh(X.T @ X / N)[-1])
    assert res.lambda_full_max == pytest.approx(lam_N, rel=1e-8)
    # Mini-batch sharpness exceeds the full-data one and shrinks with B (Granziol et al.).
    assert bool((res.mean_lambda_max > lam_N).all())
    # BBP for a sample covariance: λ_max(B) = ℓ + [ℓP/(ℓ−1)]/B above the transition.
    kappa = ELL * P / (ELL - 1)
    assert abs(res.fit.lambda_inf - lam_N) <= 0.03 * lam_N
    assert abs(res.fit.kappa - kappa) <= 0.3 * kappa
    assert res.fit.critical_batch_size == pytest.approx(res.fit.kappa / res.fit.lambda_inf)
    assert abs(res.excess_exponent - 1.0) <= 0.3
    # The fitted rates follow the known law 2/(ℓ + κ/B) within 10% over the grid.
    known = 2.0 / (lam_N + kappa / np.asarray(sizes, float))
    assert np.all(np.abs(res.max_learning_rate(sizes) / known - 1) < 0.1)
    assert np.allclose(res.max_learning_rate(sizes, momentum=0.5), 1.5 * res.max_learning_rate(sizes))


def test_sgd_linear_and_adam_square_root_scaling_below_the_critical_batch():
    """Below B_crit, α_max ∝ B for SGD and ∝ √B for Adam (measured exponents, not assumed)."""
    P, N = 800, 4000
    model, X, y, g = spiked_regression(P, N, 2)
    sizes = (4, 8, 16, 32)
    res = analysis.batch_size_scaling(
        model, half_mse, (X, y), batch_sizes=sizes, num_batches=8, smallest=False, adam=True, generator=g
    )
    assert bool(res.converged.all())
    assert res.fit.critical_batch_size > 2 * sizes[-1]
    assert 0.7 < res.sgd_exponent < 1.1
    assert 0.3 < res.adam_exponent < 0.65
    # The Adam operator is D^{-1/2} H_B D^{-1/2} with D = √v̂ + ε, v̂ = E[g_B²] over batches of B
    # drawn without replacement: ḡ² + (N − B)/(N − 1)·Var_i(g_i)/B, per-sample g_i = x_i(x_iᵀw − y_i).
    i = 1
    B = sizes[i]
    w = model.weight.detach().reshape(-1, 1)
    g_i = X * (X @ w - y)
    mean, var = g_i.mean(0), g_i.var(0, unbiased=False)
    s = ((mean**2 + (N - B) / (N - 1) * var / B).sqrt() + 1e-8).rsqrt()
    for j, idx in enumerate(res.batch_indices[i]):
        Hb = X[idx].T @ X[idx] / B
        dense = float(torch.linalg.eigvalsh(s[:, None] * Hb * s[None, :])[-1])
        assert abs(float(res.adam_lambda_max[i, j]) - dense) <= 1e-6 * dense


def test_smallest_eigenvalue_and_ggn_curvature():
    P, N = 8, 400
    model, X, y, g = spiked_regression(P, N, 3)
    sizes = (16, 32, 64, 128)
    res = analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=sizes, num_batches=3, adam=False,
                                      generator=torch.Generator().manual_seed(0))
    for i, B in enumerate(sizes):
        for j, idx in enumerate(res.batch_indices[i]):
            ev = torch.linalg.eigvalsh(X[idx].T @ X[idx] / B)
            assert float(res.lambda_min[i, j]) == pytest.approx(float(ev[0]), rel=1e-6)
            assert float(res.lambda_max[i, j]) == pytest.approx(float(ev[-1]), rel=1e-8)
    ev = torch.linalg.eigvalsh(X.T @ X / N)
    assert res.lambda_full_min == pytest.approx(float(ev[0]), rel=1e-6)
    # For a linear model with MSE the GGN is the Hessian: same batches, same eigenvalues.
    ggn = analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=sizes, num_batches=3, adam=False,
                                      curvature="ggn", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ggn.lambda_max, res.lambda_max, rtol=1e-8, atol=0)
    d = res.to_dict()
    json.dumps(d)
    assert d["batch_sizes"] == list(sizes) and d["fit"]["law"] == "L1"
    axes = res.plot()
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_bad_input():
    model, X, y, g = spiked_regression(5, 100, 4)
    with pytest.raises(ValueError, match="only N=100 samples"):
        analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=(32, 64, 128), generator=g)
    with pytest.raises(ValueError, match="strictly increasing"):
        analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=(32, 16, 8), generator=g)
    with pytest.raises(ValueError, match="at least 3"):
        analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=(8, 16), generator=g)
    with pytest.raises(ValueError, match="curvature"):
        analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=(4, 8, 16), curvature="fisher")
    with pytest.raises(ValueError, match="num_batches"):
        analysis.batch_size_scaling(model, half_mse, (X, y), batch_sizes=(4, 8, 16), num_batches=1)
    with pytest.raises(ValueError, match="samples but targets"):
        analysis.batch_size_scaling(model, half_mse, (X, y[:50]), batch_sizes=(4, 8, 16))


def test_fit_recovers_exact_laws():
    B = np.array([8.0, 16.0, 32.0, 64.0, 128.0])
    fit = analysis.fit_batch_scaling(B, 2.0 + 40.0 / B, np.full(5, 0.1))
    assert fit.coefficients == pytest.approx((2.0, 40.0), rel=1e-10)
    edge = analysis.fit_batch_scaling(B, (1.5 + 3.0 / np.sqrt(B)) ** 2, law="L3")
    assert edge.coefficients == pytest.approx((1.5, 3.0), rel=1e-6)
    assert edge.lambda_inf == pytest.approx(2.25, rel=1e-6)
