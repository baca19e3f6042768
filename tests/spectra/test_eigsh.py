"""eigsh (thick-restarted Lanczos) and power iteration against dense eigendecompositions."""

from __future__ import annotations

import logging

import pytest
import scipy.sparse.linalg as sla
import torch

import spectra
from curvature import DenseOperator
from tests.matrices import gen, goe, with_spectrum


def true_residuals(A: torch.Tensor, res: spectra.EigenResult) -> torch.Tensor:
    X = res.eigenvectors
    return torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / want.abs()).max())


def separated(d: int = 400) -> torch.Tensor:
    # Top-5 well separated from each other and from a bulk in [-1, 1].
    bulk = torch.rand(d - 5, generator=gen(21), dtype=torch.float64) * 2 - 1
    return with_spectrum(torch.cat([torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0]).double(), bulk]), seed=22)


def clustered(d: int = 400) -> torch.Tensor:
    # Top-5 within 1e-3 relative of each other, on top of a dense bulk.
    top = 10 * (1 + 1e-4 * torch.arange(5, dtype=torch.float64))
    bulk = torch.rand(d - 5, generator=gen(23), dtype=torch.float64) * 9.9
    return with_spectrum(torch.cat([top, bulk]), seed=24)


@pytest.mark.parametrize("make", [separated, clustered, lambda: goe(400, seed=25)])
def test_top5_match_dense(make):
    A = make()
    want = torch.linalg.eigvalsh(A).flip(0)[:5]
    res = spectra.eigsh(A, k=5, tol=1e-10, generator=gen())
    assert res.all_converged
    assert rel_err(res.eigenvalues, want) < 1e-8
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvectors.shape == (400, 5)
    norm = float(want.abs().max())
    assert (true_residuals(A, res) <= 1e-10 * norm * 1.01).all()
    torch.testing.assert_close(true_residuals(A, res), res.residuals, atol=1e-9 * norm, rtol=0)
    # Orthonormal Ritz vectors.
    X = res.eigenvectors
    assert (X.T @ X - torch.eye(5, dtype=torch.float64)).abs().max() < 1e-9


def test_residuals_below_default_tol_and_counts_matvecs():
    A = DenseOperator(separated())
    res = spectra.eigsh(A, k=3, generator=gen())
    assert res.all_converged
    norm = 9.0
    assert (true_residuals(A.matrix, res) <= 1e-6 * norm).all()
    assert res.num_matvecs == A.num_matvecs


def test_smallest_algebraic_finds_negative_eigenvalues():
    A = separated()
    A = -A  # spectrum now has outliers -9, -7, ...
    ev = torch.linalg.eigvalsh(A)
    res = spectra.eigsh(A, k=4, which="SA", tol=1e-10, generator=gen())
    assert (res.eigenvalues < 0).all()
    assert rel_err(res.eigenvalues, ev[:4]) < 1e-8
    assert torch.all(res.eigenvalues[1:] >= res.eigenvalues[:-1])  # ascending


def test_largest_magnitude():
    evals = torch.cat([torch.tensor([-8.0, 6.0, -5.0]), torch.linspace(-1, 1, 197)]).double()
    A = with_spectrum(evals, seed=26)
    res = spectra.eigsh(A, k=3, which="LM", tol=1e-10, generator=gen())
    torch.testing.assert_close(res.eigenvalues, torch.tensor([-8.0, 6.0, -5.0], dtype=torch.float64))


@pytest.mark.parametrize("k,d", [(30, 300), (50, 500)])
def test_many_eigenpairs_converge_without_tuning(k, d):
    A = goe(d, seed=27)
    want = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = spectra.eigsh(A, k=k, tol=1e-8, generator=gen())
    assert res.all_converged
    # Eigenvalue errors are at most the residual, tol * ||A||.
    assert float((res.eigenvalues - want).abs().max()) < 1e-8 * float(want.abs().max())
    assert res.num_matvecs < 5 * d


def test_k_equal_d_and_tiny_operators():
    A = goe(6, seed=28)
    res = spectra.eigsh(A, k=6, generator=gen())
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0))
    assert res.all_converged
    res = spectra.eigsh(torch.tensor([[2.0]], dtype=torch.float64), k=1, generator=gen())
    assert res.eigenvalues.tolist() == [2.0]


def test_invariant_subspace_low_rank():
    g = gen(29)
    X = torch.randn(80, 3, generator=g, dtype=torch.float64)
    A = X @ X.T
    res = spectra.eigsh(A, k=3, tol=1e-10, generator=gen())
    assert res.all_converged
    assert rel_err(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3]) < 1e-10


def test_float32_and_scipy_operators():
    A = separated(200)
    want = torch.linalg.eigvalsh(A).flip(0)[:2]
    res32 = spectra.eigsh(A.float(), k=2, tol=1e-5, generator=gen())
    assert res32.eigenvectors.dtype == torch.float32
    assert rel_err(res32.eigenvalues, want) < 1e-5
    res_sp = spectra.eigsh(sla.aslinearoperator(A.numpy()), k=2, tol=1e-10, generator=gen())
    assert rel_err(res_sp.eigenvalues, want) < 1e-10


def test_max_steps_reports_unconverged(caplog):
    A = clustered(300)
    with caplog.at_level(logging.WARNING, logger="spectra"):
        res = spectra.eigsh(A, k=5, tol=1e-12, max_iter=30, generator=gen())
    assert res.num_matvecs == 30
    assert not res.all_converged
    assert "not converged" in caplog.text


def test_deterministic_given_generator_and_global_rng_untouched():
    A = goe(100, seed=30)
    state = torch.get_rng_state()
    a = spectra.eigsh(A, k=2, generator=gen(5))
    b = spectra.eigsh(A, k=2, generator=gen(5))
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input():
    A = goe(10)
    with pytest.raises(ValueError, match="k=11 exceeds"):
        spectra.eigsh(A, k=11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        spectra.eigsh(A, k=0)
    with pytest.raises(ValueError, match="which"):
        spectra.eigsh(A, which="BE")
    with pytest.raises(ValueError, match="op must be a square"):
        spectra.eigsh(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="tol"):
        spectra.eigsh(A, tol=0)
    with pytest.raises(ValueError, match="num_lanczos_vectors"):
        spectra.eigsh(A, k=3, num_lanczos_vectors=3)
    with pytest.raises(ValueError, match="max_iter"):
        spectra.eigsh(A, k=3, max_iter=2)
    with pytest.raises(TypeError, match="max_steps"):  # the pre-0.2 name is gone (CHANGELOG)
        spectra.eigsh(A, k=1, max_steps=200)
    with pytest.raises(TypeError):  # k is keyword-only
        spectra.power_iteration(A, 2)
    with pytest.raises(ValueError, match="k=11 exceeds"):
        spectra.power_iteration(A, k=11)


def test_power_iteration_deflation_with_exact_residuals():
    A = DenseOperator(separated())
    res = spectra.power_iteration(A, k=3, tol=1e-5, max_iter=500, generator=gen())
    want = torch.tensor([9.0, 7.0, 5.0], dtype=torch.float64)
    assert res.all_converged
    assert rel_err(res.eigenvalues, want) < 1e-4
    assert res.num_matvecs == A.num_matvecs
    torch.testing.assert_close(true_residuals(A.matrix, res), res.residuals)
    # Fewer products for a tighter answer with eigsh.
    tight = spectra.eigsh(A, k=3, tol=1e-8, generator=gen())
    assert tight.num_matvecs < res.num_matvecs
    assert rel_err(tight.eigenvalues, want) < 1e-12


def test_restart_in_place_by_column_chunks(monkeypatch):
    """The thick restart rotates the basis in place a chunk of columns at a time (no second
    basis in memory): with chunks of a few columns the pairs equal those of one chunk, and the
    eigenvectors are contiguous ``(d, k)``."""
    import spectra._utils as utils

    g = torch.Generator().manual_seed(0)
    Qr, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=g))
    A = Qr @ torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64) ** 3) @ Qr.T
    kw = dict(k=4, num_lanczos_vectors=10, tol=1e-10, generator=None)
    whole = spectra.eigsh(A, **{**kw, "generator": torch.Generator().manual_seed(1)})
    monkeypatch.setattr(utils, "_CHUNK_BYTES", 10 * 8 * 7)  # 7 columns per chunk
    chunked = spectra.eigsh(A, **{**kw, "generator": torch.Generator().manual_seed(1)})
    assert whole.all_converged and chunked.all_converged
    torch.testing.assert_close(chunked.eigenvalues, whole.eigenvalues, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.eigenvectors.abs(), whole.eigenvectors.abs(), rtol=0, atol=1e-8)
    assert chunked.eigenvectors.is_contiguous() and chunked.eigenvectors.shape == (200, 4)
    top = torch.linalg.eigvalsh(A).flip(0)[:4]
    torch.testing.assert_close(chunked.eigenvalues, top, rtol=0, atol=1e-10)


def test_progress_bar_counts_the_products_and_changes_nothing(capsys):
    A = goe(60)
    quiet = spectra.eigsh(A, k=2, tol=1e-8, generator=gen())
    assert capsys.readouterr().err == ""
    shown = spectra.eigsh(A, k=2, tol=1e-8, generator=gen(), progress=True)
    err = capsys.readouterr().err
    assert torch.equal(shown.eigenvalues, quiet.eigenvalues)
    assert "eigsh (LA, k=2)" in err and f"{quiet.num_matvecs}/" in err and "converged=2/2" in err
