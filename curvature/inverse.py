"""Damped inverses of any operator: ``(A + λ I)⁻¹`` applied by batched conjugate gradients
(symmetric positive definite systems) or MINRES (symmetric indefinite systems)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor

from .checks import check_count, check_damping, check_real
from .linear_operator import LinearOperator, as_operator

__all__ = ["inverse", "CGInverse", "CGInfo", "MINRESInverse", "NegativeCurvatureError", "SolveProgress"]

logger = logging.getLogger(__name__)

#: A preconditioner: an operator (or anything :func:`curvature.as_operator` accepts, e.g. a SciPy
#: operator), a ``(d,)`` diagonal, or a callable on ``(d, k)`` blocks.
Preconditioner = Union[None, Tensor, LinearOperator, Callable[[Tensor], Tensor]]

METHODS = ("cg", "minres")

#: Seconds between INFO progress lines of a long solve.
LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class SolveProgress:
    """What a solver's ``callback`` receives after every iteration.

    Attributes:
        solver: ``"cg"`` or ``"minres"``.
        iteration: iterations done (1-based).
        active: columns still iterating.
        max_relative_residual: the largest ``||r|| / ||b||`` of the active columns.
        num_matvecs: columns multiplied so far in this solve.
    """

    solver: str
    iteration: int
    active: int
    max_relative_residual: float
    num_matvecs: int


class _Progress:
    """Progress of one solve: the optional ``callback``, a tqdm bar (``progress=True``) and an INFO
    line every :data:`LOG_EVERY_SECONDS` and at the end, so a long solve is never silent."""

    def __init__(self, solver: str, k: int, d: int, max_iter: int, callback: Any, progress: bool):
        self.solver, self.k, self.max_iter, self.callback = solver, k, max_iter, callback
        self.start = self.last_log = time.monotonic()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_iter, desc=solver.upper(), unit="it", leave=False)
        logger.debug("%s: solving %d right-hand sides of dimension %d (max_iter=%d)", solver, k, d, max_iter)

    def step(self, iteration: int, residuals: Tensor, b_norm: Tensor, num_matvecs: int) -> None:
        if self.callback is None and self.bar is None and not logger.isEnabledFor(logging.INFO):
            return
        rel = float((residuals / b_norm.clamp_min(torch.finfo(b_norm.dtype).tiny)).max()) if residuals.numel() else 0.0
        info = SolveProgress(self.solver, iteration, int(residuals.numel()), rel, num_matvecs)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(active=info.active, residual=f"{rel:.2e}", refresh=False)
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            logger.info("%s: iteration %d of at most %d, %d of %d columns active, max relative residual %.3g",
                        self.solver.upper(), iteration, self.max_iter, info.active, self.k, rel)
        if self.callback is not None:
            self.callback(info)

    def close(self, info: CGInfo) -> None:
        if self.bar is not None:
            self.bar.close()
        logger.info("%s: %d iterations, %d matvecs, %.1f s, max relative residual %.3g", self.solver.upper(),
                    info.max_iterations, info.num_matvecs, time.monotonic() - self.start,
                    max(info.relative_residuals, default=0.0))
NEGATIVE_CURVATURE_ACTIONS = ("raise", "stop")


class NegativeCurvatureError(ValueError):
    """CG met a direction with ``pᵀ(A + λI)p <= 0``: the damped operator is not positive definite.

    Attributes:
        column: the right-hand side (column) that met it.
        iteration: the CG iteration (1-based).
        curvature: the value of ``pᵀ(A + λI)p``.
        damping: ``λ``.
    """

    def __init__(self, column: int, iteration: int, curvature: float, damping: float):
        self.column, self.iteration, self.curvature, self.damping = column, iteration, curvature, damping
        super().__init__(
            f"conjugate gradients met non-positive curvature pᵀ(A + λI)p = {curvature:.3g} <= 0 "
            f"(column {column}, iteration {iteration}, damping λ = {damping:g}): A + λI is not positive "
            "definite, so CG cannot solve it. Fixes: use a positive semi-definite curvature (curvature.GGN "
            "or curvature.Fisher instead of curvature.Hessian); or a damping above |λ_min(A)| "
            "(spectra.eigsh(op, k=1, which='SA') gives λ_min); or method='minres' for a symmetric "
            "indefinite system"
        )


@dataclass(frozen=True)
class CGInfo:
    """What the last solve of a :class:`CGInverse` did, per right-hand side (column).

    Attributes:
        iterations: CG iterations each column ran until it converged or stopped.
        residual_norms: final ``||b − (A + λI) x||`` from the CG recurrence.
        relative_residuals: ``residual_norms / ||b||`` (0 for ``b = 0``).
        converged: whether each column reached ``tol``.
        breakdown: whether a column stopped on non-positive curvature ``pᵀ(A + λI)p <= 0`` (only
            with ``negative_curvature="stop"``; the default raises :class:`NegativeCurvatureError`).
        num_matvecs: columns multiplied by the operator in this solve.

    Examples:
        >>> info = CGInfo((3,), (1e-9,), (1e-9,), (True,), (False,), 3)
        >>> info.max_iterations, info.all_converged
        (3, True)
    """

    iterations: tuple[int, ...]
    residual_norms: tuple[float, ...]
    relative_residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    breakdown: tuple[bool, ...]
    num_matvecs: int

    @property
    def max_iterations(self) -> int:
        """Iterations of the slowest column (the number of batched products)."""
        return max(self.iterations, default=0)

    @property
    def all_converged(self) -> bool:
        """Whether every column converged."""
        return all(self.converged)


def _solve_info(iterations: Tensor, residuals: Tensor, b_norm: Tensor, converged: Tensor, breakdown: Tensor,
                num_matvecs: int) -> CGInfo:
    """The :class:`CGInfo` of a batched Krylov solve (per-column iterations and residuals)."""
    final, b_norm = residuals.cpu(), b_norm.cpu()
    relative = torch.where(b_norm > 0, final / b_norm.clamp_min(torch.finfo(final.dtype).tiny), 0.0)
    return CGInfo(
        iterations=tuple(iterations.tolist()),
        residual_norms=tuple(final.tolist()),
        relative_residuals=tuple(relative.tolist()),
        converged=tuple(converged.tolist()),
        breakdown=tuple(breakdown.tolist()),
        num_matvecs=num_matvecs,
    )


def _solver_operator(op: Any, tol: Any, solver: str) -> tuple[LinearOperator, float]:
    """The symmetric operator and relative residual tolerance ``0 < tol < 1`` of a Krylov solve."""
    tol = check_real(tol, name="tol", low=0.0, high=1.0, low_open=True, high_open=True)
    op = as_operator(op)
    if not getattr(op, "is_symmetric", True):
        raise ValueError(f"op must be symmetric for {solver}")
    return op, tol


class CGInverse(LinearOperator):
    """``(op + damping · I)⁻¹`` as an operator: ``@`` runs preconditioned conjugate gradients.

    All right-hand sides of a ``(d, k)`` block are solved together: each iteration does ONE
    ``op @ P`` with the still-active columns, with per-column step sizes and convergence. A column
    stops when ``||r|| <= tol · ||b||``. :attr:`last_info` (:class:`CGInfo`) records the last solve;
    columns that did not converge are logged as a warning, not raised, so a partial answer is
    still returned.

    ``op + damping · I`` must be symmetric positive definite (a Hessian needs damping above its
    most negative eigenvalue). A direction with ``pᵀ(A + λI)p <= 0`` raises
    :class:`NegativeCurvatureError`, naming the fixes (a GGN, more damping, ``method="minres"``);
    with ``negative_curvature="stop"`` that column stops instead, returns its last iterate and is
    flagged in :attr:`CGInfo.breakdown`.

    Args:
        op: any operator accepted by :func:`curvature.as_operator` (our operators, a square tensor,
            a SciPy ``LinearOperator``).
        damping: ``λ > 0``.
        tol: relative residual tolerance.
        max_iter: iteration limit per solve (default ``10 d``).
        preconditioner: approximation of ``(op + λI)⁻¹``, symmetric positive definite: an operator
            (for example an :class:`~curvature.mfac.MFACInverse`), a square tensor, a ``(d,)``
            tensor applied elementwise (for Jacobi pass ``1 / (diag(op) + λ)``) or a callable
            mapping a ``(d, k)`` tensor to a ``(d, k)`` tensor.
        negative_curvature: ``"raise"`` (default) or ``"stop"``.
        callback: called after every iteration with a :class:`SolveProgress`.
        progress: a tqdm bar over the iterations (off by default). Whatever these are, a solve
            logs its progress at INFO every :data:`LOG_EVERY_SECONDS` and a summary at the end.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> inv = CGInverse(A, damping=1.0, tol=1e-12)
        >>> x = inv @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> [round(v, 6) for v in x.tolist()], inv.last_info.iterations
        ([0.363636, -0.090909], (2,))
    """

    def __init__(
        self,
        op: Any,
        *,
        damping: float,
        tol: float = 1e-6,
        max_iter: int | None = None,
        preconditioner: Preconditioner = None,
        negative_curvature: str = "raise",
        callback: Callable[[SolveProgress], None] | None = None,
        progress: bool = False,
    ):
        damping = check_damping(damping)
        if negative_curvature not in NEGATIVE_CURVATURE_ACTIONS:
            raise ValueError(
                f"negative_curvature must be one of {NEGATIVE_CURVATURE_ACTIONS}, got {negative_curvature!r}"
            )
        self.negative_curvature = negative_curvature
        op, tol = _solver_operator(op, tol, "conjugate gradients")
        super().__init__(op.shape[0], op.dtype, op.device, op.blocks)
        d = op.shape[0]
        self.op = op
        self.damping = damping
        self.tol = float(tol)
        self.max_iter = 10 * d if max_iter is None else check_count(max_iter, name="max_iter")
        self.callback, self.progress = _check_callback(callback), bool(progress)
        self._precondition = self._make_preconditioner(preconditioner)
        self.last_info: CGInfo | None = None

    def _make_preconditioner(self, pre: Preconditioner) -> Callable[[Tensor], Tensor] | None:
        d = self.shape[0]
        if pre is None:
            return None
        if isinstance(pre, Tensor) and pre.ndim == 1:
            if pre.shape[0] != d:
                raise ValueError(f"a diagonal preconditioner must have shape ({d},), got {tuple(pre.shape)}")
            diag = pre.to(dtype=self.dtype, device=self.device)[:, None]
            return lambda R: diag * R
        if isinstance(pre, (Tensor, LinearOperator)) or hasattr(pre, "shape"):
            pre_op = as_operator(pre)
            if pre_op.shape != self.shape:
                raise ValueError(f"preconditioner has shape {pre_op.shape}, expected {self.shape}")
            return pre_op.matmat
        if callable(pre):
            return pre
        raise TypeError(
            f"preconditioner must be None, a (d,) tensor, an operator or a callable, got {type(pre).__name__}"
        )

    def _apply(self, P: Tensor) -> Tensor:
        return self.op.matmat(P) + self.damping * P

    def _matmat(self, B: Tensor) -> Tensor:
        k = B.shape[1]
        X = torch.zeros_like(B)
        iterations = torch.zeros(k, dtype=torch.long, device=B.device)
        breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
        b_norm = torch.linalg.vector_norm(B, dim=0)
        threshold = self.tol * b_norm
        final_res = b_norm.clone()
        num_matvecs = 0

        # Working set: only columns still iterating, compacted when some finish.
        cols = torch.nonzero(final_res > threshold).flatten()
        R = B[:, cols].clone()
        Z = self._precondition(R) if self._precondition else R
        P = Z.clone()
        rz = (R * Z).sum(0)
        Xw = torch.zeros_like(R)
        progress = _Progress("cg", k, self.shape[0], self.max_iter, self.callback, self.progress)
        for it in range(self.max_iter):
            if cols.numel() == 0:
                break
            AP = self._apply(P)
            num_matvecs += P.shape[1]
            pAp = (P * AP).sum(0)
            bad = pAp <= 0
            if self.negative_curvature == "raise" and bool(bad.any()):
                j = int(torch.nonzero(bad)[0])
                raise NegativeCurvatureError(int(cols[j]), int(iterations[cols[j]]) + 1, float(pAp[j]), self.damping)
            alpha = torch.where(bad, torch.zeros_like(rz), rz / torch.where(bad, torch.ones_like(pAp), pAp))
            Xw.add_(P * alpha)
            R.sub_(AP * alpha)
            iterations[cols] += 1
            res = torch.linalg.vector_norm(R, dim=0)
            progress.step(it + 1, res, b_norm[cols], num_matvecs)
            done = bad | (res <= threshold[cols])
            if bool(done.any()):
                idx = cols[done]
                X[:, idx] = Xw[:, done]
                final_res[idx] = res[done]
                breakdown[idx] = bad[done]
                keep = ~done
                cols, R, Xw, P, rz, res = cols[keep], R[:, keep], Xw[:, keep], P[:, keep], rz[keep], res[keep]
                if cols.numel() == 0:
                    break
            Z = self._precondition(R) if self._precondition else R
            rz_new = (R * Z).sum(0)
            P = Z + P * (rz_new / rz)
            rz = rz_new
        if cols.numel():
            X[:, cols] = Xw
            final_res[cols] = torch.linalg.vector_norm(R, dim=0)

        converged = (final_res <= threshold) & ~breakdown
        self.last_info = _solve_info(iterations, final_res, b_norm, converged, breakdown, num_matvecs)
        progress.close(self.last_info)
        if not self.last_info.all_converged:
            failed = [i for i, c in enumerate(self.last_info.converged) if not c]
            logger.warning(
                "CG did not converge for %d of %d columns (first: %s; max relative residual %.3g; "
                "breakdowns: %d) within max_iter=%d",
                len(failed), k, failed[:5], max(self.last_info.relative_residuals[i] for i in failed),
                int(breakdown.sum()), self.max_iter,
            )
        return X

    def __repr__(self) -> str:
        return f"CGInverse(op={self.op!r}, damping={self.damping:g}, tol={self.tol:g}, max_iter={self.max_iter})"


class MINRESInverse(LinearOperator):
    """``(op + damping · I)⁻¹`` for a symmetric, possibly indefinite ``op + damping · I``: batched
    MINRES (Paige and Saunders, 1975).

    MINRES minimises ``||b − (A + λI) x||`` over the Krylov space, so it needs only symmetry, not
    definiteness (a Hessian with negative eigenvalues and a small damping is fine, as long as
    ``A + λI`` is not singular). Like :class:`CGInverse` all columns share one product per
    iteration and stop on their own at ``||r|| <= tol · ||b||`` (the recurrence's residual norm);
    :attr:`last_info` is a :class:`CGInfo` (``breakdown`` always false). No preconditioner.
    ``callback`` and ``progress`` as for :class:`CGInverse` (progress is logged at INFO).

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
        >>> inv = MINRESInverse(A, damping=0.5, tol=1e-12)
        >>> [round(v, 6) for v in (inv @ torch.ones(3, dtype=torch.float64)).tolist()]
        [0.666667, -0.4, 0.4]
    """

    def __init__(
        self,
        op: Any,
        *,
        damping: float,
        tol: float = 1e-6,
        max_iter: int | None = None,
        callback: Callable[[SolveProgress], None] | None = None,
        progress: bool = False,
    ):
        damping = check_damping(damping)
        op, tol = _solver_operator(op, tol, "MINRES")
        super().__init__(op.shape[0], op.dtype, op.device, op.blocks)
        d = op.shape[0]
        self.op, self.damping, self.tol = op, damping, float(tol)
        self.max_iter = 10 * d if max_iter is None else check_count(max_iter, name="max_iter")
        self.callback, self.progress = _check_callback(callback), bool(progress)
        self.last_info: CGInfo | None = None

    def _matmat(self, B: Tensor) -> Tensor:
        k = B.shape[1]
        X = torch.zeros_like(B)
        iterations = torch.zeros(k, dtype=torch.long, device=B.device)
        b_norm = torch.linalg.vector_norm(B, dim=0)
        threshold = self.tol * b_norm
        final_res = b_norm.clone()
        num_matvecs = 0
        tiny = torch.finfo(B.dtype).tiny

        cols = torch.nonzero(final_res > threshold).flatten()
        R1 = B[:, cols].clone()
        R2, Y = R1.clone(), R1.clone()
        Xw, W, W2 = torch.zeros_like(R1), torch.zeros_like(R1), torch.zeros_like(R1)
        beta = b_norm[cols].clone()
        oldb, dbar, epsln = torch.zeros_like(beta), torch.zeros_like(beta), torch.zeros_like(beta)
        phibar, cs, sn = beta.clone(), -torch.ones_like(beta), torch.zeros_like(beta)
        progress = _Progress("minres", k, self.shape[0], self.max_iter, self.callback, self.progress)
        for it in range(self.max_iter):
            if cols.numel() == 0:
                break
            V = Y / beta
            Y = self.op.matmat(V) + self.damping * V
            num_matvecs += V.shape[1]
            if it:
                Y = Y - R1 * (beta / oldb)
            alfa = (V * Y).sum(0)
            Y = Y - R2 * (alfa / beta)
            R1, R2 = R2, Y
            oldb, beta = beta, torch.linalg.vector_norm(Y, dim=0)
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            W1, W2 = W2, W
            W = (V - W1 * oldeps - W2 * delta) / gamma
            Xw = Xw + W * phi
            iterations[cols] += 1
            res = phibar.abs()
            progress.step(it + 1, res, b_norm[cols], num_matvecs)
            done = (res <= threshold[cols]) | (beta <= tiny)
            if bool(done.any()):
                idx = cols[done]
                X[:, idx] = Xw[:, done]
                final_res[idx] = res[done]
                keep = ~done
                cols, R1, R2, Y = cols[keep], R1[:, keep], R2[:, keep], Y[:, keep]
                Xw, W, W2 = Xw[:, keep], W[:, keep], W2[:, keep]
                beta, oldb, dbar, epsln = beta[keep], oldb[keep], dbar[keep], epsln[keep]
                phibar, cs, sn = phibar[keep], cs[keep], sn[keep]
        if cols.numel():
            X[:, cols] = Xw
            final_res[cols] = phibar.abs()
        converged = final_res <= threshold
        self.last_info = _solve_info(iterations, final_res, b_norm, converged, torch.zeros_like(converged), num_matvecs)
        progress.close(self.last_info)
        if not self.last_info.all_converged:
            logger.warning("MINRES did not converge for %d of %d columns within max_iter=%d",
                           k - int(converged.sum()), k, self.max_iter)
        return X

    def __repr__(self) -> str:
        return f"MINRESInverse(op={self.op!r}, damping={self.damping:g}, tol={self.tol:g}, max_iter={self.max_iter})"


def inverse(
    op: Any,
    *,
    damping: float,
    method: str = "cg",
    tol: float = 1e-6,
    max_iter: int | None = None,
    preconditioner: Preconditioner = None,
    negative_curvature: str = "raise",
    callback: Callable[[SolveProgress], None] | None = None,
    progress: bool = False,
) -> CGInverse | MINRESInverse:
    """The damped inverse ``(op + damping · I)⁻¹`` of any operator, applied matrix-free.

    ``method="cg"`` returns a :class:`CGInverse`: batched preconditioned conjugate gradients over
    all right-hand sides at once, with the last solve's iterations and residuals in
    ``.last_info``; ``op + damping · I`` must be positive definite (negative curvature raises
    :class:`NegativeCurvatureError`, or stops the column with ``negative_curvature="stop"``).
    ``method="minres"`` returns a :class:`MINRESInverse` for symmetric indefinite systems (no
    preconditioner). ``callback`` (a :class:`SolveProgress` per iteration) and ``progress`` (a tqdm
    bar, off by default) follow a long solve; it is also logged at INFO.

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
        >>> inv = inverse(A, damping=1.0)
        >>> (inv @ torch.tensor([2.0, 4.0], dtype=torch.float64)).tolist()
        [1.0, 1.0]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "minres":
        if preconditioner is not None:
            raise ValueError("method='minres' takes no preconditioner (use method='cg' for a preconditioned solve)")
        return MINRESInverse(op, damping=damping, tol=tol, max_iter=max_iter, callback=callback, progress=progress)
    return CGInverse(op, damping=damping, tol=tol, max_iter=max_iter, preconditioner=preconditioner,
                     negative_curvature=negative_curvature, callback=callback, progress=progress)


def _check_callback(callback: Any) -> Any:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return callback
