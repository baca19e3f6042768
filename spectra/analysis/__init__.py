"""spectra.analysis: the spectral analyses of the literature, as functions with results and figures.

* :func:`outliers` — bulk plus outliers (Sagun et al. 2017; Papyan 2019): how many eigenvalues
  stand out, where the bulk ends, their share of the trace, and the comparison with ``C``
  classes. Robust log-gap rule on converged Ritz values only.
* :func:`decompose` — ``H = G + R``, Gauss-Newton plus residual (matrix-free ``R``), with which
  term carries the outliers and which the negative eigenvalues.
* :func:`batch_size_scaling` — mini-batch sharpness against batch size, the ``λ_∞ + κ/B`` fit
  and the implied largest SGD and Adam learning rates (Granziol, Zohren & Roberts 2022).
* :func:`suggest_hyperparameters` — learning rate and momentum from the spectrum (Polyak's heavy
  ball on the Lanczos extremes, in the spirit of Granziol et al.'s SLQ learner).

Every result is a frozen dataclass with ``to_dict()`` and ``plot()``.

Examples:
    >>> import torch
    >>> from spectra import analysis
    >>> A = torch.diag(torch.cat([torch.tensor([40.0, 20.0]), torch.linspace(1.0, 2.0, 98)])).double()
    >>> analysis.outliers(A, generator=torch.Generator().manual_seed(0)).count
    2
"""

from .batch_scaling import (
    BatchScalingResult,
    DiagonallyScaledOperator,
    ScalingFit,
    batch_size_scaling,
    fit_batch_scaling,
)
from .decompose import Decomposition, DifferenceOperator, ResidualOperator, TermSpectrum, decompose
from .hyperparameters import HyperparameterSuggestion, heavy_ball, suggest_hyperparameters
from .outliers import GapRule, OutlierReport, log_gap_rule, outliers

__all__ = [
    "BatchScalingResult",
    "Decomposition",
    "DiagonallyScaledOperator",
    "DifferenceOperator",
    "GapRule",
    "HyperparameterSuggestion",
    "OutlierReport",
    "ResidualOperator",
    "ScalingFit",
    "TermSpectrum",
    "batch_size_scaling",
    "decompose",
    "fit_batch_scaling",
    "heavy_ball",
    "log_gap_rule",
    "outliers",
    "suggest_hyperparameters",
]
