"""spectra: Lanczos, extreme eigenpairs and eigenvalue densities (SLQ) of curvature operators.

Everything here accepts any square symmetric operator understood by ``curvature.as_operator``:
a ``curvature.LinearOperator`` (Hessian, GGN, Fisher, ...), a dense ``torch.Tensor`` or a SciPy
operator. Guide: ``docs/spectra.md``.

Eigenvalues
===========
- :func:`eigsh` -- extreme eigenpairs by thick-restarted Lanczos, with true residuals
- :func:`lanczos`, :class:`LanczosResult` -- batched Lanczos tridiagonalization
- :func:`power_iteration` -- deflated power iteration (PyHessian's method, for comparison)
- :class:`EigenResult`

Densities
=========
- :func:`slq`, :class:`SpectralDensity`, :class:`SpectralSumEstimate`, :func:`default_sigma` --
  stochastic Lanczos quadrature: densities, ``tr f(A)`` with error bars, plots, save/load

Per-layer and per-block spectra
===============================
- :func:`restrict`, :class:`RestrictedOperator` -- an operator on some parameter blocks
- :func:`block_spectra`, :class:`BlockSpectra`, :class:`BlockSpectrum`, :func:`block_kind`,
  :func:`js_distance` -- every block's eigenvalues and density in one run, and their
  heterogeneity (Jensen-Shannon distances)

Loss along directions
=====================
- :func:`loss_landscape`, :class:`LossLandscape`, :func:`dataset_loss`

The analyses of the literature (outliers, ``H = G + R``, batch-size scaling, learning rates):
:mod:`spectra.analysis`.

Examples:
    >>> import torch, spectra
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> g = torch.Generator().manual_seed(0)
    >>> [round(v, 6) for v in spectra.eigsh(A, k=3, generator=g).eigenvalues.tolist()]
    [100.0, 99.0, 98.0]
    >>> round(spectra.slq(A, num_probes=2, num_steps=30, generator=g).trace().value)
    5050
"""

from . import analysis
from .blockwise import BlockSpectra, BlockSpectrum, block_kind, block_spectra, js_distance
from .density import SpectralDensity, SpectralSumEstimate, default_sigma
from .eigsh import eigsh
from .lanczos import LanczosResult, lanczos
from .landscape import LossLandscape, dataset_loss, loss_landscape
from .power_iteration import power_iteration
from .restrict import RestrictedOperator, restrict
from .results import EigenResult
from .slq import slq

__all__ = [
    "eigsh",
    "lanczos",
    "LanczosResult",
    "power_iteration",
    "EigenResult",
    "slq",
    "SpectralDensity",
    "SpectralSumEstimate",
    "default_sigma",
    "restrict",
    "RestrictedOperator",
    "block_spectra",
    "BlockSpectra",
    "BlockSpectrum",
    "block_kind",
    "js_distance",
    "loss_landscape",
    "LossLandscape",
    "dataset_loss",
    "analysis",
]
