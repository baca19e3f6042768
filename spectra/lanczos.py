"""Batched Lanczos tridiagonalization: several probes advance in lockstep through ``op @ V``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from curvature import as_operator, in_working_precision
from curvature.checks import check_count
from curvature.probes import draw_probes, make_generator

from ._utils import column_norm64, default_breakdown_tol, orthogonalize_, row_dot64, row_norm64

__all__ = ["LanczosResult", "lanczos"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Tridiagonal coefficients of one Lanczos run per probe.

    For probe ``p`` the run built an orthonormal basis ``Q_p`` (``m`` rows) with
    ``Q_p H Q_pᵀ = T_p = tridiag(beta[p], alpha[p], beta[p])``. A zero ``beta[p, j]`` marks a
    breakdown (the Krylov space was invariant); the run then continued from a random vector
    orthogonal to the basis so all probes keep the same length, ``T_p`` splits into blocks and
    the quadrature weights of the later blocks are exactly zero.

    Attributes:
        alpha: ``(num_probes, m)`` float64 diagonal of ``T``.
        beta: ``(num_probes, m - 1)`` float64 off-diagonal of ``T``.
        start_norms: ``(num_probes,)`` float64 norms ``‖v‖`` of the start vectors (``√d`` for
            the default Rademacher probes); trace estimates scale by ``‖v‖²``.
        num_matvecs: operator columns multiplied (``m · num_probes``).
        num_breakdowns: ``(num_probes,)`` int64 number of breakdowns (restarts) per probe.
        dim: the operator dimension ``d``.
        basis: ``(num_probes, m, d)`` Lanczos vectors in the working dtype (rows of ``Q_p``),
            or ``None`` unless requested with ``return_basis=True``.

    Examples:
        >>> res = lanczos(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)), num_steps=4,
        ...               generator=torch.Generator().manual_seed(0))
        >>> res.quadrature()[0].round(decimals=6).tolist()
        [[1.0, 2.0, 3.0, 4.0]]
    """

    alpha: Tensor
    beta: Tensor
    start_norms: Tensor
    num_matvecs: int
    num_breakdowns: Tensor
    dim: int
    basis: Tensor | None = None

    @property
    def num_probes(self) -> int:
        """Number of probes (independent Lanczos runs)."""
        return int(self.alpha.shape[0])

    @property
    def num_steps(self) -> int:
        """Number of Lanczos steps ``m`` taken per probe."""
        return int(self.alpha.shape[1])

    def tridiagonal(self) -> Tensor:
        """The ``(num_probes, m, m)`` float64 tridiagonal matrices ``T``."""
        T = torch.diag_embed(self.alpha)
        if self.num_steps > 1:
            T = T + torch.diag_embed(self.beta, offset=1) + torch.diag_embed(self.beta, offset=-1)
        return T

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenpairs of each ``T``: Ritz values ``(p, m)`` ascending, eigenvectors ``(p, m, m)``."""
        return torch.linalg.eigh(self.tridiagonal())

    def quadrature(self) -> tuple[Tensor, Tensor]:
        """Gauss quadrature nodes and weights, each ``(num_probes, m)`` float64.

        Nodes are the Ritz values ``θ_k``; weights are ``τ_k = (e_1ᵀ y_k)²`` (squared once) and sum
        to 1, so ``Σ_k τ_k θ_k^j = uᵀ H^j u`` for ``u = v/‖v‖`` and ``j ≤ 2m − 1``.
        """
        nodes, vecs = self.ritz()
        return nodes, vecs[:, 0, :] ** 2

    def ritz_vectors(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``(p, m)`` and Ritz vectors ``(p, m, d)`` (needs ``return_basis=True``)."""
        if self.basis is None:
            raise ValueError("ritz_vectors() needs the basis; run lanczos(..., return_basis=True)")
        nodes, vecs = self.ritz()
        return nodes, torch.bmm(vecs.transpose(1, 2).to(self.basis.dtype), self.basis)


def _start_block(
    v0: Tensor | None,
    num_probes: int | None,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    """The ``(d, p)`` start block: ``v0`` checked, or ``num_probes`` Rademacher vectors."""
    if v0 is None:
        num_probes = check_count(1 if num_probes is None else num_probes, name="num_probes")
        return draw_probes(d, num_probes, "rademacher", dtype=dtype, device=device, generator=generator)
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor, got {type(v0).__name__}")
    if v0.ndim not in (1, 2) or v0.shape[0] != d:
        raise ValueError(f"v0 must have shape ({d},) or ({d}, num_probes), got {tuple(v0.shape)}")
    V = v0.reshape(d, -1).to(dtype=dtype, device=device)
    if V.shape[1] == 0:
        raise ValueError("v0 must have at least one column")
    if num_probes is not None and num_probes != V.shape[1]:
        raise ValueError(f"num_probes={num_probes} does not match v0 with {V.shape[1]} column(s)")
    if not torch.isfinite(V).all():
        raise ValueError("v0 contains NaN or inf")
    if (column_norm64(V) == 0).any():
        raise ValueError("v0 has a zero column; every start vector must be non-zero")
    return V


def _fresh_directions(
    against: Tensor,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Random unit rows ``(p, d)`` orthogonal to the rows of ``against`` (``(p, j, d)``), one per probe."""
    R = draw_probes(d, against.shape[0], "rademacher", dtype=dtype, device=device, generator=generator).T.contiguous()
    orthogonalize_(R, against)
    return R / row_norm64(R).to(dtype)[:, None]


def lanczos(
    op: Any,
    *,
    num_steps: int,
    num_probes: int | None = None,
    v0: Tensor | None = None,
    reorthogonalize: Literal["full", "none"] = "full",
    generator: torch.Generator | None = None,
    return_basis: bool = False,
    breakdown_tol: float | None = None,
    callback: Callable[[int], None] | None = None,
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps from one or several start vectors at once.

    All probes advance in lockstep: each step is ONE product ``op @ V`` with ``V`` of shape
    ``(d, num_probes)``, so an operator that shares work across columns (one autodiff pass for a
    block of vectors) pays once per step. With ``reorthogonalize="full"`` every new vector is
    orthogonalized against the whole basis by classical Gram–Schmidt applied twice, as batched
    matrix products; ``"none"`` is the plain three-term recurrence (O(d) memory, but converged
    outliers reappear as "ghost" Ritz values).

    Precision: the recurrence runs in the operator's dtype, but at least float32: a bfloat16 or
    float16 operator gets float32 vectors, rounded to its dtype for each product (see
    :func:`curvature.precision.in_working_precision`); the coefficients ``alpha``/``beta``
    (inner products and norms) are accumulated in float64.

    Args:
        op: symmetric ``(d, d)`` operator (``curvature.LinearOperator``, tensor, SciPy operator).
        num_steps: Lanczos steps ``m`` per probe; capped at ``d`` (the Krylov space cannot grow
            further).
        num_probes: number of Rademacher start vectors (default 1). Ignored when ``v0`` is given,
            except that it must then match ``v0``'s column count.
        v0: start vector ``(d,)`` or start block ``(d, num_probes)``; need not be normalized.
        reorthogonalize: ``"full"`` (default) or ``"none"``.
        generator: source of the random start vectors and of restart vectors after a breakdown.
        return_basis: keep the ``(num_probes, m, d)`` basis in the result (always stored
            internally with full reorthogonalization).
        breakdown_tol: ``beta_j <= breakdown_tol · ‖H q_j‖`` counts as a breakdown: relative to
            the current step's scale, not to the largest seen, so a bulk far below an outlier
            is not mistaken for an invariant subspace. Default ``max(1e-10, 100·eps)`` of the
            working dtype.
        callback: called with the step index after every step (progress bars).

    Returns:
        A :class:`LanczosResult`.

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> res = lanczos(A, num_steps=2, num_probes=4, generator=torch.Generator().manual_seed(0))
        >>> res.alpha.shape, res.num_matvecs
        (torch.Size([4, 2]), 8)
    """
    A = in_working_precision(as_operator(op))
    d = A.shape[0]
    dtype, device = A.dtype, A.device
    num_steps = check_count(num_steps, name="num_steps")
    generator = make_generator(generator, device)
    if reorthogonalize not in ("full", "none"):
        raise ValueError(f"reorthogonalize must be 'full' or 'none', got {reorthogonalize!r}")
    if breakdown_tol is None:
        breakdown_tol = default_breakdown_tol(dtype)
    elif not breakdown_tol >= 0:
        raise ValueError(f"breakdown_tol must be >= 0, got {breakdown_tol}")

    V = _start_block(v0, num_probes, d, dtype, device, generator)
    p = V.shape[1]

    m = min(num_steps, d)
    if m < num_steps:
        logger.info("lanczos: num_steps=%d exceeds d=%d; running %d steps", num_steps, d, m)

    start_norms = column_norm64(V)
    # Vectors are kept as rows, (p, d) with each probe contiguous: the dot products, norms and
    # Gram–Schmidt products then stream through memory, and ``q.T`` is the (d, p) block the
    # operator takes (a transposed view; operators that want per-column rows get them for free).
    q = (V / start_norms.to(dtype)).T.contiguous()
    keep_basis = reorthogonalize == "full" or return_basis
    Q = torch.empty(p, m, d, dtype=dtype, device=device) if keep_basis else None
    alpha = torch.zeros(p, m, dtype=torch.float64, device=device)
    beta = torch.zeros(p, m - 1, dtype=torch.float64, device=device)
    breakdowns = torch.zeros(p, dtype=torch.int64, device=device)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(p, dtype=torch.float64, device=device)
    matvecs_before = A.num_matvecs

    for j in range(m):
        if Q is not None:
            Q[:, j, :] = q
        w = (A @ q.T).T.contiguous()
        if w.data_ptr() == q.data_ptr():  # an operator may hand back its input (identity)
            w = w.clone()
        a = row_dot64(q, w)
        local = row_norm64(w)  # ‖H q_j‖: the scale this step's coupling is measured against
        alpha[:, j] = a
        # In place: at large d every temporary is a full (p, d) pass over memory.
        w.addcmul_(q, a.to(dtype)[:, None], value=-1)
        if j > 0:
            w.addcmul_(q_prev, b_prev.to(dtype)[:, None], value=-1)
        if reorthogonalize == "full":
            orthogonalize_(w, Q[:, : j + 1, :])
        if callback is not None:
            callback(j)
        if j == m - 1:
            break
        b = row_norm64(w)
        broke = b <= breakdown_tol * local
        b = torch.where(broke, torch.zeros_like(b), b)
        beta[:, j] = b
        q_next = w.div_(torch.where(broke, torch.ones_like(b), b).to(dtype)[:, None])
        if broke.any():
            idx = broke.nonzero().flatten()
            breakdowns[idx] += 1
            # A zero beta decouples T into blocks, so any unit vector orthogonal to the basis
            # keeps the quadrature of the first block exact and adds zero-weight nodes.
            if reorthogonalize == "full":
                against = Q[idx, : j + 1, :]
            else:
                against = torch.stack([q_prev[idx], q[idx]], dim=1)
            q_next[idx] = _fresh_directions(against, d, dtype, device, generator)
            logger.debug("lanczos: breakdown at step %d for probe(s) %s", j, idx.tolist())
        q_prev, q, b_prev = q, q_next, b

    return LanczosResult(
        alpha=alpha,
        beta=beta,
        start_norms=start_norms,
        num_matvecs=A.num_matvecs - matvecs_before,
        num_breakdowns=breakdowns,
        dim=d,
        basis=Q if return_basis else None,
    )
