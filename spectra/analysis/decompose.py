"""The split of the Hessian into its Gauss-Newton and residual terms, ``H = G + R``.

``G = (1/N) Σ_i J_iᵀ H_i J_i`` is the generalized Gauss-Newton matrix (positive semi-definite
for convex losses); ``R = (1/N) Σ_i Σ_k r_ik ∇²f_k(x_i)`` weighs the network's second
derivatives by the loss gradient ``r = ∂ℓ/∂f``. Papyan (2019) writes ``Hess = G + H`` and finds
the outliers in ``G``; ``R`` shapes the bulk and carries the negative eigenvalues, and shrinks
as the residuals do. ``R`` is applied matrix-free as ``H v − G v``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

import estimators
from curvature import GGN, Hessian, LinearOperator, as_operator
from curvature.checks import check_count
from curvature.probes import make_generator

from ..eigsh import eigsh
from ._common import tolist

__all__ = ["Decomposition", "DifferenceOperator", "ResidualOperator", "TermSpectrum", "decompose"]


class DifferenceOperator(LinearOperator):
    """``A − B`` of two operators of the same shape, dtype and device, never formed.

    One product costs one product with each. Symmetric when both are.

    Examples:
        >>> import torch
        >>> A, B = torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, 0, 0])).double()
        >>> (DifferenceOperator(A, B) @ torch.ones(3, dtype=torch.float64)).tolist()
        [0.0, 1.0, 1.0]
    """

    def __init__(self, minuend: Any, subtrahend: Any):
        A = as_operator(minuend, name="minuend")
        B = as_operator(subtrahend, name="subtrahend")
        if A.shape != B.shape:
            raise ValueError(f"operands must have the same shape, got {A.shape} and {B.shape}")
        if A.dtype != B.dtype:
            raise TypeError(f"operands must have the same dtype, got {A.dtype} and {B.dtype}")
        if A.device != B.device:
            raise ValueError(f"operands must be on the same device, got {A.device} and {B.device}")
        super().__init__(A.shape[0], A.dtype, A.device, A.blocks)
        self.minuend, self.subtrahend = A, B
        self.is_symmetric = bool(getattr(A, "is_symmetric", True) and getattr(B, "is_symmetric", True))

    def _matmat(self, V: Tensor) -> Tensor:
        return self.minuend @ V - self.subtrahend @ V


class ResidualOperator(DifferenceOperator):
    """The residual term ``R = H − G`` of the Hessian, applied as ``H v − G v``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from curvature import GGN, Hessian
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
        >>> R = ResidualOperator(Hessian(model, nn.MSELoss(), (x, y)), GGN(model, nn.MSELoss(), (x, y)))
        >>> float((R @ torch.ones(R.shape[0], dtype=torch.float64)).abs().max()) < 1e-12
        True
    """

    def __init__(self, hessian: Any, ggn: Any):
        super().__init__(hessian, ggn)

    @property
    def hessian(self) -> LinearOperator:
        """``H``."""
        return self.minuend

    @property
    def ggn(self) -> LinearOperator:
        """``G``."""
        return self.subtrahend


@dataclass(frozen=True, eq=False)
class TermSpectrum:
    """Extreme eigenvalues and trace of one term (``H``, ``G`` or ``R``).

    Attributes:
        name: ``"H"``, ``"G"`` or ``"R"``.
        top: ``(k,)`` largest eigenvalues, descending; ``bottom``: ``(k,)`` smallest, ascending.
        top_converged, bottom_converged: whether each pair met the eigensolver's tolerance.
        trace, trace_stderr: ``tr`` of the term (``stderr`` 0 when exact).
    """

    name: str
    top: Tensor
    bottom: Tensor
    top_converged: Tensor
    bottom_converged: Tensor
    trace: float
    trace_stderr: float

    def to_dict(self) -> dict:
        return {k: tolist(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class Decomposition:
    """``H = G + R`` side by side, and which term carries the outliers and the negative values.

    Attributes:
        hessian, ggn, residual: the operators ``H``, ``G`` and ``R = H − G``.
        terms: :class:`TermSpectrum` of ``H``, ``G`` and ``R`` (in that order).
        top_split: ``(k, 2)`` Rayleigh quotients ``(xᵀGx, xᵀRx)`` of the top eigenvectors ``x``
            of ``H``; they add up to the eigenvalue, so ``top_split[:, 0] / top`` is the share
            ``G`` carries.
        bottom_split: the same for the most negative eigenvectors of ``H``.
        num_matvecs: products with ``H`` and ``G`` spent (``R`` counts one of each).
    """

    hessian: LinearOperator = field(repr=False)
    ggn: LinearOperator = field(repr=False)
    residual: ResidualOperator = field(repr=False)
    terms: tuple[TermSpectrum, TermSpectrum, TermSpectrum]
    top_split: Tensor
    bottom_split: Tensor
    num_matvecs: int

    def term(self, name: str) -> TermSpectrum:
        """The :class:`TermSpectrum` called ``"H"``, ``"G"`` or ``"R"``."""
        for t in self.terms:
            if t.name == name:
                return t
        raise ValueError(f"name must be 'H', 'G' or 'R', got {name!r}")

    @property
    def ggn_share_of_top(self) -> Tensor:
        """Share ``xᵀGx / λ`` of each top eigenvalue of ``H`` carried by ``G`` (1 = all of it)."""
        return self.top_split[:, 0] / self.top_split.sum(1)

    @property
    def residual_share_of_bottom(self) -> Tensor:
        """Share ``xᵀRx / λ`` of each most-negative eigenvalue of ``H`` carried by ``R``."""
        return self.bottom_split[:, 1] / self.bottom_split.sum(1)

    @property
    def outlier_carrier(self) -> str:
        """``"G"`` if ``G`` carries most of the top eigenvalues of ``H``, else ``"R"``."""
        return "G" if float(self.ggn_share_of_top.mean()) >= 0.5 else "R"

    @property
    def negative_carrier(self) -> str:
        """``"R"`` if ``R`` carries the most negative eigenvalues of ``H`` (``G ⪰ 0`` cannot)."""
        neg = self.bottom_split.sum(1) < 0
        if not bool(neg.any()):
            return "none"
        share = self.bottom_split[neg, 1] / self.bottom_split[neg].sum(1)
        return "R" if float(share.mean()) >= 0.5 else "G"

    def to_dict(self) -> dict:
        """JSON-serializable summary (the operators are left out)."""
        return {
            "terms": [t.to_dict() for t in self.terms],
            "top_split": tolist(self.top_split),
            "bottom_split": tolist(self.bottom_split),
            "ggn_share_of_top": tolist(self.ggn_share_of_top),
            "residual_share_of_bottom": tolist(self.residual_share_of_bottom),
            "outlier_carrier": self.outlier_carrier,
            "negative_carrier": self.negative_carrier,
            "num_matvecs": self.num_matvecs,
        }

    def plot(self, axes: Any = None) -> Any:
        """Papyan's comparison: the extreme eigenvalues of ``H``, ``G`` and ``R`` (symlog scale),
        and how ``G`` and ``R`` split the top and most negative eigenvalues of ``H``.

        Returns:
            The two matplotlib axes.
        """
        from .plotting import plot_decomposition

        return plot_decomposition(self, axes=axes)


def _rayleigh_split(H: Any, G: Any, X: Tensor) -> Tensor:
    GX = G @ X
    RX = H @ X - GX  # R @ X would take G @ X a second time
    return torch.stack([(X * GX).sum(0), (X * RX).sum(0)], dim=1).double()


def decompose(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    k: int = 10,
    tol: float = 1e-6,
    max_iter: int = 400,
    trace_matvecs: int = 96,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **operator_options: Any,
) -> Decomposition:
    """Split the Hessian of ``loss_fn(model(x), y)`` over ``data`` into ``G + R``.

    Builds ``H = curvature.Hessian``, ``G = curvature.GGN`` and ``R = H − G``
    (:class:`ResidualOperator`), then for each: the ``k`` largest and ``k`` smallest eigenvalues
    (``spectra.eigsh``) and the trace (``estimators.trace(method="auto")``, exact when
    ``d ≤ trace_matvecs``). The top and most negative eigenvectors of ``H`` are split into their
    ``G`` and ``R`` parts, ``λ = xᵀGx + xᵀRx``, which shows which term carries the outliers
    (Papyan: ``G``) and which the negative eigenvalues (only ``R`` can, since ``G ⪰ 0`` for a
    convex loss).

    Args:
        model, loss_fn, data: as for :class:`curvature.Hessian` (call ``model.eval()`` first).
        k: extreme eigenvalues per term and side.
        tol: eigensolver tolerance (relative residual).
        max_iter: product cap per eigensolve; the smallest eigenvalues of a singular ``G`` sit
            in a cluster at zero and converge slowly, so their ``converged`` flags may be
            ``False`` (their values are still ``≥ 0`` up to ``tol``).
        trace_matvecs: product budget of each trace.
        generator: randomness of eigensolver starts and trace probes.
        progress: tqdm bars over the products of each eigensolve and trace (six and three).
        **operator_options: passed to both ``Hessian`` and ``GGN`` (``params=``, ...).

    Returns:
        A :class:`Decomposition`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randint(0, 2, (16,), generator=g)
        >>> dec = decompose(model, nn.CrossEntropyLoss(), (x, y), k=2, generator=g)
        >>> [t.name for t in dec.terms], dec.top_split.shape
        (['H', 'G', 'R'], torch.Size([2, 2]))
    """
    g = make_generator(generator)
    H = Hessian(model, loss_fn, data, **operator_options)
    G = GGN(model, loss_fn, data, **operator_options)
    R = ResidualOperator(H, G)
    d = H.shape[0]
    k = min(check_count(k, name="k"), d)
    before = H.num_matvecs + G.num_matvecs
    terms = []
    for name, op in (("H", H), ("G", G), ("R", R)):
        top = eigsh(op, k=k, which="LA", tol=tol, max_iter=max(max_iter, k), generator=g, progress=progress)
        bottom = eigsh(op, k=k, which="SA", tol=tol, max_iter=max(max_iter, k), generator=g, progress=progress)
        if name == "H":  # split H's eigenvectors now: no eigenvectors are kept through the other solves
            top_split = _rayleigh_split(H, G, top.eigenvectors)
            bottom_split = _rayleigh_split(H, G, bottom.eigenvectors)
        spectrum = (top.eigenvalues, bottom.eigenvalues, top.converged, bottom.converged)
        del top, bottom  # 2k parameter-sized vectors (2 GB at GPT-2 small with k = 2)
        tr = estimators.trace(op, num_matvecs=min(d, trace_matvecs), method="auto", generator=g, progress=progress)
        terms.append(TermSpectrum(name, *spectrum, float(tr.value), float(tr.stderr)))
    num = H.num_matvecs + G.num_matvecs - before
    return Decomposition(H, G, R, tuple(terms), top_split, bottom_split, int(num))

