"""Low-rank sketches shared by Hutch++, XTrace and XDiag (float64 bookkeeping).

XTrace/XDiag (Epperly, Tropp, Webber 2024) use every test vector ``ω_i`` twice: in the sketch
``Y = AΩ`` whose range approximates the top of the spectrum, and, left out of that sketch, as a
Hutchinson probe of the remainder.  Leaving ``ω_i`` out of ``span(Y)`` removes one direction
``Q s_i`` of the basis, where ``s_i`` is the normalized ``i``-th column of ``R⁻ᵀ`` (``Y = QR``),
so all ``k`` leave-one-out estimates follow from ``k x k`` matrices in ``O(d k²)`` work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._products import ProductRunner, column_dots

__all__ = ["OrthonormalBasis", "XTraceSketch", "leave_one_out_directions", "xtrace_estimates"]

#: Singular values of ``R`` below this fraction of the largest are treated as zero (a sketch of
#: a matrix whose rank is below the number of test vectors).
_RANK_TOL = 1e-13

#: A new sketch column that keeps less than this fraction of its norm after projection is nearly
#: inside the basis already; its QR direction is then checked against the basis.
_DEFICIENT = 1e-6


class OrthonormalBasis:
    """A growing float64 orthonormal basis ``Q`` of the sketch columns seen so far, and ``R = QᵀY``.

    Blocks are appended by block Gram-Schmidt, applied twice (enough for orthogonality to working
    precision), so earlier columns, and the products already taken with them, stay valid.
    """

    def __init__(self, dim: int, device: torch.device, generator: torch.Generator):
        self.Q = torch.empty(dim, 0, dtype=torch.float64, device=device)
        self.R = torch.empty(0, 0, dtype=torch.float64, device=device)
        self._generator = generator

    def extend(self, Y: Tensor) -> Tensor:
        """Append the range of the ``(d, b)`` block ``Y``; return the ``b`` new basis columns."""
        Y = Y.double()
        Q, k, b = self.Q, self.Q.shape[1], Y.shape[1]
        if k + b > Q.shape[0]:
            raise ValueError(f"a sketch of {k + b} columns exceeds the dimension {Q.shape[0]}")
        C = Q.T @ Y
        W = Y - Q @ C
        C2 = Q.T @ W
        W -= Q @ C2
        C += C2
        # Householder QR returns orthonormal columns even when W is (numerically) rank-deficient.
        Qb, Rb = torch.linalg.qr(W)
        # Twice-projected columns are orthogonal to Q to working precision relative to their own
        # norm; only columns that nearly vanished (Y almost inside span(Q)) need another look.
        if k and bool((Rb.diagonal().abs() <= _DEFICIENT * Y.norm(dim=0).clamp_min(1e-300)).any()):
            Qb = self._orthogonal_to_basis(Qb)
        R = torch.zeros(k + b, k + b, dtype=torch.float64, device=Y.device)
        R[:k, :k] = self.R
        R[:k, k:] = C
        R[k:, k:] = Qb.T @ W
        self.Q = torch.cat([Q, Qb], dim=1)
        self.R = R
        return Qb

    def _orthogonal_to_basis(self, Qb: Tensor) -> Tensor:
        Q = self.Q
        P = Qb - Q @ (Q.T @ Qb)
        P -= Q @ (Q.T @ P)
        lost = P.norm(dim=0) < 0.5
        if bool(lost.any()):
            # When W is zero up to rounding and that rounding lives inside span(Q) (exact zero rows
            # in A, e.g. a low-rank diagonal, or a repeated test vector), QR gives directions
            # already in the basis.  Any direction orthogonal to Q serves: the sketch has no
            # component along it (its row of R is ~0), so the estimators' projectors drop it.
            G = torch.randn(
                Q.shape[0], int(lost.sum()), dtype=torch.float64, device=Q.device, generator=self._generator
            )
            G -= Q @ (Q.T @ G)
            G -= Q @ (Q.T @ G)
            P[:, lost] = G
        return torch.linalg.qr(P).Q


def leave_one_out_directions(R: Tensor) -> Tensor:
    """Columns ``s_i``: unit vectors orthogonal to every column of ``R`` except the ``i``-th.

    They are the normalized columns of ``R⁻ᵀ``.  Computed from an SVD with tiny singular values
    floored, so a singular ``R`` (sketch of rank below ``k``) gives directions in its left null
    space, i.e. directions of the basis that the operator does not reach.
    """
    k = R.shape[0]
    scale = R.abs().max() if R.numel() else R.new_zeros(())
    if k == 0 or float(scale) == 0:
        return torch.eye(k, dtype=R.dtype, device=R.device)
    U, sig, Vh = torch.linalg.svd(R / scale)
    sig = sig.clamp_min(_RANK_TOL * float(sig[0]))
    M = U @ (Vh / sig[:, None])
    return M / M.norm(dim=0, keepdim=True)


def xtrace_estimates(H: Tensor, W: Tensor, R: Tensor, S: Tensor, dim: int, *, normalized: bool) -> Tensor:
    """The ``k`` leave-one-out trace estimates of XTrace for a symmetric operator.

    Args:
        H: ``QᵀAQ`` (``k x k``).
        W: ``QᵀΩ``.
        R: ``QᵀY = QᵀAΩ``.
        S: :func:`leave_one_out_directions` of ``R``.
        dim: ``d``.
        normalized: test vectors are ``sqrt(d) g/‖g‖`` (the "improved" estimator, which rescales
            each residual to the dimension ``d - k + 1`` of the space it probes); else Rademacher.

    Estimate ``i`` is ``tr(Π_i A) + ω_iᵀ(I-Π_i)A(I-Π_i)ω_i`` with ``Π_i = Q(I - s_i s_iᵀ)Qᵀ``, the
    projector onto ``span(AΩ_{-i})``; expanding the quadratic form in ``Q`` coordinates (with
    ``QᵀAω_i = r_i``) gives the expression below.
    """
    k = H.shape[0]
    H = (H + H.T) / 2
    HW = H @ W
    HS = H @ S
    sHs = (S * HS).sum(0)
    c = (S * W).sum(0)
    residual = -(R * W).sum(0) + (W * HW).sum(0) + 2 * c * (S * (R - HW)).sum(0) + c**2 * sHs
    if normalized:
        residual = residual * (dim - k + 1) / (dim - (W * W).sum(0) + c**2)
    return torch.trace(H) - sHs + residual


class XTraceSketch:
    """XTrace state that grows one block of test vectors at a time (so ``rtol=`` can stop it).

    Each test vector costs two products: ``Aω`` for the sketch and ``Aq`` for the new basis column.
    Also records the plain Hutchinson samples ``ωᵀAω`` of the same test vectors (used by
    ``method="auto"`` to compare the two estimators on the same products).
    """

    def __init__(self, run: ProductRunner, generator: torch.Generator, distribution: str):
        op = run.op
        self.run = run
        self.dim = op.shape[0]
        self.distribution = distribution
        self.generator = generator
        self.basis = OrthonormalBasis(self.dim, op.device, generator)
        self.omega = torch.empty(self.dim, 0, dtype=torch.float64, device=op.device)
        self.H = torch.empty(0, 0, dtype=torch.float64, device=op.device)
        self.W = torch.empty(0, 0, dtype=torch.float64, device=op.device)
        self.hutchinson_samples = torch.empty(0, dtype=torch.float64, device=op.device)

    @property
    def size(self) -> int:
        return self.omega.shape[1]

    def add(self, num: int) -> None:
        """Draw ``num`` test vectors and fold them into the sketch (``2 num`` matvecs)."""
        omega = self.run.probes(num, self.distribution, self.generator)
        Y = self.run(omega)
        self.hutchinson_samples = torch.cat([self.hutchinson_samples, column_dots(omega, Y)])
        omega = omega.double()
        Q_old = self.basis.Q
        Qb = self.basis.extend(Y)
        del Y
        Zb = self.run(Qb.to(self.run.op.dtype)).double()
        k, b = Q_old.shape[1], num
        H = self.H.new_zeros(k + b, k + b)
        H[:k, :k] = self.H
        # Symmetry of A gives the new rows of QᵀAQ from the new columns alone (no stored AQ).
        cross = Q_old.T @ Zb
        H[:k, k:] = cross
        H[k:, :k] = cross.T
        H[k:, k:] = Qb.T @ Zb
        W = self.W.new_zeros(k + b, k + b)
        W[:k, :k] = self.W
        W[:k, k:] = Q_old.T @ omega
        self.omega = torch.cat([self.omega, omega], dim=1)
        W[k:, :] = Qb.T @ self.omega
        self.H, self.W = H, W

    def estimates(self) -> Tensor:
        """The ``k`` leave-one-out estimates (float64) for the test vectors so far."""
        R = self.basis.R
        S = leave_one_out_directions(R)
        return xtrace_estimates(self.H, self.W, R, S, self.dim, normalized=self.distribution == "sphere")
