"""Deflated power iteration (the HAWQ-V1 / PyHessian method), kept for comparison with eigsh."""

from __future__ import annotations

from typing import Any

import torch

from curvature import as_operator
from curvature.checks import check_count, check_tolerance
from curvature.probes import draw_probes, make_generator

from .results import EigenResult

__all__ = ["power_iteration"]


def power_iteration(
    op: Any,
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs (largest magnitude) by power iteration with deflation.

    The method of HAWQ-V1 and PyHessian's ``hessian.eigenvalues``: for each pair, start from a
    Gaussian vector and repeat ``v ← H v/‖H v‖`` after projecting out the pairs already found,
    until the relative residual of the deflated operator is ``≤ tol·|λ|`` (the same meaning of ``tol`` as in
    :func:`spectra.eigsh` and :func:`curvature.inverse`) or ``max_iter`` products. Convergence is
    linear in ``|λ_{i+1}/λ_i|``, so close eigenvalues take many products; prefer
    :func:`spectra.eigsh`.

    The returned pair is the last iterate ``v`` with its Rayleigh quotient ``λ = vᵀHv``, so the
    residual ``‖Hv − λv‖`` is exact and costs no extra product.

    Args:
        op: symmetric ``(d, d)`` operator.
        k: number of eigenpairs, ``1 <= k <= d``.
        max_iter: products per eigenpair at most.
        tol: relative residual that stops the iteration.
        generator: source of the start vectors (default: a fresh OS-seeded generator).

    Returns:
        :class:`EigenResult`; ``residuals`` are the true ``‖Hv − λv‖``, ``converged`` says the
        deflated operator's relative residual passed ``tol``.

    Examples:
        >>> A = torch.diag(torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = power_iteration(A, k=1, generator=torch.Generator().manual_seed(0))
        >>> round(res.eigenvalues.item(), 3), bool(res.converged)
        (5.0, True)
    """
    A = as_operator(op)
    d = A.shape[0]
    dtype, device = A.dtype, A.device
    k = check_count(k, name="k", dim=d)
    max_iter = check_count(max_iter, name="max_iter")
    tol = check_tolerance(tol)
    generator = make_generator(generator, device)

    found = torch.zeros(d, 0, dtype=dtype, device=device)
    values, residuals, flags = [], [], []
    matvecs_before = A.num_matvecs
    for _ in range(k):
        v = draw_probes(d, 1, "normal", dtype=torch.float64, device=device, generator=generator)[:, 0].to(dtype)
        v = v / torch.linalg.vector_norm(v)
        lam, res, ok = 0.0, float("inf"), False
        for it in range(max_iter):
            v = v - found @ (found.T @ v)
            v = v / torch.linalg.vector_norm(v)
            Hv = A @ v
            # Iterate with the deflated operator (I - P) H (I - P) and test its residual: the
            # found vectors carry errors of size ~tol, which would otherwise put a floor under
            # the residual of every later pair. The reported residual is the true ||Hv - λv||.
            Hd = Hv - found @ (found.T @ Hv)
            lam = float(torch.dot(v.to(torch.float64), Hv.to(torch.float64)))
            res = float(torch.linalg.vector_norm((Hv - lam * v).to(torch.float64)))
            norm = torch.linalg.vector_norm(Hd)
            # A zero product: v lies in the null space of the deflated operator, an exact pair.
            ok = float(torch.linalg.vector_norm((Hd - lam * v).to(torch.float64))) <= tol * abs(lam) or norm == 0
            if ok or it == max_iter - 1:
                break
            v = Hd / norm
        found = torch.cat([found, v[:, None]], dim=1)
        values.append(lam)
        residuals.append(res)
        flags.append(ok)

    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=found,
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(flags, dtype=torch.bool),
        num_matvecs=A.num_matvecs - matvecs_before,
    )
