"""Deflated power iteration (the HAWQ-V1 / PyHessian method), kept for comparison with eigsh."""

from __future__ import annotations

from typing import Any

import torch

from ._utils import as_square_operator, check_generator, check_positive_int
from .results import EigenResult

__all__ = ["power_iteration"]


def power_iteration(
    op: Any,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-``k`` eigenpairs (largest magnitude) by power iteration with deflation.

    Follows PyHessian's ``hessian.eigenvalues``: for each pair, start from a Gaussian vector, and
    repeat ``v ← H v/‖H v‖`` after projecting out the pairs already found, until the Rayleigh
    quotient changes by less than ``tol`` relative (``|Δλ|/(|λ| + 1e-6)``) or ``max_iter``
    products. Convergence is linear in ``|λ_{i+1}/λ_i|``, so close eigenvalues take many
    products and the answer is only as good as ``tol``; prefer :func:`spectra.eigsh`.

    The returned pair is the last iterate ``v`` with its Rayleigh quotient ``λ = vᵀHv``, so the
    residual ``‖Hv − λv‖`` is exact and costs no extra product.

    Args:
        op: symmetric ``(d, d)`` operator.
        k: number of eigenpairs, ``1 <= k <= d``.
        max_iter: products per eigenpair at most.
        tol: relative change of the eigenvalue estimate that stops the iteration.
        generator: source of the start vectors.

    Returns:
        :class:`EigenResult` (``converged`` means the ``tol`` test passed, not a residual bound).

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = power_iteration(A, 1, generator=torch.Generator().manual_seed(0))
        >>> round(res.eigenvalues.item(), 3)
        5.0
    """
    A = as_square_operator(op)
    d = A.shape[0]
    dtype, device = A.dtype, A.device
    k = check_positive_int(k, "k")
    if k > d:
        raise ValueError(f"k={k} exceeds the operator dimension d={d}")
    max_iter = check_positive_int(max_iter, "max_iter")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    check_generator(generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    found = torch.zeros(d, 0, dtype=dtype, device=device)
    values, residuals, flags = [], [], []
    matvecs_before = A.num_matvecs
    for _ in range(k):
        v = torch.randn(d, generator=generator, device=gen_device, dtype=torch.float64).to(
            dtype=dtype, device=device
        )
        v = v / torch.linalg.vector_norm(v)
        lam, res, ok = None, float("inf"), False
        for it in range(max_iter):
            v = v - found @ (found.T @ v)
            v = v / torch.linalg.vector_norm(v)
            Hv = A @ v
            new = float(torch.dot(v.to(torch.float64), Hv.to(torch.float64)))
            res = float(torch.linalg.vector_norm((Hv - new * v).to(torch.float64)))
            ok = lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < tol
            lam = new
            norm = torch.linalg.vector_norm(Hv)
            if norm == 0:
                ok = True  # v lies in the null space of the deflated operator: an exact pair
            if ok or it == max_iter - 1:
                break
            v = Hv / norm
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
