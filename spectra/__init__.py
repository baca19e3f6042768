"""spectra: Lanczos, extreme eigenpairs and eigenvalue densities (SLQ) of curvature operators.

Everything here accepts any square symmetric operator understood by ``curvature.as_operator``:
a ``curvature.LinearOperator`` (Hessian, GGN, Fisher, ...), a dense ``torch.Tensor`` or a SciPy
operator.

Example:
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
    "BlockSpectra",
    "BlockSpectrum",
    "EigenResult",
    "LanczosResult",
    "LossLandscape",
    "RestrictedOperator",
    "SpectralDensity",
    "SpectralSumEstimate",
    "analysis",
    "block_kind",
    "block_spectra",
    "js_distance",
    "dataset_loss",
    "default_sigma",
    "eigsh",
    "lanczos",
    "loss_landscape",
    "power_iteration",
    "restrict",
    "slq",
]
