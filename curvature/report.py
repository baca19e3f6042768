"""Deprecated: the report moved to :mod:`curvature.app` (``from curvature.app import curvature_report``).

Importing this module warns; :func:`curvature_report` keeps the old keyword options for one release.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from curvature.app.report import CurvatureReport, ReportSettings
from curvature.app.report import curvature_report as _app_report

warnings.warn(
    "curvature.report is deprecated; use curvature.app.curvature_report", DeprecationWarning, stacklevel=2
)

__all__ = ["CurvatureReport", "curvature_report"]


def curvature_report(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    name: str = "model",
    num_matvecs: int = 100,
    top_k: int = 5,
    slq_probes: int = 4,
    slq_steps: int = 80,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CurvatureReport:
    """Deprecated: :func:`curvature.app.curvature_report` with ``settings=ReportSettings(...)``."""
    warnings.warn("curvature.report.curvature_report is deprecated; use curvature.app.curvature_report",
                  DeprecationWarning, stacklevel=2)
    settings = ReportSettings(num_matvecs=num_matvecs, top_k=top_k, slq_probes=slq_probes, slq_steps=slq_steps,
                              tol=tol)
    return _app_report(model, loss_fn, data, name=name, settings=settings, generator=generator, progress=progress)
