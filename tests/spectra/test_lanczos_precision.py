"""Lanczos and eigsh on low-precision operators and on spectra with a huge outlier.

The recurrence runs in at least float32 whatever the operator's dtype, breakdowns are judged at
the current step's scale, and a pair is reported converged only on a residual that bounds the
true one (breakdown couplings included).
"""

from __future__ import annotations

import torch

import spectra

DT = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def outlier_matrix(d=301, outlier=1e5, seed=1):
    g = gen(seed)
    vals = torch.cat([torch.tensor([outlier], dtype=DT), torch.rand(d - 1, generator=g, dtype=DT)])
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return (Q * vals) @ Q.T, torch.sort(vals, descending=True).values


def test_eigsh_on_a_bfloat16_diagonal():
    A = torch.diag(torch.linspace(0.01, 1.0, 200)).to(torch.bfloat16)
    res = spectra.eigsh(A, k=1, tol=1e-2, generator=gen())
    assert res.eigenvectors.dtype == torch.float32
    assert abs(res.eigenvalues[0].item() - 1.0) <= 1e-2  # the bfloat16 code returned 0.53, "converged"
    x = res.eigenvectors[:, 0]
    true = ((A.float() @ x.to(torch.bfloat16).float()) - res.eigenvalues[0].float() * x).norm().item()
    assert res.converged[0] and true <= 1e-2


def test_lanczos_on_bfloat16_runs_in_float32_without_false_breakdowns():
    vals = torch.linspace(0.01, 1.0, 200)
    A = torch.diag(vals).to(torch.bfloat16)
    res = spectra.lanczos(A, num_steps=30, num_probes=2, generator=gen(), return_basis=True)
    assert res.basis.dtype == torch.float32
    assert int(res.num_breakdowns.sum()) == 0
    nodes, _ = res.quadrature()
    assert abs(nodes.max().item() - 1.0) <= 1e-2


def test_float32_outlier_far_above_the_bulk():
    M, want = outlier_matrix()
    res = spectra.lanczos(M.float(), num_steps=60, generator=gen())
    assert int(res.num_breakdowns.sum()) == 0  # the bulk is not an invariant subspace
    top = spectra.eigsh(M.float(), k=3, tol=1e-6, generator=gen())
    # float32 products resolve the bulk to about eps32 * 1e5 ~ 1e-2 (the old test: 0.77 for 0.999)
    assert (top.eigenvalues - want[:3]).abs().max().item() <= 2e-2
    # The reported residuals bound the true ones (up to float32 rounding of the products).
    X = top.eigenvectors.double()
    true = (M @ X - X * top.eigenvalues).norm(dim=0)
    assert (true <= top.residuals + 1e-4 * 1e5).all()


def test_float64_unchanged():
    M, want = outlier_matrix(d=120)
    res = spectra.eigsh(M, k=3, tol=1e-10, generator=gen())
    assert res.all_converged
    assert (res.eigenvalues - want[:3]).abs().max().item() <= 1e-9 * 1e5
