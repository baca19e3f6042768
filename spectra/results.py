"""Result records shared by the eigensolvers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EigenResult"]


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Approximate eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, ordered as requested (``"LA"``: descending, ``"SA"``:
            ascending, ``"LM"``: descending magnitude).
        eigenvectors: ``(d, k)`` unit columns in the operator's dtype.
        residuals: ``(k,)`` float64 residual norms ``‖H x − λ x‖``.
        converged: ``(k,)`` bool, whether each pair met the solver's tolerance.
        num_matvecs: operator columns multiplied.

    Examples:
        >>> import torch
        >>> ok = torch.ones(1, dtype=torch.bool)
        >>> r = EigenResult(torch.ones(1), torch.ones(3, 1), torch.zeros(1), ok, 7)
        >>> bool(r.all_converged), r.k
        (True, 1)
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigenvalues.shape[0])

    @property
    def all_converged(self) -> bool:
        """Whether every pair converged."""
        return bool(self.converged.all())
