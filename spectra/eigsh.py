"""Extreme eigenpairs by thick-restarted Lanczos (Wu–Simon), with full reorthogonalization."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

import curvature
from curvature import as_operator, in_working_precision
from curvature.checks import check_choice, check_count, check_tolerance
from curvature.probes import draw_probes, make_generator

from ._utils import column_norm64, combine_rows, default_breakdown_tol, orthogonalize_, row_dot64, row_norm64
from .results import EigenResult

__all__ = ["default_num_lanczos_vectors", "eigsh"]

logger = logging.getLogger(__name__)

_WHICH = ("LA", "SA", "LM")


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def default_num_lanczos_vectors(k: int, d: int, itemsize: int = 8) -> int:
    """Basis size used by :func:`eigsh` when none is given: ``min(d, max(2k + 1, k + 20))``,
    reduced to what fits :data:`curvature.BASIS_BUDGET` (at least ``k + 2`` vectors): at GPT-2
    small (d = 124M, 498 MB a float32 vector) the usual ``k + 20`` vectors would take 12 GB.

    Examples:
        >>> default_num_lanczos_vectors(5, 10_000), default_num_lanczos_vectors(5, 124_439_808, 4)
        (25, 7)
    """
    wanted = min(d, max(2 * k + 1, k + 20))
    fits = curvature.BASIS_BUDGET // max(1, d * itemsize) - 1  # the basis holds m + 1 vectors
    return min(wanted, max(fits, min(d, k + 2)))


def _basis_size(num_lanczos_vectors: int | None, k: int, d: int, itemsize: int = 8) -> int:
    if num_lanczos_vectors is None:
        return default_num_lanczos_vectors(k, d, itemsize)
    m = check_count(num_lanczos_vectors, name="num_lanczos_vectors", dim=d)
    if m <= k and m < d:
        raise ValueError(f"num_lanczos_vectors={m} must exceed k={k} (or equal d={d})")
    return m


def _step_cap(max_iter: int | None, m: int, k: int) -> int:
    if max_iter is None:
        return max(1000, 30 * m)
    max_iter = check_count(max_iter, name="max_iter")
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} must be at least k={k}")
    return max_iter


def _start_vector(
    v0: Tensor | None, d: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """The ``(d, 1)`` start vector: ``v0`` checked, or a Rademacher vector from ``generator``."""
    if v0 is None:
        return draw_probes(d, 1, "rademacher", dtype=dtype, device=device, generator=generator)
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor, got {type(v0).__name__}")
    if v0.shape != (d,):
        raise ValueError(f"v0 must have shape ({d},), got {tuple(v0.shape)}")
    q = v0.to(dtype=dtype, device=device).reshape(d, 1)
    if not torch.isfinite(q).all() or column_norm64(q).item() == 0:
        raise ValueError("v0 must be finite and non-zero")
    return q


def eigsh(
    op: Any,
    *,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    num_lanczos_vectors: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restarted Lanczos.

    Lanczos with full reorthogonalization builds a basis of ``num_lanczos_vectors`` vectors;
    when the wanted Ritz pairs have not converged, the basis is shrunk to the best Ritz vectors
    (more than ``k``, so convergence carries over) plus the residual direction, and extended
    again (Wu & Simon 2000; equivalent to implicitly restarted Lanczos / Krylov–Schur). Each step
    is one product with a single column.

    A pair ``(λ, x)`` is converged when ``‖H x − λ x‖ ≤ tol · ‖H‖``, with ``‖H‖`` estimated by
    the largest Ritz value magnitude. Then ``|λ − λ_true| ≤ tol·‖H‖`` and, for an eigenvalue
    separated by a gap ``g``, ``≤ (tol·‖H‖)²/g``. Residual norms are the Lanczos estimates
    ``|β_m y_m|`` plus the couplings dropped at breakdowns (weighted by ``|y_j|``): a bound on
    the true residual up to rounding (full reorthogonalization), so a pair is never reported
    converged on a recurrence that broke down falsely. A bfloat16/float16 operator runs the
    recurrence in float32 (:func:`curvature.precision.in_working_precision`); its products have
    only ~3 digits, so ask for ``tol`` of about ``1e-2`` there.

    Args:
        op: symmetric ``(d, d)`` operator (``curvature.LinearOperator``, tensor, SciPy operator).
        k: number of eigenpairs, ``1 <= k <= d``.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic, ``"LM"``
            largest magnitude.
        tol: relative residual tolerance (see above); it cannot be met below the operator's
            precision (about ``1e-6`` for float32 products).
        max_iter: cap on operator products (Lanczos steps) over all restarts; default
            ``max(1000, 30 · basis size)``. Pairs not converged by then are returned with
            ``converged=False``.
        num_lanczos_vectors: basis size (ARPACK's ``ncv``); default ``min(d, max(2k + 1, k + 20))``,
            fewer (at least ``k + 2``) where that basis would exceed ``curvature.BASIS_BUDGET``
            (:func:`default_num_lanczos_vectors`).
        v0: start vector ``(d,)``; default a Rademacher vector from ``generator``.
        generator: source of the start vector and of restart vectors after a breakdown
            (default: a fresh OS-seeded generator; the global RNG is never used).
        progress: a tqdm bar over the products (up to ``max_iter``), with the number of pairs
            converged at the last restart.

    Returns:
        :class:`EigenResult` with eigenvalues ordered by ``which``.

    Examples:
        >>> A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
        >>> res = eigsh(A, k=2, generator=torch.Generator().manual_seed(0))
        >>> [round(v, 6) for v in res.eigenvalues.tolist()], res.all_converged
        ([30.0, 29.0], True)
    """
    A = in_working_precision(as_operator(op))  # bfloat16/float16 operators: float32 recurrence
    d = A.shape[0]
    dtype, device = A.dtype, A.device
    k = check_count(k, name="k", dim=d)
    which = check_choice(which, name="which", choices=_WHICH)
    tol = check_tolerance(tol)
    generator = make_generator(generator, device)
    m = _basis_size(num_lanczos_vectors, k, d, torch.empty((), dtype=dtype).element_size())
    max_steps = _step_cap(max_iter, m, k)
    q = _start_vector(v0, d, dtype, device, generator)
    bd_tol = default_breakdown_tol(dtype)

    Q = torch.zeros(m + 1, d, dtype=dtype, device=device)
    Q[0] = (q / column_norm64(q).to(dtype))[:, 0]
    T = torch.zeros(m, m, dtype=torch.float64, device=device)
    # Couplings set to zero at breakdowns, per basis vector: the Lanczos residual estimate omits
    # them, so they are added to it (a bound on the true residual ‖H x − λ x‖).
    dropped = torch.zeros(m, dtype=torch.float64, device=device)
    start, num_mv, norm_est, restarts = 0, 0, 0.0, 0
    matvecs_before = A.num_matvecs
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc=f"eigsh ({which}, k={k})", unit="matvec", leave=False)

    while True:
        m_cur = m
        beta_last = 0.0
        for j in range(start, m):
            w = (A @ Q[j].unsqueeze(1)).reshape(1, d)
            if w.untyped_storage().data_ptr() == Q.untyped_storage().data_ptr():
                w = w.clone()  # an operator may hand back its input (identity); never edit the basis
            num_mv += 1
            if bar is not None:
                bar.update()
            a = float(row_dot64(Q[j : j + 1], w))
            local = float(row_norm64(w))  # ‖H q_j‖: breakdowns are judged at this step's scale
            T[j, j] = a
            # The three-term recurrence first (cheap), so that the Gram–Schmidt pass over the
            # basis only removes rounding and its DGKS second pass is rarely needed. Right after
            # a restart the coupling is an arrow to all kept vectors; Gram–Schmidt handles it.
            w[0].add_(Q[j], alpha=-a)
            if j > start:
                w[0].add_(Q[j - 1], alpha=-float(T[j - 1, j]))
            orthogonalize_(w, Q[: j + 1].unsqueeze(0))
            b = float(row_norm64(w))
            norm_est = max(norm_est, abs(a))
            if j + 1 == d or b <= bd_tol * local:
                # Invariant subspace: its Ritz pairs are exact. Continue (if room is left) from
                # a random direction orthogonal to the basis with a zero coupling.
                dropped[j] += b
                b = 0.0
                if j + 1 < d:
                    r = draw_probes(d, 1, "rademacher", dtype=dtype, device=device, generator=generator).reshape(1, d)
                    orthogonalize_(r, Q[: j + 1].unsqueeze(0))
                    Q[j + 1] = r[0] / float(row_norm64(r))
                else:
                    Q[j + 1] = 0
            else:
                Q[j + 1] = w[0] / b
            if j + 1 < m:
                T[j, j + 1] = T[j + 1, j] = b
            beta_last = b
            if num_mv >= max_steps:
                m_cur = j + 1
                break

        theta, Y = torch.linalg.eigh(T[:m_cur, :m_cur])
        norm_est = max(norm_est, float(theta.abs().max()))
        res = (beta_last * Y[m_cur - 1, :]).abs() + dropped[:m_cur] @ Y.abs()
        order = _order(theta, which)
        wanted = order[:k]
        converged = res[wanted] <= tol * norm_est
        if bar is not None:
            bar.set_postfix(converged=f"{int(converged.sum())}/{k}")
        if bool(converged.all()) or num_mv >= max_steps:
            break

        # Keep the wanted pairs plus half of the rest of the basis: extra Ritz vectors keep the
        # convergence of the next-wanted directions, and the other half is space for new steps.
        keep = min(m_cur - 1, k + (m_cur - k) // 2)
        idx = order[:keep]
        Yk = Y[:, idx]
        combine_rows(Yk.T, Q[:m_cur], Q[:keep])  # in place, chunk by chunk: no second basis
        Q[keep] = Q[m_cur]
        s = beta_last * Y[m_cur - 1, idx]
        kept_dropped = dropped[:m_cur] @ Y[:, idx].abs()
        dropped.zero_()
        dropped[:keep] = kept_dropped
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[idx])
        T[keep, :keep] = s
        T[:keep, keep] = s
        start = keep
        restarts += 1

    if bar is not None:
        bar.close()
    vectors = torch.empty(d, k, dtype=dtype, device=device)
    combine_rows(Y[:, wanted].T, Q[:m_cur], vectors.T)
    logger.debug(
        "eigsh: %d matvecs, %d restarts, converged %s", num_mv, restarts, converged.tolist()
    )
    if not bool(converged.all()):
        logger.warning(
            "eigsh: %d of %d pairs not converged after %d products (max_iter=%d)",
            int((~converged).sum()),
            k,
            num_mv,
            max_steps,
        )
    return EigenResult(
        eigenvalues=theta[wanted].clone(),
        eigenvectors=vectors,
        residuals=res[wanted].clone(),
        converged=converged.clone(),
        num_matvecs=A.num_matvecs - matvecs_before,
    )
