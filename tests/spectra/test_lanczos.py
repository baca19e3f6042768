"""Lanczos invariants, Gauss-quadrature exactness, breakdown and batching."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import spectra
from curvature import DenseOperator
from tests.matrices import gen, goe, with_spectrum


def moments_exact(A: torch.Tensor, V: torch.Tensor, nodes, weights, max_power: int) -> float:
    """Largest error of ``Σ τ θ^p`` against ``uᵀ A^p u``, relative to ``‖A‖₂^p``, over probes and ``p``."""
    scale = float(torch.linalg.matrix_norm(A, ord=2))
    worst = 0.0
    for p_idx in range(V.shape[1]):
        u = V[:, p_idx] / torch.linalg.vector_norm(V[:, p_idx])
        x = u.clone()
        for power in range(max_power + 1):
            exact = float(u @ x)
            quad = float((weights[p_idx] * nodes[p_idx] ** power).sum())
            worst = max(worst, abs(exact - quad) / scale**power)
            x = A @ x
    return worst


def test_invariants_full_reorthogonalization():
    A = goe(200, seed=1)
    res = spectra.lanczos(A, num_steps=40, generator=gen(), return_basis=True)
    Q = res.basis[0]  # (m, d)
    assert Q.dtype == torch.float64
    assert (Q @ Q.T - torch.eye(40, dtype=torch.float64)).abs().max() < 1e-12
    T = res.tridiagonal()[0]
    norm = torch.linalg.matrix_norm(A, ord=2)
    assert (Q @ A @ Q.T - T).abs().max() < 1e-10 * norm
    nodes, weights = res.quadrature()
    assert abs(float(weights.sum()) - 1) < 1e-14
    ev = torch.linalg.eigvalsh(A)
    assert nodes.min() >= ev[0] - 1e-10 and nodes.max() <= ev[-1] + 1e-10


def test_full_krylov_space_recovers_spectrum_and_weights():
    evals = torch.linspace(-2, 3, 50, dtype=torch.float64) ** 3
    A = with_spectrum(evals, seed=3)
    v = torch.randn(50, generator=gen(5), dtype=torch.float64)
    res = spectra.lanczos(A, num_steps=50, v0=v)
    nodes, weights = res.quadrature()
    norm = float(evals.abs().max())
    assert (nodes[0] - torch.sort(evals).values).abs().max() < 1e-9 * norm
    ev, vecs = torch.linalg.eigh(A)
    u = v / torch.linalg.vector_norm(v)
    assert (weights[0] - (vecs.T @ u) ** 2).abs().max() < 1e-9


@pytest.mark.parametrize("num_steps", [5, 12])
def test_gauss_quadrature_moment_exactness(num_steps):
    A = goe(120, seed=2)
    V = torch.randn(120, 3, generator=gen(7), dtype=torch.float64)
    scale = torch.linalg.matrix_norm(A, ord=2)
    A = A / scale
    res = spectra.lanczos(A, num_steps=num_steps, v0=V)
    nodes, weights = res.quadrature()
    assert (weights.sum(1) - 1).abs().max() < 1e-14
    assert moments_exact(A, V, nodes, weights, 2 * num_steps - 1) < 1e-10


def test_batched_probes_equal_single_probe_runs():
    A = goe(150, seed=4)
    V = torch.randn(150, 4, generator=gen(8), dtype=torch.float64)
    together = spectra.lanczos(A, num_steps=25, v0=V)
    assert together.num_matvecs == 100
    for p in range(4):
        alone = spectra.lanczos(A, num_steps=25, v0=V[:, p])
        torch.testing.assert_close(together.alpha[p], alone.alpha[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(together.beta[p], alone.beta[0], rtol=1e-10, atol=1e-12)


def test_breakdown_low_rank_is_handled_and_quadrature_exact():
    d = 60
    g = gen(9)
    X = torch.randn(d, 3, generator=g, dtype=torch.float64)
    A = X @ X.T  # rank 3
    V = torch.randn(d, 2, generator=g, dtype=torch.float64)
    res = spectra.lanczos(A, num_steps=10, v0=V, generator=gen(10), return_basis=True)
    assert torch.isfinite(res.alpha).all() and torch.isfinite(res.beta).all()
    assert (res.num_breakdowns >= 1).all()
    assert (res.beta == 0).any(dim=1).all()
    Q = res.basis[0]
    assert (Q @ Q.T - torch.eye(10, dtype=torch.float64)).abs().max() < 1e-12
    nodes, weights = res.quadrature()
    assert (weights.sum(1) - 1).abs().max() < 1e-13
    # The probe's measure sits on 4 points (3 eigenvalues + the null space): exact for all powers.
    assert moments_exact(A, V, nodes, weights, 19) < 1e-10
    # Nodes with weight lie in the spectrum.
    ev = torch.linalg.eigvalsh(A)
    live = nodes[weights > 1e-14]
    assert live.min() >= ev[0] - 1e-9 and live.max() <= ev[-1] + 1e-9


def test_breakdown_without_reorthogonalization_and_zero_operator():
    A = torch.zeros(20, 20, dtype=torch.float64)
    res = spectra.lanczos(A, num_steps=6, num_probes=2, generator=gen(), reorthogonalize="none")
    nodes, weights = res.quadrature()
    assert torch.isfinite(nodes).all() and (nodes == 0).all()
    assert (weights.sum(1) - 1).abs().max() < 1e-14
    X = torch.randn(20, 2, generator=gen(1), dtype=torch.float64)
    res = spectra.lanczos(X @ X.T, num_steps=8, generator=gen(), reorthogonalize="none")
    assert torch.isfinite(res.alpha).all()


def test_num_steps_beyond_dimension_is_capped():
    A = torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64))
    res = spectra.lanczos(A, num_steps=30, generator=gen())
    assert res.num_steps == 7
    nodes, _ = res.quadrature()
    torch.testing.assert_close(nodes[0], torch.arange(1.0, 8.0, dtype=torch.float64))


def test_ghost_eigenvalues_only_without_reorthogonalization():
    d = 2000
    evals = torch.cat([torch.tensor([10.0]), torch.rand(d - 1, generator=gen(11))]).double()
    A = with_spectrum(evals, seed=12)
    v = torch.randn(d, generator=gen(13), dtype=torch.float64)
    counts = {}
    for mode in ("full", "none"):
        nodes, weights = spectra.lanczos(A, num_steps=150, v0=v, reorthogonalize=mode).quadrature()
        counts[mode] = int(((nodes[0] - 10).abs() < 0.2).sum())
    assert counts["full"] == 1
    assert counts["none"] > 1  # ghost copies of the outlier (Paige 1971)


def test_float32_operator_accumulates_float64_coefficients():
    A = goe(100, seed=5)
    res32 = spectra.lanczos(A.float(), num_steps=20, generator=gen(), return_basis=True)
    assert res32.alpha.dtype == torch.float64 and res32.beta.dtype == torch.float64
    assert res32.basis.dtype == torch.float32
    res64 = spectra.lanczos(A, num_steps=20, generator=gen())
    torch.testing.assert_close(res32.alpha[:, :5], res64.alpha[:, :5], rtol=0, atol=1e-5)


def test_accepts_operators_of_all_kinds():
    A = goe(30, seed=6)
    ref = spectra.lanczos(A, num_steps=8, generator=gen()).alpha
    for op in (DenseOperator(A), A.numpy(), sla.aslinearoperator(A.numpy())):
        torch.testing.assert_close(spectra.lanczos(op, num_steps=8, generator=gen()).alpha, ref)


def test_ritz_vectors_are_eigenvectors_at_full_dimension():
    A = goe(25, seed=7)
    res = spectra.lanczos(A, num_steps=25, generator=gen(), return_basis=True)
    values, vectors = res.ritz_vectors()
    X = vectors[0].T
    assert (A @ X - X * values[0]).abs().max() < 1e-10
    with pytest.raises(ValueError, match="return_basis"):
        spectra.lanczos(A, num_steps=3, generator=gen()).ritz_vectors()


def test_randomness_only_from_generator():
    A = goe(40, seed=8)
    state = torch.get_rng_state()
    a = spectra.lanczos(A, num_steps=5, num_probes=3, generator=gen(3)).alpha
    b = spectra.lanczos(A, num_steps=5, num_probes=3, generator=gen(3)).alpha
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


def test_bad_input():
    A = goe(10)
    with pytest.raises(ValueError, match="num_steps"):
        spectra.lanczos(A, num_steps=0)
    with pytest.raises(TypeError, match="num_steps"):
        spectra.lanczos(A, num_steps=2.5)
    with pytest.raises(ValueError, match="op must be a square"):
        spectra.lanczos(torch.zeros(3, 4), num_steps=2)
    with pytest.raises(ValueError, match="reorthogonalize"):
        spectra.lanczos(A, num_steps=2, reorthogonalize="partial")
    with pytest.raises(ValueError, match="v0"):
        spectra.lanczos(A, num_steps=2, v0=torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero column"):
        spectra.lanczos(A, num_steps=2, v0=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_probes"):
        spectra.lanczos(A, num_steps=2, num_probes=3, v0=torch.ones(10, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="generator"):
        spectra.lanczos(A, num_steps=2, generator=np.random.default_rng(0))
