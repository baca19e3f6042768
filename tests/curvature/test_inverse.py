"""Batched CG damped inverse against dense solves."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

from curvature.hessian import Hessian
from curvature.inverse import CGInfo, CGInverse, MINRESInverse, NegativeCurvatureError, inverse
from curvature.linear_operator import DenseOperator
from curvature.mfac import MFACInverse
from tests.matrices import rel

f64 = torch.float64


def spd(d, *, cond=1e3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))
    return (Q * torch.logspace(0, np.log10(cond), d, dtype=f64)) @ Q.T


def damped(A, lam):
    return A + lam * torch.eye(A.shape[0], dtype=A.dtype)


class CountingOperator(DenseOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = []

    def _matmat(self, V):
        self.calls.append(V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_matches_dense_solve_on_damped_matrices(lam):
    A = spd(60, seed=1)
    B = torch.randn(60, 7, dtype=f64, generator=torch.Generator().manual_seed(2))
    op = CountingOperator(A)
    inv = inverse(op, damping=lam, tol=1e-12)
    X = inv @ B
    assert rel(X, torch.linalg.solve(damped(A, lam), B)) <= 1e-9
    assert rel(inv @ B[:, 0], torch.linalg.solve(damped(A, lam), B[:, 0])) <= 1e-9
    info = inv.last_info
    assert isinstance(info, CGInfo) and info.all_converged and not any(info.breakdown)
    assert max(info.relative_residuals) <= 1e-12
    assert info.max_iterations <= 3 * 60  # rounding costs CG some iterations beyond d
    assert inv.shape == (60, 60) and inv.dtype == f64


def test_one_product_per_iteration_for_the_whole_block_with_per_column_convergence():
    A = torch.diag(torch.arange(1.0, 41.0, dtype=f64))
    B = torch.zeros(40, 4, dtype=f64)
    B[0, 0] = 1.0  # an eigenvector: converges in one iteration
    B[:, 1] = 1.0  # all 40 eigenvalues
    B[:3, 2] = 1.0  # three eigenvalues: three iterations
    # column 3 stays zero: nothing to do
    op = CountingOperator(A)
    inv = CGInverse(op, damping=0.5, tol=1e-10)
    X = inv @ B
    assert torch.allclose(X, torch.linalg.solve(damped(A, 0.5), B), rtol=0, atol=1e-9)
    info = inv.last_info
    assert info.iterations[0] == 1 and info.iterations[2] == 3 and info.iterations[3] == 0
    assert info.converged == (True, True, True, True) and info.relative_residuals[3] == 0.0
    assert len(op.calls) == info.max_iterations  # one batched product per iteration
    assert op.calls[0] == 3 and op.calls[-1] == 1  # finished columns leave the block
    assert info.num_matvecs == sum(op.calls)


def _small_model_problem():
    with torch.random.fork_rng():  # seeded init, global RNG left as it was
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(32, 4, generator=gen, dtype=f64), torch.randint(0, 3, (32,), generator=gen))
    return model, nn.CrossEntropyLoss(), data


def test_matches_dense_solve_on_a_damped_model_hessian():
    model, loss_fn, data = _small_model_problem()
    H = Hessian(model, loss_fn, data)
    dense = H.to_dense()
    lam = float(torch.linalg.eigvalsh(dense).min().abs()) + 0.1  # positive definite after damping
    inv = inverse(H, damping=lam, tol=1e-11)
    B = torch.randn(H.shape[0], 3, dtype=f64, generator=torch.Generator().manual_seed(3))
    assert rel(inv @ B, torch.linalg.solve(damped(dense, lam), B)) <= 1e-8
    assert inv.last_info.all_converged


def test_preconditioners_cut_iterations():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(30, 200, generator=gen, dtype=f64) * torch.logspace(0, 1, 200, dtype=f64)
    A = G.T @ G / 30
    lam = 1e-2
    b = torch.randn(200, dtype=f64, generator=gen)
    expected = torch.linalg.solve(damped(A, lam), b)
    plain = inverse(A, damping=lam, tol=1e-10)
    assert rel(plain @ b, expected) <= 1e-7
    mfac = inverse(A, damping=lam, tol=1e-10, preconditioner=MFACInverse(G, damping=lam))
    assert rel(mfac @ b, expected) <= 1e-7
    assert mfac.last_info.max_iterations <= 2 < plain.last_info.max_iterations  # exact preconditioner
    # badly scaled coordinates: Jacobi's territory
    D = torch.logspace(0, 2, 200, dtype=f64)
    A = D[:, None] * spd(200, cond=10, seed=7) * D
    expected = torch.linalg.solve(damped(A, lam), b)
    plain = inverse(A, damping=lam, tol=1e-10)
    jacobi = inverse(A, damping=lam, tol=1e-10, preconditioner=1 / (torch.diagonal(A) + lam))
    assert rel(jacobi @ b, expected) <= 1e-8 and rel(plain @ b, expected) <= 1e-8
    assert 2 * jacobi.last_info.max_iterations < plain.last_info.max_iterations
    call = inverse(A, damping=lam, tol=1e-10, preconditioner=lambda R: R / (torch.diagonal(A) + lam)[:, None])
    assert torch.allclose(call @ b, jacobi @ b)


def test_accepts_scipy_operators():
    A = spd(20, seed=5).numpy()
    inv = inverse(aslinearoperator(A), damping=0.1, tol=1e-12)
    b = torch.ones(20, dtype=f64)
    assert rel(inv @ b, torch.linalg.solve(damped(torch.from_numpy(A), 0.1), b)) <= 1e-9


def test_non_convergence_and_breakdown_are_reported(caplog):
    A = spd(50, cond=1e6, seed=6)
    inv = inverse(A, damping=1e-6, tol=1e-12, max_iter=3)
    with caplog.at_level(logging.WARNING, logger="curvature.inverse"):
        inv @ torch.ones(50, dtype=f64)
    assert inv.last_info.iterations == (3,) and inv.last_info.converged == (False,)
    assert "did not converge" in caplog.text
    indefinite = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=f64))
    bad = inverse(indefinite, damping=0.5, negative_curvature="stop")
    bad @ torch.ones(3, dtype=f64)
    assert bad.last_info.breakdown == (True,) and not bad.last_info.all_converged


def _indefinite(d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))
    return (Q * torch.linspace(-5.0, 10.0, d, dtype=f64)) @ Q.T, torch.randn(d, 3, generator=gen, dtype=f64)


def test_cg_raises_on_negative_curvature_and_names_the_fixes():
    A, B = _indefinite()
    with pytest.raises(NegativeCurvatureError, match=r"GGN.*damping above \|λ_min\(A\)\|.*method='minres'") as err:
        inverse(A, damping=0.3) @ B
    assert err.value.curvature <= 0 and err.value.damping == 0.3
    # Damping above |λ_min| = 5 makes the system definite: no error, matches the dense solve.
    inv = inverse(A, damping=5.5, tol=1e-12)
    assert rel(inv @ B, torch.linalg.solve(damped(A, 5.5), B)) <= 1e-9
    # A Hessian with negative eigenvalues (tanh MLP away from a minimum) and a small damping.
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(f64)
    x, y = torch.randn(20, 3, generator=gen, dtype=f64), torch.randn(20, 2, generator=gen, dtype=f64)
    H = Hessian(model, nn.MSELoss(), (x, y))
    lam_min = float(torch.linalg.eigvalsh(H.to_dense())[0])
    assert lam_min < -1e-3
    b = torch.randn(H.shape[0], generator=gen, dtype=f64)
    with pytest.raises(NegativeCurvatureError):
        inverse(H, damping=1e-3 * abs(lam_min), max_iter=500) @ b


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_minres_matches_dense_solve_on_indefinite_systems(lam):
    A, B = _indefinite()
    inv = inverse(A, damping=lam, method="minres", tol=1e-12)
    assert isinstance(inv, MINRESInverse)
    X = inv @ B
    assert rel(X, torch.linalg.solve(damped(A, lam), B)) <= 1e-9
    assert inv.last_info.all_converged and len(inv.last_info.iterations) == 3
    # One column alone gives the same answer as in the block; SPD systems too.
    assert rel(inv @ B[:, 1], X[:, 1]) <= 1e-12
    S = spd(30, cond=1e3, seed=4)
    b = torch.randn(30, dtype=f64, generator=torch.Generator().manual_seed(5))
    assert rel(inverse(S, damping=1e-2, method="minres", tol=1e-12) @ b, torch.linalg.solve(damped(S, 1e-2), b)) <= 1e-9
    with pytest.raises(ValueError, match="no preconditioner"):
        inverse(A, damping=lam, method="minres", preconditioner=torch.ones(40, dtype=f64))
    with pytest.raises(ValueError, match="negative_curvature must be one of"):
        inverse(A, damping=lam, negative_curvature="ignore")


def test_bad_input():
    A = torch.eye(3, dtype=f64)
    for damping in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="damping"):
            inverse(A, damping=damping)
    with pytest.raises(ValueError, match="method must be one of"):
        inverse(A, damping=1.0, method="lsmr")
    with pytest.raises(ValueError, match="tol"):
        inverse(A, damping=1.0, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        inverse(A, damping=1.0, max_iter=0)
    with pytest.raises(TypeError, match="maxiter"):  # the pre-0.2 name is gone (CHANGELOG)
        inverse(A, damping=1.0, maxiter=5)
    with pytest.raises(ValueError, match=r"square \(d, d\) operator"):
        inverse(torch.ones(2, 3).numpy(), damping=1.0)
    with pytest.raises(ValueError, match="square"):
        inverse(torch.ones(2, 3), damping=1.0)
    with pytest.raises(ValueError, match=r"diagonal preconditioner must have shape \(3,\)"):
        inverse(A, damping=1.0, preconditioner=torch.ones(4, dtype=f64))
    with pytest.raises(TypeError, match="preconditioner must be"):
        inverse(A, damping=1.0, preconditioner="jacobi")
    with pytest.raises(ValueError, match="symmetric"):
        inverse(DenseOperator(A, symmetric=False), damping=1.0)
    inv = inverse(A, damping=1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        inv @ torch.ones(4, dtype=f64)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_a_solve_reports_its_progress(method, caplog):
    """A long solve is never silent: a callback per iteration, and INFO lines (MINRES once ran
    4,510 iterations for 15 minutes without a word)."""
    from curvature import SolveProgress

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.linspace(0.1, 10.0, 30, dtype=torch.float64)) @ Q.T
    seen: list = []
    inv = inverse(A, damping=0.5, method=method, tol=1e-10, callback=seen.append)
    with caplog.at_level(logging.INFO, logger="curvature.inverse"):
        inv @ torch.randn(30, 2, generator=g, dtype=torch.float64)
    assert seen and all(isinstance(s, SolveProgress) for s in seen)
    assert [s.iteration for s in seen] == list(range(1, inv.last_info.max_iterations + 1))
    assert seen[-1].max_relative_residual <= 1e-10 < seen[0].max_relative_residual
    assert any(f"{inv.last_info.max_iterations} iterations" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="callback"):
        inverse(A, damping=0.5, method=method, callback=3)
